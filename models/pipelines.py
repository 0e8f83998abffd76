"""Whole text-to-image pipelines built offline from seeded weights: what `hn-export bundle --preset NAME` and the tests
bundle when no checkpoint is at hand.

A pipeline preset (`PIPELINE_PRESETS`) names a transformer preset of `models.presets` and the text encoder, VAE and
tokenizer that go with it. `write_pipeline_folder(name, folder)` writes a local diffusers pipeline folder laid out like
the released PixArt-Sigma ones (``model_index.json``, ``text_encoder/``, ``tokenizer/spiece.model``,
``transformer/``, ``vae/``, ``scheduler/``), so the bundle command reads a preset exactly as it reads a checkpoint.

- transformer: the preset's architecture, seeded (`models.build.build_transformer`, ``dit-stats`` init);
- text encoder: a `transformers.T5EncoderModel` (T5 v1.1 layout: gated GELU, no biases, relative position buckets),
  width = the transformer's ``caption_channels``, weights drawn under ``torch.manual_seed(seed + 1)``; a preset with
  ``encoder_per_layer`` (full T5-XXL: 19 GB in float32, more than a 24 GB machine holds beside the rest) builds and
  saves it a layer at a time instead (`write_text_encoder_per_layer`: T5's own initialisation, layer k >= 1 under
  its own seed), as sharded safetensors;
- VAE: an `AutoencoderKL` with four levels (a scale factor of 8, as SDXL's), ``scaling_factor`` 0.13025 (SDXL's),
  weights under ``torch.manual_seed(seed + 2)``;
- tokenizer: a SentencePiece unigram model trained here (``sentencepiece`` package, one thread: the same bytes every
  time) on `corpus_lines()`, a few hundred generated captions, saved as ``tokenizer/spiece.model`` with no
  ``tokenizer.json`` (as PixArt-Sigma's released folders: the bundle converts it);
- scheduler: `DPMSolverMultistepScheduler` with PixArt-Sigma's released settings.

torch, diffusers, transformers and sentencepiece are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.errors import ModelInputError

# PixArt-Sigma's released scheduler/scheduler_config.json (PixArt-Sigma-XL-2-1024-MS), less the keys diffusers adds.
PIXART_SIGMA_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
    solver_order=2, solver_type="midpoint", algorithm_type="dpmsolver++", lower_order_final=True,
    euler_at_final=False, timestep_spacing="linspace", steps_offset=0, thresholding=False, use_karras_sigmas=False,
    variance_type=None,
)


@dataclasses.dataclass(frozen=True)
class PipelinePreset:
    description: str
    transformer_preset: str
    text_encoder: Mapping[str, Any]  # T5Config keyword arguments (vocab_size comes from the tokenizer)
    vae: Mapping[str, Any]  # AutoencoderKL keyword arguments
    vocab_size: int  # SentencePiece pieces (the tokenizer adds 100 sentinel ids, as T5's)
    max_sequence_length: int = 300
    embedding_rows: int | None = None  # T5's embedding rows when more than the tokenizer's ids (T5-XXL: 32128)
    encoder_per_layer: bool = False  # build and save the text encoder a layer at a time (write_text_encoder_per_layer)


TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=20, feed_forward_proj="gated-gelu", dropout_rate=0.0,
               layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.13025,
                force_upcast=False)

# T5-XXL (google/t5-v1_1-xxl, PixArt-Sigma's text encoder: 4.76 B parameters with the 32128-row embedding) and
# SDXL's VAE (PixArt-Sigma's), as configs.
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
              layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
                force_upcast=False)

PIPELINE_PRESETS: dict[str, PipelinePreset] = {
    "tiny": PipelinePreset(
        "PixArt-Sigma test pipeline: the `tiny` transformer (2 blocks, 72 wide, 8x8 latent), a 2-layer 32-wide T5 "
        "encoder, a 4-level VAE (8 to 16 channels, 64x64 images), a SentencePiece tokenizer of about 100 pieces",
        transformer_preset="tiny", text_encoder=TINY_T5, vae=TINY_VAE, vocab_size=256),
    "pixart-sigma-512": PipelinePreset(
        "PixArt-Sigma 512 px at full size: the XL-2 transformer (28 blocks, 1152 wide), T5-XXL's architecture "
        "(24 layers, 4096 wide, 32128 embedding rows: 19 GB in float32), SDXL's VAE",
        transformer_preset="pixart-sigma-512", text_encoder=T5_XXL, vae=SDXL_VAE, vocab_size=256,
        embedding_rows=32128, encoder_per_layer=True),
    "pixart-sigma-1024": PipelinePreset(
        "PixArt-Sigma 1024 px at full size (the released PixArt-Sigma-XL-2-1024-MS's architectures): the XL-2 "
        "transformer (28 blocks, 1152 wide, 128 x 128 latent), T5-XXL (24 layers, 4096 wide, 32128 embedding rows; "
        "built and saved a layer at a time), SDXL's VAE",
        transformer_preset="pixart-sigma-1024", text_encoder=T5_XXL, vae=SDXL_VAE, vocab_size=256,
        embedding_rows=32128, encoder_per_layer=True),
    "pixart-sigma-512-t5-2layers": PipelinePreset(
        "PixArt-Sigma 512 px at full size except the text encoder's depth: T5-XXL's width and embedding with 2 of its "
        "24 layers (0.52 B parameters), the XL-2 transformer, SDXL's VAE: the device-side stages at real size on a "
        "24 GB machine",
        transformer_preset="pixart-sigma-512", text_encoder={**T5_XXL, "num_layers": 2}, vae=SDXL_VAE,
        vocab_size=256, embedding_rows=32128),
}

_SUBJECTS = ("cat", "dog", "fox", "horse", "robot", "lighthouse", "castle", "mountain", "river", "forest", "city",
             "bicycle", "teapot", "owl", "sailboat", "garden", "bridge", "dragon", "astronaut", "violin")
_ADJECTIVES = ("red", "small", "ancient", "glowing", "wooden", "snowy", "golden", "quiet", "giant", "blue", "misty",
               "colorful")
_PLACES = ("on a hill", "in the rain", "at sunset", "under the stars", "by the sea", "in a busy street",
           "inside a library", "on a wooden table", "in a snowy forest", "near a waterfall", "in outer space",
           "on a sunny beach")
_STYLES = ("a photo of", "an oil painting of", "a watercolor of", "a pencil sketch of", "a 3d render of",
           "a close-up photograph of", "a poster of", "a pixel art image of")


def corpus_lines() -> list[str]:
    """A few hundred generated captions (the tokenizer's training text; deterministic)."""
    combos = itertools.product(_STYLES, _ADJECTIVES, _SUBJECTS, _PLACES)
    return [f"{style} a {adjective} {subject} {place}" for i, (style, adjective, subject, place) in enumerate(combos)
            if i % 53 == 0]


def pipeline_preset(name: str) -> PipelinePreset:
    if name not in PIPELINE_PRESETS:
        raise ModelInputError(f"unknown pipeline preset {name!r}", f"use one of: {', '.join(PIPELINE_PRESETS)}")
    return PIPELINE_PRESETS[name]


def train_spiece(path: Path, vocab_size: int, lines: list[str] | None = None) -> Path:
    """Train a SentencePiece unigram model (T5's kind: pad 0, eos 1, unk 2, no bos) on `lines`; writes `path`."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise ModelInputError("building a pipeline preset's tokenizer needs the sentencepiece package",
                              "pip install sentencepiece (in hn-export's test extra), or pass --checkpoint") from None
    import io

    model = io.BytesIO()  # trained from an iterator into memory: no file path ends up in the model's bytes
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines or corpus_lines()), model_writer=model, model_type="unigram",
        vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1,
        minloglevel=2, hard_vocab_limit=False, shuffle_input_sentence=False)
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path


def build_tokenizer(folder: Path, vocab_size: int):
    """A T5 tokenizer read from a freshly trained ``spiece.model`` (in `folder`)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_spiece(folder / "spiece.model", vocab_size)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 100, "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": "<pad>", "legacy": True}))
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def build_text_encoder(config: Mapping[str, Any], vocab_size: int, seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(T5Config(vocab_size=vocab_size, **config))
    return model.eval()


def write_text_encoder_per_layer(folder: Path, config: Mapping[str, Any], vocab_size: int, seed: int) -> Path:
    """A seeded T5 encoder written to `folder` (``config.json``, ``model-0000k-of-0000n.safetensors`` per layer,
    ``model.safetensors.index.json``) a layer at a time: the embedding, layer 0 (the one with the relative position
    bias) and the final norm from ``T5EncoderModel(num_layers=1)`` under ``torch.manual_seed(seed)``, layer k >= 1 a
    ``T5Block`` under ``torch.manual_seed(seed + 7919 k)``, every one initialised by T5's ``_init_weights``. Peak
    memory: the embedding and one layer (T5-XXL: 0.5 + 0.8 GB). ``T5EncoderModel.from_pretrained`` reads it."""
    import torch
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel
    from transformers.models.t5.modeling_t5 import T5Block

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full = T5Config(vocab_size=vocab_size, **config)
    layers = int(full.num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        first = T5EncoderModel(T5Config(vocab_size=vocab_size, **{**config, "num_layers": 1})).eval()
    shards: list[dict[str, torch.Tensor]] = [{k: v for k, v in first.state_dict().items()
                                               if k != "encoder.embed_tokens.weight"}]  # tied to shared.weight
    names = [f"model-{i + 1:05d}-of-{layers:05d}.safetensors" for i in range(layers)]
    weight_map: dict[str, str] = {}
    total = 0

    def write(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(folder / names[index]), metadata={"format": "pt"})
        for key, value in tensors.items():
            weight_map[key] = names[index]
            total += value.numel() * value.element_size()

    write(0, shards.pop())
    for k in range(1, layers):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919 * k)
            block = T5Block(full, has_relative_attention_bias=False, layer_idx=k).eval()
            block.apply(first._init_weights)
        write(k, {f"encoder.block.{k}.{name}": value for name, value in block.state_dict().items()})
        del block
    full.architectures = ["T5EncoderModel"]
    full.save_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    return folder


def build_vae(config: Mapping[str, Any], seed: int):
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**config).eval()


def write_pipeline_folder(name: str, folder: Path, seed: int = 0) -> Path:
    """Write pipeline preset `name` (seeded weights) as a local diffusers ``PixArtSigmaPipeline`` folder; returns it.
    The same name and seed give the same weights and tokenizer."""
    preset = pipeline_preset(name)
    import diffusers
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from models.build import ModelSource, build_transformer

    folder = Path(folder)
    transformer = build_transformer(ModelSource(preset=preset.transformer_preset, seed=seed))
    width = transformer.config.caption_channels
    if width != preset.text_encoder["d_model"]:
        raise ModelInputError(f"pipeline preset {name}: T5 width {preset.text_encoder['d_model']} is not the "
                              f"transformer's caption_channels {width}", "fix the preset")
    with tempfile.TemporaryDirectory(prefix=".hn-tokenizer-") as tmp:
        tokenizer = build_tokenizer(Path(tmp), preset.vocab_size)
        rows = max(len(tokenizer), preset.embedding_rows or 0)
        encoder = None if preset.encoder_per_layer else build_text_encoder(preset.text_encoder, rows, seed + 1)
        vae = build_vae(preset.vae, seed + 2)
        scheduler = DPMSolverMultistepScheduler(**PIXART_SIGMA_SCHEDULER)
        pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                                   scheduler=scheduler)
        from transformers.utils import logging as tlogging

        level = diffusers.logging.get_verbosity()
        diffusers.logging.set_verbosity_error()
        tlogging.disable_progress_bar()  # "Writing model shards" per component
        try:
            pipe.save_pretrained(folder, safe_serialization=True)
        finally:
            diffusers.logging.set_verbosity(level)
            tlogging.enable_progress_bar()
        if encoder is None:  # written a layer at a time, and named in model_index.json as save_pretrained names it
            write_text_encoder_per_layer(folder / "text_encoder", preset.text_encoder, rows, seed + 1)
            index_path = folder / "model_index.json"
            index = json.loads(index_path.read_text())
            index["text_encoder"] = ["transformers", "T5EncoderModel"]
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        spiece = folder / "tokenizer" / "spiece.model"
        if not spiece.is_file():  # a tokenizer that does not copy its vocabulary file on save
            shutil.copyfile(Path(tmp) / "spiece.model", spiece)
    # As the released PixArt-Sigma folders: the SentencePiece model only (the bundle converts it on the host).
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    return folder

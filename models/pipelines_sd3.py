"""Stable Diffusion 3 text-to-image pipelines built offline from seeded weights: the SD3 counterpart of
`models.pipelines` (PixArt-Sigma), for `hn-export bundle --preset NAME` and the tests when no checkpoint is at hand.

An SD3 pipeline preset (`SD3_PIPELINE_PRESETS`) names a transformer preset of `models.presets` (family ``sd3``) and
the three text encoders, tokenizers and VAE that go with it. `write_sd3_pipeline_folder(name, folder)` writes a local
diffusers ``StableDiffusion3Pipeline`` folder laid out like stabilityai/stable-diffusion-3-medium-diffusers
(``model_index.json``, ``transformer/``, ``text_encoder/``, ``text_encoder_2/``, ``text_encoder_3/``,
``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``, ``vae/``, ``scheduler/``):

- transformer: the preset's ``SD3Transformer2DModel``, seeded (`models.build.build_transformer`, ``dit-stats`` init,
  under ``seed``); the encoders' widths are checked against its ``joint_attention_dim``, ``pooled_projection_dim``
  and ``in_channels``;
- ``text_encoder`` (CLIP-L's role) and ``text_encoder_2`` (CLIP-G's role): ``transformers.CLIPTextModelWithProjection``
  (quick-GELU and GELU, as CLIP ViT-L/14 and OpenCLIP bigG), weights under ``torch.manual_seed(seed + 1)`` and
  ``seed + 2``. The pipeline concatenates their penultimate hidden states along channels (zero-padded to the T5
  width) and their projected pooled outputs (the transformer's ``pooled_projections``);
- ``text_encoder_3``: a `transformers.T5EncoderModel` (T5 v1.1 layout, `models.pipelines.build_text_encoder`),
  width = ``joint_attention_dim``, under ``seed + 3``;
- ``tokenizer`` / ``tokenizer_2``: CLIP byte-level BPE tokenizers (``vocab.json``, ``merges.txt``,
  ``tokenizer_config.json``, ``special_tokens_map.json``; no ``tokenizer.json``, as released), one vocabulary for
  both: CLIP's layout (the 256 byte symbols, the same with ``</w>``, one token per merge, ``<|startoftext|>`` and
  ``<|endoftext|>`` last) with merges learnt here by a plain, deterministic BPE on `models.pipelines.corpus_lines()`.
  ``tokenizer`` pads with ``<|endoftext|>``, ``tokenizer_2`` with ``!`` (id 0), as the released SD3 folders;
- ``tokenizer_3``: the SentencePiece T5 tokenizer of `models.pipelines.build_tokenizer` (``spiece.model``, no
  ``tokenizer.json``);
- VAE: an ``AutoencoderKL`` with four levels (a scale factor of 8), 16 latent channels, SD3's ``scaling_factor``
  1.5305 and ``shift_factor`` 0.0609 and no quant convs, under ``seed + 4``;
- scheduler: ``FlowMatchEulerDiscreteScheduler`` with SD3-medium's released settings (1000 steps, shift 3).

The same name and seed write the same bytes. torch, diffusers, transformers and tokenizers are imported inside the
functions.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.errors import ModelInputError
from models.pipelines import TINY_T5, TINY_VAE, build_text_encoder, build_tokenizer, build_vae, corpus_lines

# stabilityai/stable-diffusion-3-medium-diffusers's scheduler/scheduler_config.json, less the keys diffusers adds.
SD3_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's pre-tokenizer (open_clip's and transformers' pattern): special tokens, contractions, letter runs, single
# digits, runs of other non-space characters.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_MAX_LENGTH = 77


@dataclasses.dataclass(frozen=True)
class SD3PipelinePreset:
    description: str
    transformer_preset: str  # a models.presets name of the sd3 family
    clip_l: Mapping[str, Any]  # CLIPTextConfig keyword arguments of text_encoder (vocab size, token ids: tokenizer)
    clip_g: Mapping[str, Any]  # CLIPTextConfig keyword arguments of text_encoder_2
    t5: Mapping[str, Any]  # T5Config keyword arguments of text_encoder_3 (vocab_size comes from its tokenizer)
    vae: Mapping[str, Any]  # AutoencoderKL keyword arguments
    clip_merges: int  # BPE merges learnt for the CLIP tokenizers: vocabulary = 512 + merges + 2
    t5_vocab_size: int  # SentencePiece pieces of tokenizer_3 (the tokenizer adds 100 sentinel ids, as T5's)
    clip_pad_tokens: tuple[str, str] = (EOS_TOKEN, "!")  # tokenizer's and tokenizer_2's pad tokens (as released)


# CLIP text towers at test size: 2 layers, 2 heads, 77 positions. CLIP-L narrower than CLIP-G (as 768 vs 1280), their
# sum (24) under the T5 width (32) so that the pipeline's zero padding of the CLIP features is exercised; projections
# 8 + 8 = the transformer's pooled_projection_dim.
TINY_CLIP_L = dict(hidden_size=8, intermediate_size=32, projection_dim=8, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                   attention_dropout=0.0)
TINY_CLIP_G = dict(hidden_size=16, intermediate_size=64, projection_dim=8, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu", layer_norm_eps=1e-5,
                   attention_dropout=0.0)
# SD3's VAE layout (16 latent channels, shift and scale, no quant convs) at TINY_VAE's size.
TINY_SD3_VAE = dict(TINY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                    use_post_quant_conv=False)

SD3_PIPELINE_PRESETS: dict[str, SD3PipelinePreset] = {
    "sd3-tiny": SD3PipelinePreset(
        "SD3 test pipeline: the `sd3-tiny` transformer (2 blocks, 72 wide, 8x8 latent), 2-layer CLIP-L / CLIP-G "
        "towers (8 and 16 wide, projections 8 + 8), a 2-layer 32-wide T5 encoder, a 4-level 16-channel VAE (64x64 "
        "images), CLIP BPE tokenizers of 642 tokens and a SentencePiece tokenizer of about 100 pieces",
        transformer_preset="sd3-tiny", clip_l=TINY_CLIP_L, clip_g=TINY_CLIP_G, t5=TINY_T5, vae=TINY_SD3_VAE,
        clip_merges=128, t5_vocab_size=256),
}


def sd3_pipeline_preset(name: str) -> SD3PipelinePreset:
    if name not in SD3_PIPELINE_PRESETS:
        raise ModelInputError(f"unknown SD3 pipeline preset {name!r}", f"use one of: {', '.join(SD3_PIPELINE_PRESETS)}")
    return SD3_PIPELINE_PRESETS[name]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map of the 256 bytes to printable characters: printable Latin-1 bytes map to
    themselves, the rest to 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def clip_words(lines: Sequence[str]) -> list[str]:
    """`lines` split as CLIP's tokenizer splits text (NFC, whitespace runs to one space, lower case, `CLIP_PATTERN`),
    each word as its byte symbols (`bytes_to_unicode`)."""
    import unicodedata

    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True)
    encode = bytes_to_unicode()
    words = []
    for line in lines:
        text = " ".join(unicodedata.normalize("NFC", line).split()).lower()
        for word, _ in split.pre_tokenize_str(text):
            words.append("".join(encode[b] for b in word.encode("utf-8")))
    return words


def learn_clip_bpe(lines: Sequence[str], merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary learnt on `lines`: up to `merges` merges, each the most frequent adjacent pair of the
    corpus' words (ties: the smallest pair; a pair whose join is already a token is skipped), a word's last symbol
    carrying ``</w>``. Vocabulary as CLIP's: the 256 byte symbols, the same with ``</w>``, one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (the last id). Deterministic: no hashing order, no threads."""
    base = list(bytes_to_unicode().values())
    tokens = base + [s + END_OF_WORD for s in base]
    known = set(tokens)
    counts = collections.Counter(clip_words(lines))
    words = [[list(word[:-1]) + [word[-1] + END_OF_WORD], n] for word, n in sorted(counts.items())]
    learnt: list[tuple[str, str]] = []
    while len(learnt) < merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, n in words:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        candidates = [(-n, pair) for pair, n in pairs.items() if "".join(pair) not in known]
        if not candidates:
            break
        _, best = min(candidates)
        joined = "".join(best)
        learnt.append(best)
        tokens.append(joined)
        known.add(joined)
        for word in words:
            symbols, out, i = word[0], [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            word[0] = out
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, learnt


def _special(content: str) -> dict[str, Any]:
    # As the released CLIP tokenizer configs: only <|startoftext|> is matched on the normalized (lower-cased) text.
    return {"content": content, "lstrip": False, "normalized": content == BOS_TOKEN, "rstrip": False,
            "single_word": False, "special": True}


def write_clip_tokenizer(folder: Path, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]],
                         pad_token: str) -> Path:
    """A CLIP tokenizer folder as the released SD3 ones: ``vocab.json``, ``merges.txt`` (``#version: 0.2`` then one
    merge a line), ``tokenizer_config.json`` (``CLIPTokenizer``, 77 tokens) and ``special_tokens_map.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if pad_token not in vocab:
        raise ModelInputError(f"CLIP pad token {pad_token!r} is not in the vocabulary", "fix the preset")
    (folder / "vocab.json").write_text(json.dumps(dict(vocab), ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    specials = sorted({BOS_TOKEN, EOS_TOKEN, pad_token}, key=lambda t: vocab[t])
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(vocab[t]): _special(t) for t in specials},
        "bos_token": BOS_TOKEN, "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": EOS_TOKEN,
        "errors": "replace", "model_max_length": CLIP_MAX_LENGTH, "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer", "unk_token": EOS_TOKEN,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    special = {"bos_token": _special(BOS_TOKEN), "eos_token": _special(EOS_TOKEN), "pad_token": _special(pad_token),
               "unk_token": _special(EOS_TOKEN)}
    for entry in special.values():
        del entry["special"]
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
    return folder


def build_clip_encoder(config: Mapping[str, Any], vocab: Mapping[str, int], pad_token: str, seed: int):
    """A seeded ``CLIPTextModelWithProjection``: vocabulary size and bos / eos / pad ids from `vocab` (pooling reads
    the first ``<|endoftext|>``)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN],
                                 pad_token_id=vocab[pad_token], **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(text_config)
    return model.eval()


def check_preset(name: str, preset: SD3PipelinePreset, transformer_config: Mapping[str, Any]) -> None:
    """The encoders and VAE of `preset` fit the transformer (its config): T5 width = ``joint_attention_dim``, CLIP-L +
    CLIP-G widths <= it (the pipeline zero-pads), their projections sum to ``pooled_projection_dim``, VAE latent
    channels = ``in_channels``; CLIP towers of 77 positions."""
    joint = int(transformer_config["joint_attention_dim"])
    pooled = int(transformer_config["pooled_projection_dim"])
    channels = int(transformer_config["in_channels"])
    l_width, g_width = int(preset.clip_l["hidden_size"]), int(preset.clip_g["hidden_size"])
    problems = []
    if int(preset.t5["d_model"]) != joint:
        problems.append(f"T5 width {preset.t5['d_model']} is not the transformer's joint_attention_dim {joint}")
    if l_width + g_width > joint:
        problems.append(f"CLIP widths {l_width} + {g_width} exceed the transformer's joint_attention_dim {joint}")
    projections = int(preset.clip_l["projection_dim"]) + int(preset.clip_g["projection_dim"])
    if projections != pooled:
        problems.append(f"CLIP projections sum to {projections}, not the transformer's pooled_projection_dim {pooled}")
    if int(preset.vae["latent_channels"]) != channels:
        problems.append(f"VAE latent channels {preset.vae['latent_channels']} are not the transformer's in_channels "
                        f"{channels}")
    for role, config in (("CLIP-L", preset.clip_l), ("CLIP-G", preset.clip_g)):
        if int(config.get("max_position_embeddings", CLIP_MAX_LENGTH)) < CLIP_MAX_LENGTH:
            problems.append(f"{role} has fewer than {CLIP_MAX_LENGTH} positions")
    if problems:
        raise ModelInputError(f"SD3 pipeline preset {name}: {'; '.join(problems)}", "fix the preset")


def write_sd3_pipeline_folder(name: str, folder: Path, seed: int = 0) -> Path:
    """Write SD3 pipeline preset `name` (seeded weights) as a local diffusers ``StableDiffusion3Pipeline`` folder;
    returns it. The same name and seed give the same bytes."""
    preset = sd3_pipeline_preset(name)
    import diffusers
    from transformers import CLIPTokenizer
    from transformers.utils import logging as tlogging

    verbosity = tlogging.get_verbosity()
    tlogging.set_verbosity_error()  # the pipeline module's image processors: "requires torchvision (not installed)"
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    finally:
        tlogging.set_verbosity(verbosity)

    from models.build import ModelSource, build_transformer

    folder = Path(folder)
    transformer = build_transformer(ModelSource(preset=preset.transformer_preset, seed=seed))
    if type(transformer).__name__ != "SD3Transformer2DModel":
        raise ModelInputError(f"SD3 pipeline preset {name}: transformer preset {preset.transformer_preset} builds a "
                              f"{type(transformer).__name__}, not an SD3Transformer2DModel", "fix the preset")
    check_preset(name, preset, transformer.config)
    vocab, merges = learn_clip_bpe(corpus_lines(), preset.clip_merges)
    pads = preset.clip_pad_tokens
    with tempfile.TemporaryDirectory(prefix=".hn-tokenizer-") as tmp:
        tmp = Path(tmp)
        clip_folders = [write_clip_tokenizer(tmp / f"clip{i}", vocab, merges, pad) for i, pad in enumerate(pads)]
        level = diffusers.logging.get_verbosity()
        diffusers.logging.set_verbosity_error()
        tlogging.disable_progress_bar()  # "Writing model shards" per component
        try:
            clip_tokenizers = [CLIPTokenizer.from_pretrained(f, local_files_only=True) for f in clip_folders]
            t5_tokenizer = build_tokenizer(tmp / "t5", preset.t5_vocab_size)
            pipe = StableDiffusion3Pipeline(
                transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                vae=build_vae(preset.vae, seed + 4),
                text_encoder=build_clip_encoder(preset.clip_l, vocab, pads[0], seed + 1),
                tokenizer=clip_tokenizers[0],
                text_encoder_2=build_clip_encoder(preset.clip_g, vocab, pads[1], seed + 2),
                tokenizer_2=clip_tokenizers[1],
                text_encoder_3=build_text_encoder(preset.t5, len(t5_tokenizer), seed + 3),
                tokenizer_3=t5_tokenizer,
            )
            pipe.save_pretrained(folder, safe_serialization=True)
        finally:
            diffusers.logging.set_verbosity(level)
            tlogging.enable_progress_bar()
        # The CLIP tokenizers as released (vocab.json, merges.txt and the two json files; no tokenizer.json).
        for sub, source in zip(("tokenizer", "tokenizer_2"), clip_folders):
            shutil.rmtree(folder / sub)
            shutil.copytree(source, folder / sub)
        spiece = folder / "tokenizer_3" / "spiece.model"
        if not spiece.is_file():  # a tokenizer that does not copy its vocabulary file on save
            shutil.copyfile(tmp / "t5" / "spiece.model", spiece)
    # As models.pipelines: the SentencePiece model only (the bundle converts it on the host).
    (folder / "tokenizer_3" / "tokenizer.json").unlink(missing_ok=True)
    return folder

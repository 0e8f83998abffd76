"""The seeded offline SD3 pipeline folder (`models.pipelines_sd3.write_sd3_pipeline_folder`): diffusers'
StableDiffusion3Pipeline loads it and runs, the same seed writes the same bytes, the CLIP tokenizers (vocab.json +
merges.txt, no tokenizer.json) encode as CLIP's own BPE does with the released pad tokens, and bad presets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from models.errors import ModelInputError  # noqa: E402
from models.pipelines import corpus_lines  # noqa: E402
from models.pipelines_sd3 import (  # noqa: E402
    BOS_TOKEN,
    EOS_TOKEN,
    SD3_PIPELINE_PRESETS,
    bytes_to_unicode,
    sd3_pipeline_preset,
    write_sd3_pipeline_folder,
)

UNSEEN_PROMPTS = ["A watercolor of a red fox, at sunset", "A watercolor of a red fox, at sunset!",
                  "Two  ZEBRAS\tdon't   jump over 12 fences?!", "Ünïcode café — naïve façade", "", "x" * 300]
CLIP_FILES = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory) -> Path:
    return write_sd3_pipeline_folder("sd3-tiny", tmp_path_factory.mktemp("sd3") / "pipeline", seed=0)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_configs(sd3_folder):
    index = json.loads((sd3_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    for name in ("tokenizer", "tokenizer_2"):
        assert sorted(p.name for p in (sd3_folder / name).iterdir()) == CLIP_FILES
    assert not (sd3_folder / "tokenizer_3" / "tokenizer.json").exists()
    assert (sd3_folder / "tokenizer_3" / "spiece.model").is_file()
    transformer = json.loads((sd3_folder / "transformer" / "config.json").read_text())
    clip_l = json.loads((sd3_folder / "text_encoder" / "config.json").read_text())
    clip_g = json.loads((sd3_folder / "text_encoder_2" / "config.json").read_text())
    t5 = json.loads((sd3_folder / "text_encoder_3" / "config.json").read_text())
    vae = json.loads((sd3_folder / "vae" / "config.json").read_text())
    scheduler = json.loads((sd3_folder / "scheduler" / "scheduler_config.json").read_text())
    assert t5["d_model"] == transformer["joint_attention_dim"]
    assert clip_l["hidden_size"] + clip_g["hidden_size"] <= transformer["joint_attention_dim"]
    assert clip_l["projection_dim"] + clip_g["projection_dim"] == transformer["pooled_projection_dim"]
    assert (clip_l["hidden_act"], clip_g["hidden_act"]) == ("quick_gelu", "gelu")
    assert vae["latent_channels"] == transformer["in_channels"] == 16
    assert (vae["scaling_factor"], vae["shift_factor"], vae["use_quant_conv"], vae["use_post_quant_conv"]) == (
        1.5305, 0.0609, False, False)
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
    vocab = json.loads((sd3_folder / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    for config in (clip_l, clip_g):  # pooling reads the first <|endoftext|>: the last id, as CLIP's 49407
        assert config["vocab_size"] == len(vocab)
        assert config["eos_token_id"] == vocab[EOS_TOKEN] == len(vocab) - 1
        assert config["bos_token_id"] == vocab[BOS_TOKEN] == len(vocab) - 2


def test_diffusers_loads_and_runs(sd3_folder):
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe("a photo of a red fox at sunset", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0


def test_same_seed_same_bytes(sd3_folder, tmp_path):
    first = _files(sd3_folder)
    again = _files(write_sd3_pipeline_folder("sd3-tiny", tmp_path / "again", seed=0))
    assert list(again) == list(first)
    assert [name for name in first if first[name] != again[name]] == []
    other = _files(write_sd3_pipeline_folder("sd3-tiny", tmp_path / "other", seed=1))
    assert list(other) == list(first)
    weights = [name for name in first if name.endswith(".safetensors")]
    assert len(weights) == 5
    assert [name for name in weights if other[name] == first[name]] == []  # every component under its own seed
    transformer = "transformer/diffusion_pytorch_model.safetensors"
    assert first[transformer] != other[transformer]
    tokenizers = [name for name in first if name.startswith("tokenizer")]
    assert [name for name in tokenizers if other[name] != first[name]] == []  # the seed draws weights only


def _reference_clip_bpe(folder: Path):
    """CLIP's own BPE (openai/CLIP simple_tokenizer.py's algorithm, without ftfy) over vocab.json and merges.txt:
    independent of the `tokenizers` package that backs transformers' CLIPTokenizer (one class in transformers 5:
    CLIPTokenizerFast is an alias)."""
    regex = pytest.importorskip("regex")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    ranks = {tuple(line.split()): i for i, line in enumerate(lines[1:])}
    byte_encoder = bytes_to_unicode()
    pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                            r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(token: str) -> list[str]:
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(text: str) -> list[int]:
        text = " ".join(text.split()).strip().lower()
        ids = [vocab[BOS_TOKEN]]
        for token in pattern.findall(text):
            ids += [vocab[piece] for piece in bpe("".join(byte_encoder[b] for b in token.encode("utf-8")))]
        return ids[:76] + [vocab[EOS_TOKEN]]

    return vocab, encode


def test_clip_tokenizers(sd3_folder):
    from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

    vocab, reference = _reference_clip_bpe(sd3_folder / "tokenizer")
    assert 512 < len(vocab) < 1024 and list(vocab.values()) == list(range(len(vocab)))
    assert json.loads((sd3_folder / "tokenizer_2" / "vocab.json").read_text(encoding="utf-8")) == vocab
    loaded = {}
    for name in ("tokenizer", "tokenizer_2"):
        loaded[name] = [CLIPTokenizer.from_pretrained(sd3_folder / name, local_files_only=True),
                        CLIPTokenizerFast.from_pretrained(sd3_folder / name, local_files_only=True),
                        AutoTokenizer.from_pretrained(sd3_folder / name, local_files_only=True, use_fast=False)]
    clip_l, clip_g = loaded["tokenizer"][0], loaded["tokenizer_2"][0]
    # The released SD3 folders' pad tokens: CLIP-L pads with <|endoftext|>, CLIP-G with "!" (id 0).
    assert (clip_l.pad_token, clip_l.pad_token_id) == (EOS_TOKEN, len(vocab) - 1)
    assert (clip_g.pad_token, clip_g.pad_token_id) == ("!", 0)
    for tokenizer in (clip_l, clip_g):
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (len(vocab) - 2, len(vocab) - 1)
        assert tokenizer.model_max_length == 77 and len(tokenizer) == len(vocab)
    prompts = corpus_lines()[::7] + UNSEEN_PROMPTS
    for prompt in prompts:
        expected = reference(prompt)
        for tokenizer in loaded["tokenizer"]:
            assert tokenizer(prompt, truncation=True).input_ids == expected, prompt
        if "!" not in prompt:
            for tokenizer in loaded["tokenizer_2"]:
                assert tokenizer(prompt, truncation=True).input_ids == expected, prompt
    # Seen words are whole tokens; unseen ones fall back to merges and byte symbols (no unknown token).
    assert clip_l("a photo of a").input_ids[1:-1] == [vocab[w + "</w>"] for w in ("a", "photo", "of", "a")]
    assert vocab[EOS_TOKEN] not in clip_l("a zebra, 42").input_ids[1:-1]
    # tokenizer_2's pad "!" is an added special token, so a "!" in a prompt encodes as id 0 there (as released).
    ids_l = clip_l("sunset!").input_ids
    ids_g = clip_g("sunset!").input_ids
    assert ids_l[-2] == vocab["!</w>"] and ids_g[-2] == 0 and ids_l[:-2] == ids_g[:-2]
    n = len(clip_l("a fox").input_ids)
    padded_l = clip_l("a fox", padding="max_length", max_length=77).input_ids
    padded_g = clip_g("a fox", padding="max_length", max_length=77).input_ids
    assert padded_l[n - 1:] == [vocab[EOS_TOKEN]] * (78 - n)
    assert padded_g[n - 1:] == [vocab[EOS_TOKEN]] + [0] * (77 - n)


def test_unknown_preset():
    with pytest.raises(ModelInputError) as error:
        sd3_pipeline_preset("sd3-huge")
    assert "sd3-huge" in str(error.value)
    for name in SD3_PIPELINE_PRESETS:
        assert name in str(error.value)
    with pytest.raises(ModelInputError, match="sd3-tiny"):
        write_sd3_pipeline_folder("nope", Path("unused"))


@pytest.mark.parametrize("change, message", [
    (dict(clip_g={"projection_dim": 4}), "pooled_projection_dim 16"),
    (dict(clip_l={"hidden_size": 24}), "joint_attention_dim 32"),
    (dict(t5={"d_model": 16}), "T5 width 16"),
    (dict(vae={"latent_channels": 4}), "in_channels 16"),
])
def test_encoders_must_fit_the_transformer(tmp_path, change, message):
    preset = SD3_PIPELINE_PRESETS["sd3-tiny"]
    fields = {key: {**getattr(preset, key), **value} for key, value in change.items()}
    name = "sd3-tiny-misfit-test"
    SD3_PIPELINE_PRESETS[name] = dataclasses.replace(preset, **fields)
    try:
        with pytest.raises(ModelInputError, match=message):
            write_sd3_pipeline_folder(name, tmp_path / "pipeline")
    finally:
        del SD3_PIPELINE_PRESETS[name]
    assert not (tmp_path / "pipeline").exists()

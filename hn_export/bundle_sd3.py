"""The text side of a Stable Diffusion 3 bundle (`hn-export bundle` on a ``StableDiffusion3Pipeline`` folder): three
text encoders and three tokenizers, as the pipeline's ``encode_prompt`` uses them.

- ``text_encoder.onnx`` / ``text_encoder_2.onnx``: the two ``CLIPTextModelWithProjection`` (CLIP-L and CLIP-G in the
  released SD3), `hn_export.bundle_components.clip_encoder_graph`: ``input_ids`` padded to the tokenizer's
  ``model_max_length`` (77) -> the penultimate layer's ``hidden_states`` and the pooled ``text_embeds``;
- ``text_encoder_3.onnx``: the T5 encoder (streamed from safetensors as PixArt-Sigma's, `hn_export.encoder_stream`),
  fed ``max_sequence_length`` tokens with an all-ones mask (diffusers passes no mask to SD3's T5);
- ``tokenizer.json``, ``tokenizer_2.json``, ``tokenizer_3.json``: each converted on the host
  (`hn_export.bundle_components.convert_tokenizer`).

Every encoder is weight-only int8/int4 (``MatMulNBits``) or float, as PixArt-Sigma's T5 (``--encoder-bits``). A
folder without ``text_encoder_3`` (diffusers lets SD3 run without T5, on zeros) is refused: the bundle needs all
three. The checks against the transformer: the two CLIP widths fit in ``joint_attention_dim`` (the runtime
concatenates them and pads with zeros to the T5 width, as diffusers does), the two projections add up to
``pooled_projection_dim``, and T5's ``d_model`` is ``joint_attention_dim``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hn_export.errors import UserError

CLIP_ROLES = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
T5_ROLES = ("text_encoder_3", "tokenizer_3")
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
              "transformer", "vae", "scheduler")
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default
DEFAULT_STEPS = 28  # StableDiffusion3Pipeline's default


def _config(folder: Path, component: str) -> dict[str, Any]:
    from hn_export.bundle_components import read_json

    return read_json(folder / component / "config.json", f"{component} config")


def check_text_encoders(folder: Path, transformer_config: Mapping[str, Any]) -> None:
    """The three encoders' widths against the transformer's (one-line errors before any export)."""
    joint = int(transformer_config["joint_attention_dim"])
    pooled = int(transformer_config["pooled_projection_dim"])
    clip = [_config(folder, role) for role, _ in CLIP_ROLES]
    hidden = [int(c.get("hidden_size", -1)) for c in clip]
    projection = [int(c.get("projection_dim", -1)) for c in clip]
    if sum(hidden) > joint:
        raise UserError(f"the CLIP encoders' widths {hidden[0]} + {hidden[1]} exceed the transformer's "
                        f"joint_attention_dim {joint} in {folder}", "pass a consistent SD3 pipeline folder")
    if sum(projection) != pooled:
        raise UserError(f"the CLIP projections {projection[0]} + {projection[1]} are not the transformer's "
                        f"pooled_projection_dim {pooled} in {folder}", "pass a consistent SD3 pipeline folder")
    d_model = int(_config(folder, T5_ROLES[0]).get("d_model", -1))
    if d_model != joint:
        raise UserError(f"the T5 encoder's width {d_model} is not the transformer's joint_attention_dim {joint} in "
                        f"{folder}", "pass a consistent SD3 pipeline folder")


def convert_tokenizers(folder: Path, staging: Path, entry: Callable[..., Any]) -> tuple[list, dict[str, Any]]:
    """The three tokenizers as ``tokenizer.json``, ``tokenizer_2.json``, ``tokenizer_3.json``; returns their bundle
    entries and the manifest's token settings (pad ids, CLIP lengths)."""
    from hn_export.bundle_components import convert_tokenizer

    entries, clip = [], []
    for _, role in CLIP_ROLES:
        name = f"{role}.json"
        tokens = convert_tokenizer(folder / role, staging / name)
        max_length = tokens["model_max_length"]  # what diffusers pads to (77 for SD3's)
        if not isinstance(max_length, int) or not 2 <= max_length <= 1024:
            raise UserError(f"tokenizer {folder / role} has model_max_length {max_length!r}",
                            "use SD3's CLIP tokenizers (77)")
        clip.append({"max_length": max_length, "pad_token_id": tokens["pad_token_id"],
                     "eos_token_id": tokens["eos_token_id"]})
        entries.append(entry(staging, name, role, method=f"converted from {tokens['class']}"))
    role = T5_ROLES[1]
    t5 = convert_tokenizer(folder / role, staging / f"{role}.json")
    entries.append(entry(staging, f"{role}.json", role, method=f"converted from {t5['class']}"))
    return entries, {"clip": clip, "pad_token_id": t5["pad_token_id"], "eos_token_id": t5["eos_token_id"]}


def export_text_encoders(folder: Path, staging: Path, bits: int | None, block: int,
                         t5_graph: Callable[[Path, str, int | None, int], Any], save: Callable[..., list[Path]],
                         entries_of: Callable[..., list]) -> list:
    """The two CLIP encoders and T5 as ``text_encoder.onnx``, ``text_encoder_2.onnx``, ``text_encoder_3.onnx``
    (weight-only `bits`, or float); returns their bundle entries. `t5_graph(folder, subfolder, bits, block)` is the
    bundle's T5 export (streamed from safetensors); `save` and `entries_of` are the bundle's writers."""
    from hn_export.bundle_components import clip_encoder_graph, quantize_weights

    method = "float32" if bits is None else f"weight-only int{bits} (MatMulNBits, block {block}, symmetric)"
    entries = []
    for role, _ in CLIP_ROLES:
        encoder = _load_clip(folder, role)
        graph = clip_encoder_graph(encoder)
        del encoder
        if bits is not None:
            graph = quantize_weights(graph, bits, block)
        written = save(graph, staging / f"{role}.onnx")
        del graph
        entries += entries_of(staging, written, role, bits=bits or 32, method=method)
    role = T5_ROLES[0]
    graph = t5_graph(folder, role, bits, block)
    written = save(graph, staging / f"{role}.onnx")
    del graph
    entries += entries_of(staging, written, role, bits=bits or 32, method=method)
    return entries


def _load_clip(folder: Path, role: str):
    try:
        from transformers import CLIPTextModelWithProjection
    except ImportError:
        raise UserError("bundling the text encoders needs the transformers package",
                        "pip install 'hn-export[pipeline]'") from None
    import torch

    from hn_export.bundle_components import load_component

    model = load_component(f"text encoder {role}", folder, lambda: CLIPTextModelWithProjection.from_pretrained(
        folder / role, local_files_only=True, torch_dtype=torch.float32))
    return model.float().eval()

"""The non-transformer parts of a text-to-image bundle, exported on the host: the T5 text encoder (float, or
weight-only int8/int4 with onnxruntime's ``MatMulNBits``), the VAE decoder, the tokenizer (``tokenizer.json`` for
the ``tokenizers`` package) and the scheduler config.

Graphs (opset 21, IR 10, torch.export + the dynamo exporter, as `hn_export.export`):

- ``text_encoder.onnx``: inputs ``input_ids`` [batch, sequence] int64 and ``attention_mask`` [batch, sequence]
  int64; output ``last_hidden_state`` [batch, sequence, d_model] float32 (T5EncoderModel's).
- ``text_encoder*.onnx`` of SD3's CLIP encoders: input ``input_ids`` [batch, sequence]; outputs ``hidden_states``
  (the penultimate layer's) and ``text_embeds`` (pooled, projected), as StableDiffusion3Pipeline reads them.
- ``vae_decoder.onnx``: input ``latents`` [batch, channels, height, width] (the denoised latents, before the
  ``1 / scaling_factor``); output ``sample`` [batch, 3, f*height, f*width] in [-1, 1]: ``latents / scaling_factor
  (+ shift_factor) -> post_quant_conv -> decoder``, as the pipelines do before ``AutoencoderKL.decode``. Height and width are dynamic (one file for every
  size; the runtime's tiled decode feeds it tiles).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes.domain import ONNX_OPSET
from hn_export.errors import UserError
from hn_export.export import name_dynamic_dims, quiet_tracing
from hn_export.metadata_keys import ROLE_KEY, WEIGHT_BITS_KEY
from hn_export.model_files import IR_VERSION
from models.families import InputSpec

logger = logging.getLogger(__name__)

ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUT = "last_hidden_state"
CLIP_OUTPUTS = ("hidden_states", "text_embeds")  # SD3's CLIP encoders: penultimate hidden states, pooled projection
VAE_INPUT, VAE_OUTPUT = "latents", "sample"
ENCODER_BITS = (4, 8)
# The default weight-only precision of the text encoder: int8 (tests/test_bundle.py measures encoder-output SQNR
# on the test pipeline: int8 41 dB, int4 17 dB; the int4 error is as large as the W4A4 transformer's).
DEFAULT_ENCODER_BITS = 8
DEFAULT_ENCODER_BLOCK = 128


def _trace(module, args: tuple, dynamic: tuple, names: list[str], output: str | list[str],
           specs: tuple[InputSpec, ...], optimize: bool = True):
    import torch

    outputs = [output] if isinstance(output, str) else list(output)
    with quiet_tracing(), torch.no_grad():
        exported = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
        program = torch.onnx.export(exported, (), dynamo=True, opset_version=ONNX_OPSET, input_names=names,
                                    output_names=outputs, verbose=False, external_data=True, optimize=optimize)
    model = program.model
    name_dynamic_dims(model, specs)
    model.ir_version = IR_VERSION
    return model


def text_encoder_graph(encoder, optimize: bool = True) -> ir.Model:
    """A transformers ``T5EncoderModel`` (float32, eval) as an onnx_ir Model with dynamic batch and sequence.
    ``optimize=False``: without the exporter's optimizer (`hn_export.encoder_stream` exports a weightless module on
    the meta device and optimizes after its weights are made lazy)."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.encoder = model

        def forward(self, input_ids, attention_mask):
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.arange(18, dtype=torch.int64).reshape(2, 9) % max(int(encoder.config.vocab_size) - 3, 1) + 3
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, 5:] = 0
    batch, sequence = torch.export.Dim("batch", max=4095), torch.export.Dim("sequence", min=2, max=8191)
    dims = {0: "batch", 1: "sequence"}
    specs = tuple(InputSpec(name, dims) for name in ENCODER_INPUTS)
    model = _trace(Encoder(encoder.float().eval()), (ids, mask), ({0: batch, 1: sequence}, {0: batch, 1: sequence}),
                   list(ENCODER_INPUTS), ENCODER_OUTPUT, specs, optimize)
    model.metadata_props[ROLE_KEY] = "text_encoder"
    return model


def clip_encoder_graph(encoder) -> ir.Model:
    """A transformers ``CLIPTextModelWithProjection`` (float32, eval) as SD3's pipeline uses it: input ``input_ids``
    [batch, sequence] int64 (padded to the tokenizer's 77, no attention mask, as diffusers feeds it); outputs
    ``hidden_states`` [batch, sequence, hidden] (the penultimate layer's, ``hidden_states[-2]``) and ``text_embeds``
    [batch, projection] (the end-of-text token's projected features)."""
    import torch

    class ClipEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.encoder = model

        def forward(self, input_ids):
            out = self.encoder(input_ids=input_ids, output_hidden_states=True)
            return out.hidden_states[-2], out.text_embeds

    length = int(encoder.config.max_position_embeddings)
    vocab = int(encoder.config.vocab_size)
    ids = (torch.arange(2 * length, dtype=torch.int64).reshape(2, length) * 7) % max(vocab - 2, 1)
    ids[:, 5] = vocab - 1  # an end-of-text id in each row
    batch, sequence = torch.export.Dim("batch", max=4095), torch.export.Dim("sequence", min=2, max=length)
    specs = (InputSpec("input_ids", {0: "batch", 1: "sequence"}),)
    model = _trace(ClipEncoder(encoder.float().eval()), (ids,), ({0: batch, 1: sequence},), ["input_ids"],
                   list(CLIP_OUTPUTS), specs)
    model.metadata_props[ROLE_KEY] = "text_encoder"
    return model


def vae_decoder_graph(vae) -> ir.Model:
    """``AutoencoderKL.decode`` (``latents / scaling_factor (+ shift_factor) -> post_quant_conv -> decoder``) with
    dynamic batch, height and width (``shift_factor``: SD3's VAE; none for PixArt's)."""
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.vae = model
            self.scale = float(model.config.scaling_factor)
            shift = getattr(model.config, "shift_factor", None)
            self.shift = float(shift) if shift else None

        def forward(self, latents):
            z = latents / self.scale
            if self.shift is not None:
                z = z + self.shift
            if self.vae.post_quant_conv is not None:
                z = self.vae.post_quant_conv(z)
            return self.vae.decoder(z)

    channels = int(vae.config.latent_channels)
    example = torch.randn(2, channels, 10, 12, generator=torch.Generator().manual_seed(0))
    dynamic = ({0: torch.export.Dim("batch", max=63), 2: torch.export.Dim("height", min=2, max=4095),
                3: torch.export.Dim("width", min=2, max=4095)},)
    specs = (InputSpec(VAE_INPUT, {0: "batch", 2: "height", 3: "width"}),)
    model = _trace(Decoder(vae.float().eval()), (example,), dynamic, [VAE_INPUT], VAE_OUTPUT, specs)
    model.metadata_props[ROLE_KEY] = "vae_decoder"
    return model


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A pipeline folder's JSON object (model_index.json, a config): one-line errors for a bad file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} {path} is not readable JSON ({type(exc).__name__})",
                        "pass a diffusers pipeline folder written by save_pretrained") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a JSON object", "pass a diffusers pipeline folder")
    return data


def load_component(what: str, folder: Path, loader):
    """`loader()` (a from_pretrained of one pipeline component) with diffusers' and transformers' logging quiet; its
    errors as one-line `UserError`s."""
    import diffusers

    level = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    try:
        from transformers.utils import logging as tlogging

        tlevel = tlogging.get_verbosity()
        tlogging.set_verbosity_error()
        tlogging.disable_progress_bar()
    except ImportError:
        tlogging = None
    try:
        return loader()
    except UserError:
        raise
    except Exception as exc:  # torch / safetensors / transformers raise many types for bad files
        first = " ".join(str(exc).split())[:200]
        raise UserError(f"cannot load the {what} in {folder} ({type(exc).__name__}: {first})",
                        "check that the pipeline folder is complete and its weights match the configs") from None
    finally:
        diffusers.logging.set_verbosity(level)
        if tlogging is not None:
            tlogging.set_verbosity(tlevel)
            tlogging.enable_progress_bar()


def check_encoder_options(bits: int, block_size: int) -> None:
    if bits not in ENCODER_BITS:
        raise UserError(f"--encoder-bits {bits} is not supported", f"use one of {', '.join(map(str, ENCODER_BITS))}")
    if block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"--encoder-block {block_size} is not a power of two >= 16", "use e.g. 128 (MatMulNBits)")


def quantize_weights(model: ir.Model, bits: int, block_size: int = DEFAULT_ENCODER_BLOCK) -> ir.Model:
    """Weight-only quantization of every MatMul with a constant weight to `bits` (4 or 8), blocks of `block_size`
    along the input axis, symmetric: onnxruntime's ``MatMulNBitsQuantizer`` (``com.microsoft.MatMulNBits``, which
    stock onnxruntime runs with the weights packed in memory). Embedding tables (Gather) stay float."""
    check_encoder_options(bits, block_size)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if not handlers:  # undo the logging.basicConfig(level=INFO) its import makes on an unconfigured root logger
        root.handlers[:] = []
        root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)  # one INFO line per MatMul
    metadata = dict(model.metadata_props)
    proto = ir.serde.serialize_model(model)
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=True)
    quantizer.process()
    quantized = quantizer.model.model
    onnx.checker.check_model(quantized)
    out = ir.serde.deserialize_model(quantized)
    out.ir_version = IR_VERSION
    out.metadata_props.update(metadata)
    out.metadata_props[WEIGHT_BITS_KEY] = str(bits)
    return out


def count_ops(model: ir.Model, op_type: str) -> int:
    return sum(1 for node in model.graph if node.op_type == op_type)


def convert_tokenizer(folder: Path, output: Path) -> dict:
    """The checkpoint's tokenizer (``spiece.model`` converted by transformers on this machine, or its
    ``tokenizer.json``) saved as a plain ``tokenizers`` file: no padding or truncation in it (the runtime pads and
    truncates), the T5 post-processor (``</s>`` appended) kept. Returns the special token ids."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError("converting the tokenizer needs the transformers package",
                        "pip install 'hn-export[pipeline]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, use_fast=True)
        backend = tokenizer.backend_tokenizer
    except Exception as exc:  # transformers / sentencepiece / protobuf raise many types
        first = " ".join(str(exc).split())[:200]
        raise UserError(f"cannot read the tokenizer in {folder} ({type(exc).__name__}: {first})",
                        "pass a pipeline folder whose tokenizer/ holds spiece.model or tokenizer.json "
                        "(converting spiece.model needs the sentencepiece package)") from None
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(output))
    pad = tokenizer.pad_token_id
    return {"pad_token_id": int(pad if pad is not None else 0), "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": backend.get_vocab_size(with_added_tokens=True), "class": type(tokenizer).__name__,
            "model_max_length": tokenizer.model_max_length}


def encoder_sqnr(reference: Path, candidate: Path, vocab_size: int, seed: int = 0, length: int = 40) -> float:
    """Encoder-output SQNR (dB) of `candidate` against `reference` on seeded token ids (for reports and tests)."""
    from runtime.session import create_session

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, max(vocab_size, 4), (2, length), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref = create_session(reference).run(None, feeds)[0].astype(np.float64)
    out = create_session(candidate).run(None, feeds)[0].astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / max(np.sum((out - ref) ** 2), 1e-30)))

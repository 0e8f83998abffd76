"""Export a diffusers transformer of any supported family to ONNX (opset 21, IR 10) that onnxruntime loads and that
matches torch.

Steps (shown as a tqdm bar when ``progress=True``):

1. trace: `torch.export.export` (non-strict) of a thin wrapper whose attribute is named ``transformer``, so module
   paths in the node metadata (``metadata_props["namespace"]``) read ``transformer.transformer_blocks.0.attn1.to_q``.
2. translate: `torch.onnx.export(exported_program, dynamo=True, opset_version=21)` decomposes to ATen and translates
   to ONNX; the result (`ONNXProgram.model`) is an onnx_ir Model.
3. fix: `graph_passes.fix_noop_squeeze.FixNoopSqueezePass` turns diffusers' no-op ``squeeze(1)`` (a Squeeze on the
   token dimension, which onnxruntime refuses to load) into Identity; the IR version is pinned to 10 (onnxruntime
   1.31 reads at most 13, onnx 1.23 would write 14).
4. save: `hn_export.model_files.save_model`, atomic; weights go to ``<name>.onnx.data`` above ~1.8 GB.

Graph interface: the inputs of the model's family (`models.families`, `ModelFamily.input_specs`), named as the
diffusers forward arguments; for PixArt:

- ``hidden_states`` [B, in_channels, H, W] float, ``timestep`` [B] float, ``encoder_hidden_states`` [B, L, caption
  channels] float, and with ``with_mask=True`` ``encoder_attention_mask`` [B, L] float (1 keep, 0 drop).
- output ``sample`` [B, out_channels, H, W].
- B and L are dynamic (`torch.export.Dim`); H and W are fixed at export (the positional embedding is computed at
  trace time: one file per resolution): the model's own square ``sample_size``, or ``latent_hw=(H, W)`` for a
  family that traces any latent size (`ModelFamily.any_latent_hw`: PixArt; the graph then holds the embedding
  diffusers computes when it runs the model at H x W).
- the family's name is stored in the model metadata (``hn_export.family``).
- With ``with_mask=True`` every shape is static (B=2, L=`MASK_CAPTION_LENGTH`): torch.export with the attention mask
  and dynamic shapes fails (torch 2.13), a static export works.
- ``fp16=True`` exports the model in float16 (a float16 reference graph; inputs and output are float16). A model that
  is already float16 is exported as is; a float32 one is copied first (the caller's model is not changed; convert it
  yourself with ``model.half()`` to save the copy's memory).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import sys
import warnings
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn

from graph_passes.domain import ONNX_OPSET
from graph_passes.fix_noop_squeeze import FixNoopSqueezePass
from hn_export.metadata_keys import FAMILY_KEY
from hn_export.model_files import IR_VERSION, check_output_path, save_model
from models.build import family_of_model
from models.errors import ModelInputError
from models.families import InputSpec, ModelFamily

logger = logging.getLogger(__name__)

OUTPUT_NAME = "sample"
EXAMPLE_BATCH = 2  # not 0 or 1: torch.export specialises those sizes
EXAMPLE_CAPTION_LENGTH = 9  # an odd size that no other dimension of the model has
MASK_CAPTION_LENGTH = 120  # static caption length of the masked export (PixArt-Alpha's T5 length; Sigma uses 300)


class TransformerForExport(nn.Module):
    """Calls the diffusers transformer with the graph inputs (positional, in `names` order); returns the sample."""

    def __init__(self, transformer: nn.Module, family: ModelFamily, names: list[str]):
        super().__init__()
        self.transformer = transformer
        self._family = family
        self._names = names

    def forward(self, *args):
        return self._family.forward(self.transformer, dict(zip(self._names, args)))


def example_inputs(model: nn.Module, family: ModelFamily, dtype: torch.dtype, with_mask: bool,
                   latent_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Example inputs for tracing, named as the graph inputs, at latent (height, width) `latent_hw` (None: the
    model's own square size)."""
    length = MASK_CAPTION_LENGTH if with_mask else EXAMPLE_CAPTION_LENGTH
    return family.example_inputs_at(model, EXAMPLE_BATCH, length, 0, dtype, with_mask, latent_hw)


def dynamic_shapes(specs: tuple[InputSpec, ...]) -> tuple | None:
    """torch.export dynamic shapes (positional) for the family's inputs; None when every shape is static."""
    if not any(spec.dynamic for spec in specs):
        return None
    dims = {"batch": torch.export.Dim("batch", min=1, max=4096),
            "caption_length": torch.export.Dim("caption_length", min=1, max=8192)}
    out = []
    for spec in specs:
        axes = {}
        for axis, symbol in spec.dynamic.items():
            if symbol not in dims:
                dims[symbol] = torch.export.Dim(symbol, min=1, max=1 << 16)
            axes[axis] = dims[symbol]
        out.append(axes or None)
    return (tuple(out),)  # one entry: the wrapper's *args


@contextlib.contextmanager
def quiet_tracing():
    """Silence torch's and diffusers' own export chatter (warnings, log lines, prints)."""
    names = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "diffusers", "onnxscript", "onnx_ir")
    saved = {}
    for name in names:
        lg = logging.getLogger(name)
        saved[name] = lg.level
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(sink):
                yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if sink.getvalue().strip():
            logger.debug("exporter output:\n%s", sink.getvalue())


def name_dynamic_dims(model: ir.Model, specs: tuple[InputSpec, ...]) -> None:
    """Rename the exporter's symbols (``s47``...) of the dynamic dimensions to the family's names (``batch``...)."""
    inputs = {v.name: v for v in model.graph.inputs}
    renames: dict[str, str] = {}
    for input_name, axis, new in ((s.name, a, sym) for s in specs for a, sym in s.dynamic.items()):
        value = inputs.get(input_name)
        if value is None or value.shape is None:
            continue
        dim = value.shape[axis]
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            renames[dim.value] = new
    if not renames:
        return
    for value in _all_values(model.graph):
        if value.shape is None:
            continue
        dims = list(value.shape.dims)
        changed = False
        for i, dim in enumerate(dims):
            if isinstance(dim, ir.SymbolicDim) and dim.value in renames:
                dims[i] = renames[dim.value]
                changed = True
        if changed:
            value.shape = ir.Shape(dims)


def _all_values(graph: ir.Graph):
    seen: set[int] = set()
    for value in [*graph.inputs, *graph.outputs]:
        if id(value) not in seen:
            seen.add(id(value))
            yield value
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:
            if id(value) not in seen:
                seen.add(id(value))
                yield value


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _prepare(model: nn.Module, fp16: bool) -> nn.Module:
    dtype = _model_dtype(model)
    if fp16 and dtype != torch.float16:
        with quiet_tracing():
            model = copy.deepcopy(model).half()
    elif not fp16 and dtype != torch.float32:
        raise ValueError(f"the model is {dtype}; pass fp16=True for a float16 model or convert it to float32")
    return model.eval()


def to_onnx(model: nn.Module, *, fp16: bool = False, with_mask: bool = False, progress=None,
            latent_hw: tuple[int, int] | None = None) -> ir.Model:
    """Trace, translate and fix `model` at latent (height, width) `latent_hw` (None: the model's own square size);
    returns the onnx_ir Model (not written). A size the family cannot trace raises `ModelInputError`."""
    family = family_of_model(model)
    if with_mask and not family.supports_mask:
        raise ModelInputError(f"--with-mask: the {family.name} family's export has no encoder_attention_mask input",
                              "leave out --with-mask")
    family.check_latent_hw(model, latent_hw)  # before the fp16 copy
    model = _prepare(model, fp16)
    dtype = torch.float16 if fp16 else torch.float32
    specs = family.input_specs(model, with_mask)
    names = [spec.name for spec in specs]
    wrapper = TransformerForExport(model, family, names).eval()
    inputs = example_inputs(model, family, dtype, with_mask, latent_hw)
    args = tuple(inputs[name] for name in names)
    shapes = dynamic_shapes(specs)

    def stage(name: str) -> None:
        if progress is not None:
            progress.set_postfix_str(name, refresh=True)

    with quiet_tracing(), torch.no_grad():
        stage("trace")
        exported = torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False)
        if progress is not None:
            progress.update(1)
        stage("decompose/translate")
        program = torch.onnx.export(
            exported,
            (),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=names,
            output_names=[OUTPUT_NAME],
            verbose=False,
            external_data=True,
        )
        if progress is not None:
            progress.update(1)
    stage("fix")
    onnx_model = program.model
    FixNoopSqueezePass()(onnx_model)
    name_dynamic_dims(onnx_model, specs)
    onnx_model.metadata_props[FAMILY_KEY] = family.name
    onnx_model.ir_version = IR_VERSION
    if progress is not None:
        progress.update(1)
    return onnx_model


def export_transformer(
    model: nn.Module,
    path: str | Path,
    *,
    fp16: bool = False,
    with_mask: bool = False,
    progress: bool = True,
    metadata: dict[str, str] | None = None,
    latent_hw: tuple[int, int] | None = None,
) -> list[Path]:
    """Export a diffusers transformer of a supported family to `path`; returns the files written (.onnx [+ .data]).

    `metadata` entries are stored in the model's ``metadata_props``. `latent_hw`: the latent (height, width) traced
    (None: the model's own square size; another size needs a family with ``any_latent_hw``, else `ModelInputError`).
    """
    path = Path(path)
    check_output_path(path)
    from tqdm import tqdm

    with tqdm(total=4, desc=f"export {path.name}", unit="stage", disable=not progress, file=sys.stderr,
              bar_format="{desc}: stage {n_fmt}/{total_fmt}{postfix} [{elapsed}]") as bar:
        onnx_model = to_onnx(model, fp16=fp16, with_mask=with_mask, progress=bar, latent_hw=latent_hw)
        for key, value in (metadata or {}).items():
            onnx_model.metadata_props[key] = str(value)
        bar.set_postfix_str("save", refresh=True)
        files = save_model(onnx_model, path)
        bar.update(1)
        bar.set_postfix_str("done")
    logger.info("exported %s", ", ".join(str(f) for f in files))
    return files

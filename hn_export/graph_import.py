"""Bring an ONNX graph from any exporter into the form the passes expect: opset 21, IR 10, loadable, linears as MatMul.

`import_graph(model)` applies, in order:

1. opset: a default-domain opset below 21 is converted to 21 with onnx's version converter
   (`graph_passes.convert_opset`, weights untouched, so external data stays on disk) and a warning names both
   opsets; what the converter cannot convert is refused with a one-line `UserError` (exit code 2, nothing written).
   torch's TorchScript exporter (``dynamo=False``, what optimum uses) writes opset 17 or 18 by default. Opsets
   above 21 are refused (one line): going down is not attempted (opset 23 exports hold ``Attention``, which 21 lacks).
2. no-op Squeeze: `graph_passes.fix_noop_squeeze.FixNoopSqueezePass` (both torch exporters turn diffusers'
   ``squeeze(1)`` into a Squeeze onnxruntime refuses to load; the TorchScript exporter wraps it in an ``If``).
3. Gemm linears: `graph_passes.gemm_to_matmul.GemmToMatMulPass` rewrites ``Gemm(x, W, b, transB=1)`` as
   ``MatMul(x, W^T) + b`` so that linears on 2-D inputs (timestep embeddings, adaLN modulation) can be sites.
4. IR version 10 (what onnxruntime 1.20+ loads and the passes write); a converted model may come back at IR 8.

A graph written by `hn-export export` is already in that form: only step 3 changes it (its three timestep-embedding
linears become MatMul + Add: the same arithmetic, see `GemmToMatMulPass`).

What is *not* recovered here: module paths. `graph_passes.linears.module_path_of` reads them from the dynamo
exporter's metadata, from the TorchScript exporter's scoped node names (``/transformer_blocks.0/attn1/to_q/MatMul``)
or from parameter-named weights; a graph with none of these (names stripped by an optimizer) still quantizes, with
the generic role ``linear`` and a warning (`hn_export.families.roles_for`).

`load_graph(path)` is `hn_export.model_files.load_model` for such graphs: the same checks (missing, empty, corrupt
file, missing external data, IR version) except the opset, which `import_graph` converts instead of refusing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx_ir as ir

from graph_passes.attention_op import OP_TYPE as ATTENTION_OP
from graph_passes.convert_opset import convert_opset, default_opset
from graph_passes.errors import GraphInputError, from_pass_error
from graph_passes.fix_noop_squeeze import FixNoopSqueezePass
from graph_passes.gemm_to_matmul import GemmToMatMulPass
from hn_export import model_files
from hn_export.errors import UserError
from hn_export.metadata_keys import BITS_KEY, METHOD_KEY
from runtime.domain import HADANORM_DOMAIN

logger = logging.getLogger(__name__)

OPSET = model_files.MAX_OPSET  # 21: blocked QuantizeLinear


def import_graph(model: ir.Model, source: str = "the model") -> ir.Model:
    """`model` at opset 21 and IR 10 with the exporter fixes applied (the same object unless the opset changed).

    `source` names the graph in the warning and the error (e.g. the file name). Raises `UserError` when the
    opset cannot be converted."""
    opset = default_opset(model)
    if opset is None:
        raise UserError(f"{source} imports no ONNX (ai.onnx) opset, so it is not a model hn-export can read",
                        f"export it with torch.onnx.export(..., opset_version={OPSET}) or `hn-export export`")
    if opset > OPSET:  # down-conversion is not attempted: newer opsets bring ops (Attention, ...) 21 lacks
        raise UserError(f"{source} uses ONNX opset {opset}, newer than opset {OPSET}, which hn-export reads and writes",
                        f"re-export it at opset {OPSET}: torch.onnx.export(..., opset_version={OPSET}) or "
                        "`hn-export export`")
    if opset < OPSET:
        try:
            model = convert_opset(model, OPSET)
        except GraphInputError as exc:
            raise UserError(f"{source}: {exc}") from None
        logger.warning("%s uses ONNX opset %d: converted to opset %d with onnx.version_converter (hn-export reads "
                       "and writes opset %d)", source, opset, OPSET, OPSET)
    try:
        FixNoopSqueezePass()(model)
        GemmToMatMulPass()(model)
    except ir.passes.PassError as exc:  # a failed pre- or postcondition: one line
        raise UserError(f"{source}: {from_pass_error(exc)}") from None
    model.ir_version = model_files.IR_VERSION
    return model


def load_graph(path: str | os.PathLike, what: str = "model") -> ir.Model:
    """Load a user's graph from any exporter: `load_model`'s checks, then `import_graph`."""
    path = Path(path)
    loaded = _load_any_opset(path, what)
    return model_files.keep_input_files(loaded, import_graph(loaded, source=str(path)))


def _load_any_opset(path: Path, what: str) -> ir.Model:
    """`model_files.load_model` without its opset check (import_graph converts what that check refuses)."""
    return model_files.load_model(path, what, any_opset=True)


QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits",
                           "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearConv", "ConvInteger"})


def check_float_graph(model: ir.Model, source: str) -> None:
    """Refuse a graph that is already quantized (by hn-export, or Q/DQ or integer ops of another tool): quantizing
    or calibrating it again would stack a second rounding on the first."""
    method = model.metadata_props.get(METHOD_KEY)
    if method is not None:
        bits = model.metadata_props.get(BITS_KEY, "?")
        raise UserError(f"{source} was already quantized by hn-export (method {method}, {bits})",
                        "pass the float graph it was made from (the one `hn-export export` wrote)")
    found = sorted({node.op_type for node in model.graph.all_nodes() if node.op_type in QUANTIZED_OPS
                    and node.domain in ("", "ai.onnx", "com.microsoft")}
                   | {node.op_type for node in model.graph.all_nodes()
                      if node.domain == HADANORM_DOMAIN and node.op_type != ATTENTION_OP})  # fused attention: float
    if found:
        raise UserError(f"{source} is already quantized (it holds {', '.join(found[:4])})",
                        "pass the float graph it was made from")

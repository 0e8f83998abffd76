"""Pass: ``Add(Mul(gate, IntMatMul{4,8}[LowRank](...)), residual)`` becomes one
``IntMatMul{4,8}[LowRank]GatedResidual(..., gate, residual)``, and ``Add(IntMatMul{4,8}[LowRank](...), residual)``
one ``IntMatMul{4,8}[LowRank]Residual(..., residual)`` (`graph_passes.int_ops`).

What: a DiT block adds each attention's and the feed-forward's output back into the residual stream, gated per batch
element and channel by the adaLN modulation (``h = h + gate * (W x + b)``, PixArt's ``gate_msa`` / ``gate_mlp``) or
not (cross-attention, ``h = h + W x + b``). In the ``fused`` format ``W x + b`` is an integer matmul; its kernel
applies ``y = residual + gate * y`` (or ``residual + y``) to each task's output rows while they are in the core's
cache, instead of onnxruntime's ``Mul`` and ``Add`` each re-reading and re-writing the whole ``[B, N, d]`` stream.

The maths is the graph's: the op's function body is the matmul's body, then the same ``Mul`` and ``Add``; the kernel
rounds the product, then the sum, as those ops do (float32: the same bits; float16: one rounding to half at the end
instead of two).

Matched from graph structure only: the matmul's output is read only by the ``Mul`` (or the ``Add``), the ``Mul``'s
output only by the ``Add``, neither is a graph output; ``gate`` has shape ``[N]`` or ``[..., 1, N]`` with the output's
leading dimensions (the kernel's per-batch bias convention), and ``residual`` exactly the output's shape (no
broadcasting), both with the output's element type, all known in the graph's value info. Anything else stays as it
is (logged). Runs after the low-rank fusion (the epilogue adds the low-rank term first) and before nothing that
reads the removed nodes.

Why: in PixArt-Sigma's ``fused`` graph at 256 px these ``Mul`` and ``Add`` nodes were 1.9 ms of a 62 ms call
(4 blocks, 2 threads: 8 Mul, 12 Add, about 0.09 and 0.12 ms each; `benchmarks/profile_ops.py`). One linear alone,
one thread (`python benchmarks/bench_ops_ab.py residual [--k 4608] LIB`): [2, 256, 1152] x [1152, 1152] 1.55 ->
1.30 ms, [2, 256, 4608] x [4608, 1152] 4.45 -> 4.11 ms (unfused -> fused, busy host).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from graph_passes.domain import HADANORM_DOMAIN
from graph_passes.graph_utils import is_row_of, is_standard_binary, known_dims, only_reader
from graph_passes.int_ops import MatMulOp, MatMulResidual, replace_matmul

logger = logging.getLogger(__name__)

_INT_MATMULS = {f"IntMatMul{bits}{lr}": (bits, bool(lr)) for bits in (4, 8) for lr in ("", "LowRank")}


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The input of the two-input `node` that is not `value` (None when both are)."""
    first, second = node.inputs
    if first is value and second is not value:
        return second
    if second is value and first is not value:
        return first
    return None


def _same_type(a: ir.Value, b: ir.Value) -> bool:
    return a.dtype is not None and a.dtype == b.dtype


def _residual_site(matmul: ir.Node) -> tuple[MatMulResidual, list[ir.Value], ir.Node, list[ir.Node]] | None:
    """(form, the new inputs after the matmul's, the Add whose output the op takes over, the nodes it absorbs)."""
    y = matmul.outputs[0]
    out_dims = known_dims(y)
    reader = only_reader(y)
    if out_dims is None or reader is None:
        return None
    if is_standard_binary(reader, "Mul"):
        gate = _other(reader, y)
        add = only_reader(reader.outputs[0])
        if gate is None or not is_standard_binary(add, "Add"):
            return None
        residual = _other(add, reader.outputs[0])
        if (residual is None or not is_row_of(known_dims(gate), out_dims) or known_dims(residual) != out_dims
                or known_dims(add.outputs[0]) != out_dims or not _same_type(gate, y) or not _same_type(residual, y)):
            return None
        return MatMulResidual.GATED, [gate, residual], add, [add, reader, matmul]
    if is_standard_binary(reader, "Add"):
        residual = _other(reader, y)
        if (residual is None or known_dims(residual) != out_dims or known_dims(reader.outputs[0]) != out_dims
                or not _same_type(residual, y)):
            return None
        return MatMulResidual.ADD, [residual], reader, [reader, matmul]
    return None


class FuseMatMulResidualPass(ir.passes.InPlacePass):
    """Fuse a gated (or plain) residual add into the integer matmul whose output it adds (main graph)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fused = 0
        for node in list(graph):
            form = _INT_MATMULS.get(node.op_type) if node.domain == HADANORM_DOMAIN else None
            if form is None:
                continue
            site = _residual_site(node)
            if site is None:
                continue
            residual, extra, add, removed = site
            spec = MatMulOp(form[0], True, low_rank=form[1], residual=residual)
            replace_matmul(model, node, spec, [*node.inputs, *extra], add.outputs[0], removed)
            fused += 1
        if fused:
            logger.info("fused %d residual adds into their integer matmuls", fused)
        return ir.passes.PassResult(model, modified=fused > 0)

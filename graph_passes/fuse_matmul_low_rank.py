"""Pass: ``Add(IntMatMul{4,8}(...), MatMul(t, right))`` becomes one ``IntMatMul{4,8}LowRank(..., t, right)``.

What: the second product and the Add of a low-rank branch (`graph_passes.low_rank`: ``y + (x A) Q``, written by the
emitters as ``MatMul(MatMul(x, A), Q)`` and an ``Add`` after the linear) move into the integer matmul of the
``fused`` format: its kernel adds ``t @ right`` (``t = x A`` ``[..., M, r]``, ``right = Q`` ``[r, N]``, a constant)
to each task's output while it is in the core's cache, before a fused activation. Matched when the matmul's output
and the branch's product are each read only by that Add (and are not graph outputs). The maths is unchanged: the
op's function body is the matmul's body plus ``MatMul(t, right)``.

Why: as separate nodes the branch re-read and re-wrote every ``[B, N, out]`` output (the Add) and ran a narrow
``[M, r] x [r, out]`` sgemm per linear: rank 32 added about a third to a PixArt-Sigma call; the first product
``x A`` (``[M, in] x [in, r]``) stays an onnxruntime MatMul.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from graph_passes.domain import HADANORM_DOMAIN
from graph_passes.graph_utils import only_reader
from graph_passes.int_ops import MatMulOp, replace_matmul

logger = logging.getLogger(__name__)

_INT_MATMULS = {f"IntMatMul{bits}": bits for bits in (4, 8)}


def _constant_2d(value: ir.Value | None) -> tuple[int, int] | None:
    if value is None or value.const_value is None or len(value.const_value.shape) != 2:
        return None
    return tuple(int(d) for d in value.const_value.shape)


def _branch_product(add: ir.Node, matmul: ir.Node) -> ir.Node | None:
    """The ``MatMul(t, right)`` that `add` adds to `matmul`'s output, when it is a low-rank branch as the emitters
    write it: ``right`` a constant [r, N] (N the matmul's output width), ``t = MatMul(x, left)`` with ``x`` the
    activation the matmul's site reads and ``left`` a constant [K, r]; read only there. Anything else (another
    broadcast shape, another product) stays as it is: the kernel's epilogue takes exactly [..., M, r] x [r, N]."""
    main = matmul.outputs[0]
    if add.domain not in ("", "ai.onnx") or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is main else add.inputs[0]
    product = other.producer() if other is not None else None
    if product is None or product.op_type != "MatMul" or product.domain not in ("", "ai.onnx"):
        return None
    right, scales = _constant_2d(product.inputs[1]), _constant_2d(matmul.inputs[4])
    if right is None or scales is None or right[1] != scales[1] or only_reader(other) is None:
        return None
    down = product.inputs[0].producer() if product.inputs[0] is not None else None
    if down is None or down.op_type != "MatMul" or down.domain not in ("", "ai.onnx"):
        return None
    left = _constant_2d(down.inputs[1])
    if left is None or left[1] != right[0] or only_reader(product.inputs[0]) is None:
        return None
    return product


class FuseMatMulLowRankPass(ir.passes.InPlacePass):
    """Fuse a low-rank branch's ``MatMul(t, right)`` and ``Add`` into the integer matmul it is added to."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fused = 0
        for node in list(graph):
            bits = _INT_MATMULS.get(node.op_type) if node.domain == HADANORM_DOMAIN else None
            if bits is None:
                continue
            add = only_reader(node.outputs[0])
            product = _branch_product(add, node) if add is not None else None
            if product is None:
                continue
            replace_matmul(model, node, MatMulOp(bits, True, low_rank=True), [*node.inputs, *product.inputs],
                           add.outputs[0], [add, product, node])
            fused += 1
        if fused:
            logger.info("fused %d low-rank branches into their integer matmuls", fused)
        return ir.passes.PassResult(model, modified=fused > 0)

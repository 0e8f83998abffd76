"""Pass: ``IntMatMul{4,8}[LowRank] -> Gelu(approximate="tanh")`` becomes one ``IntMatMul{4,8}[LowRank]Gelu``
(`graph_passes.int_ops`).

What: an integer matmul of the ``fused`` format whose output is read only by an ONNX ``Gelu`` with
``approximate="tanh"`` (and is not a graph output) is replaced by the same op with the activation in its name; the
Gelu goes and its readers read the new op. The maths is unchanged: the new op's function body is the matmul's body
followed by the same ``Gelu``; the kernel library applies gelu to each task's output rows while they are in the
core's cache (a tanh approximation within a few ulp of onnxruntime's, `runtime/kernels/portable_loops.h`), instead
of a second pass over the ``[B, N, 4 d]`` feed-forward activation.

Why: in PixArt-Sigma's feed-forward ``Gelu`` was 5% of a ``fused`` call (onnxruntime's Gelu re-reads and re-writes
the 4x-wide activation); sites are found from graph structure (the matmul op and its reader), whatever the family.
Exact-erf ``Gelu`` (``approximate="none"``) and other activations stay as they are.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from graph_passes.domain import HADANORM_DOMAIN
from graph_passes.int_ops import MatMulActivation, MatMulOp, replace_matmul

logger = logging.getLogger(__name__)

_INT_MATMULS = {f"IntMatMul{bits}{lr}": (bits, bool(lr)) for bits in (4, 8) for lr in ("", "LowRank")}


def _gelu_tanh_reader(value: ir.Value) -> ir.Node | None:
    """The only reader of `value` when it is ``Gelu(approximate="tanh")`` and `value` is not a graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.domain not in ("", "ai.onnx") or node.op_type != "Gelu":
        return None
    approximate = node.attributes.get("approximate")
    return node if approximate is not None and approximate.as_string() == "tanh" else None


class FuseMatMulActivationPass(ir.passes.InPlacePass):
    """Fuse ``Gelu(approximate="tanh")`` into the integer matmul that feeds it (main graph)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fused = 0
        for node in list(graph):
            form = _INT_MATMULS.get(node.op_type) if node.domain == HADANORM_DOMAIN else None
            if form is None:
                continue
            gelu = _gelu_tanh_reader(node.outputs[0])
            if gelu is None:
                continue
            spec = MatMulOp(form[0], True, MatMulActivation.GELU_TANH, low_rank=form[1])
            replace_matmul(model, node, spec, list(node.inputs), gelu.outputs[0], [gelu, node])
            fused += 1
        if fused:
            logger.info("fused %d Gelu(tanh) into their integer matmuls", fused)
        return ir.passes.PassResult(model, modified=fused > 0)

"""The bias correction ``W mu`` of a centered site, as graph nodes (`graph_passes.emit`).

After centering, a site's linear computes ``x~ W~^T = (x - mu) W^T``; the output needs ``+ mu W^T`` back. The
transform op's second output is the transformed mean token ``mu~ = mu S^-1 H^T`` and ``mu~ W~^T = mu W^T``. Three
ways (`graph_passes.methods.BiasCorrection`):

* ``quantized-token`` (the paper): ``[x~; mu~] = Concat([x~, mu~], axis=-2)`` (`with_mean_token`) is quantized and
  multiplied as one more token; ``y = y_all[..., :N, :] + y_all[..., N:, :]`` (`add_mean_row`).
* ``float-token``: ``y = x~ W~^T + mu~ W~^T``, ``mu~`` kept in float times the same stored weight (no extra
  weights; ``nbits`` appends ``mu~`` to the MatMulNBits rows and uses `add_mean_row` too).
* ``exact``: like float-token, with an int8 per-output-channel copy of ``W~`` for the mean (extra bytes, reported).

Without quantization all three equal the original linear exactly.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.graph_utils import make_node, shared_constant, tensor_name


def with_mean_token(graph: ir.Graph, site: str, x: ir.Value, mean: ir.Value, before: ir.Node) -> ir.Value:
    """``[x~; mu~]`` (quantized-token), inserted before `before`."""
    tokens = make_node("Concat", [x, mean], f"{tensor_name(site)}.with_mean", axis=-2)
    tokens.outputs[0].type = x.type  # the quantizer reads its dtype (fp16 graphs)
    graph.insert_before(before, tokens)
    return tokens.outputs[0]


def add_mean_row(graph: ir.Graph, y: ir.Value, prefix: str, mean: str = "mean") -> list[ir.Node]:
    """``y[..., :-1, :] + y[..., -1:, :]``: the nodes (Slice, Slice, Add), not inserted."""
    axes = shared_constant(graph, "hadanorm.token_axis", np.array([-2], dtype=np.int64))
    start = shared_constant(graph, "hadanorm.zero", np.array([0], dtype=np.int64))
    last = shared_constant(graph, "hadanorm.minus_one", np.array([-1], dtype=np.int64))
    end = shared_constant(graph, "hadanorm.int64_max", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    tokens = make_node("Slice", [y, start, last, axes], f"{prefix}.tokens")
    row = make_node("Slice", [y, last, end, axes], f"{prefix}.{mean}")
    return [tokens, row, make_node("Add", [tokens.outputs[0], row.outputs[0]], f"{prefix}.add_mean")]


def add_mean_product(y: ir.Value, mean: ir.Value, weight: ir.Value, prefix: str) -> list[ir.Node]:
    """``y + MatMul(mu~, weight)`` (float-token, exact): the nodes (MatMul, Add), not inserted."""
    correction = make_node("MatMul", [mean, weight], f"{prefix}.mean_matmul")
    return [correction, make_node("Add", [y, correction.outputs[0]], f"{prefix}.add_mean")]

"""Rewrite linear layers written as ``Gemm`` into the ``MatMul`` + ``Add`` form the site passes rewrite.

What: a ``Gemm(x, W, C)`` of the default domain with a constant 2-D weight ``W``, ``transA = 0`` and a constant or
absent ``C`` becomes ``MatMul(x, Wt)`` followed by ``Add(., b)``:

- ``Wt`` is ``[in, out]``: ``alpha * W^T`` for ``transB = 1`` (a new initializer ``<W>.T``; ``W`` is dropped when
  nothing else reads it), ``alpha * W`` for ``transB = 0`` (``W`` itself when ``alpha = 1``);
- ``b`` is ``beta * C`` as a ``[out]`` vector when ``C`` is a constant ``[out]``, ``[1, out]`` or scalar (``C``
  itself when it already is a ``[out]`` initializer and ``beta = 1``); any other ``C`` (with ``beta = 1``) is added
  as it is; no ``Add`` without ``C``.

Scaling by ``alpha``/``beta`` is done in float64 and cast back to the weight's dtype. The Gemm's output value keeps
its name and consumers. The new ``MatMul`` keeps the Gemm's ``metadata_props`` and is named so that
`graph_passes.linears.module_path_of` reads the same module path from it as from the Gemm (``/a/b/c/MatMul`` for
module ``a.b.c``). Gemms with ``transA = 1``, a non-constant weight, or a non-constant ``C`` with ``beta != 1`` are
left alone.

Why: the passes insert transforms and quantizers in front of ``MatMul`` linears only. Exporters write the linears on
2-D inputs (the timestep embedding, adaLN-style modulation on ``[B, d]``) as ``Gemm(transB = 1)``: torch's
TorchScript exporter does so for every such linear, the dynamo exporter for some. After this pass those linears can
be activation sites like any other; numerically the graph is unchanged (the same products and sums).

`selects` (a predicate on the module path) limits the rewrite to some linears; default: every Gemm linear.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graph_passes.graph_utils import add_initializer, constant_array, drop_dead
from graph_passes.linears import module_path_of

logger = logging.getLogger(__name__)


def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return attr.as_float() if isinstance(default, float) else attr.as_int()


def _scaled(array: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return array
    return (array.astype(np.float64) * factor).astype(array.dtype)


def _names(gemm: ir.Node) -> tuple[str | None, str | None]:
    """Names of the MatMul and the Add: in the Gemm's scope, so that the module path reads the same."""
    path = module_path_of(gemm)
    name = gemm.name or ""
    if name.startswith("/") and name.count("/") >= 2:
        scope = name.rsplit("/", 1)[0]
    elif path and path != name:
        scope = "/" + path.replace(".", "/")
    else:
        return (f"{name}_MatMul", f"{name}_Add") if name else (None, None)
    return f"{scope}/MatMul", f"{scope}/Add"


class GemmToMatMulPass(ir.passes.InPlacePass):
    """``Gemm`` linears (constant 2-D weight) -> ``MatMul(x, W^T)`` + ``Add(b)`` with a pre-transposed weight."""

    def __init__(self, selects: Callable[[str], bool] | None = None):
        super().__init__()
        self.selects = selects

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and self._rewrite(graph, node):
                count += 1
        if count:
            logger.info("rewrote %d Gemm linear(s) as MatMul + Add", count)
        return ir.passes.PassResult(model, modified=count > 0)

    def _rewrite(self, graph: ir.Graph, gemm: ir.Node) -> bool:
        inputs = list(gemm.inputs) + [None] * (3 - len(gemm.inputs))
        x, w_value, c_value = inputs[:3]
        weight = constant_array(w_value) if w_value is not None and w_value.is_initializer() else None
        if x is None or weight is None or weight.ndim != 2 or _attr(gemm, "transA", 0):
            return False
        if self.selects is not None and not self.selects(module_path_of(gemm)):
            return False
        alpha, beta = float(_attr(gemm, "alpha", 1.0)), float(_attr(gemm, "beta", 1.0))
        trans_b = bool(_attr(gemm, "transB", 0))
        out_features = weight.shape[0] if trans_b else weight.shape[1]
        bias = constant_array(c_value)
        vector = bias is not None and bias.size in (1, out_features)  # [out], [1, out] or a scalar
        if c_value is not None and beta != 1.0 and not vector:
            return False  # beta * C of a non-constant or matrix C: leave the Gemm
        assert w_value is not None
        if trans_b or alpha != 1.0:
            base = f"{w_value.name}.T" if trans_b else f"{w_value.name}.scaled"
            wt = add_initializer(graph, base, np.ascontiguousarray(_scaled(weight.T if trans_b else weight, alpha)))
        else:
            wt = w_value
        b_value = c_value  # added as it is unless it becomes a [out] vector below
        if bias is not None and vector and (beta != 1.0 or bias.shape != (out_features,)
                                            or not c_value.is_initializer()):
            full = np.broadcast_to(bias.reshape(-1), (out_features,))
            b_value = add_initializer(graph, f"{c_value.name or w_value.name}.bias",
                                      np.ascontiguousarray(_scaled(full, beta)))
        matmul_name, add_name = _names(gemm)
        matmul = ir.node("MatMul", inputs=[x, wt], name=matmul_name, metadata_props=dict(gemm.metadata_props))
        nodes = [matmul]
        result = matmul.outputs[0]
        if b_value is not None:
            add = ir.node("Add", inputs=[result, b_value], name=add_name, metadata_props=dict(gemm.metadata_props))
            nodes.append(add)
            result.name = f"{gemm.outputs[0].name}_matmul" if gemm.outputs[0].name else None
            result = add.outputs[0]
        old = gemm.outputs[0]
        result.type, result.shape = old.type, old.shape
        if b_value is not None:
            matmul.outputs[0].type, matmul.outputs[0].shape = old.type, old.shape
        name = old.name
        old.name = None
        graph.insert_after(gemm, nodes)
        ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
        graph.remove(gemm, safe=True)
        result.name = name
        for value in (w_value, c_value):
            drop_dead(graph, value)
        return True

"""Replace no-op `Squeeze` nodes (squeezing an axis whose static size is not 1) by `Identity`.

What: a `Squeeze` whose axes (constant input, or the ``axes`` attribute before opset 13) all point at dimensions of
known static size other than 1 becomes ``Identity``. When only some of the axes are such no-ops and the others have
static size 1, the axes input is replaced by a constant holding just the size-1 axes. Squeezes on dimensions of
unknown (symbolic) size and Squeezes without axes are left alone.

Why: diffusers' PixArt transformer ends with ``hidden_states = hidden_states.squeeze(1)`` on a ``[B, N, C]`` tensor
with ``N`` tokens. In torch, squeezing a dimension that is not 1 does nothing; both torch ONNX exporters still emit
``Squeeze(axes=[1])``, which ONNX defines as an error when the dimension is not 1, so onnxruntime refuses to load the
graph (``ShapeInferenceError ... Dimension of input 1 must be 1 instead of 16``). Replacing it by Identity restores the
torch meaning and lets the exported graph load and match torch.

The pass walks subgraphs and model-local functions too. It needs the static shapes the exporter records on values.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)


def _squeeze_axes(node: ir.Node) -> list[int] | None:
    """The constant axes of a Squeeze, or None when they are not known (or not given: squeeze all 1-dims)."""
    if len(node.inputs) >= 2 and node.inputs[1] is not None:
        tensor = ir.convenience.get_const_tensor(node.inputs[1])
        if tensor is None:
            return None
        return [int(a) for a in np.asarray(tensor.numpy()).reshape(-1)]
    attr = node.attributes.get("axes")
    if attr is not None:
        return [int(a) for a in attr.as_ints()]
    return None


def _static_dim(shape: ir.Shape | None, axis: int) -> int | None:
    if shape is None:
        return None
    rank = len(shape)
    if not -rank <= axis < rank:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


class FixNoopSqueezePass(ir.passes.InPlacePass):
    """Turn Squeezes of static non-1 dimensions (torch's no-op ``squeeze(dim)``) into Identity."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
        for graph_like in graphs:
            for node in list(ir.traversal.RecursiveGraphIterator(graph_like)):
                if node.op_type != "Squeeze" or node.domain not in ("", "ai.onnx"):
                    continue
                if self._fix(node):
                    count += 1
        if count:
            logger.info("replaced %d no-op Squeeze node(s)", count)
        return ir.passes.PassResult(model, modified=count > 0)

    @staticmethod
    def _fix(node: ir.Node) -> bool:
        axes = _squeeze_axes(node)
        data = node.inputs[0] if node.inputs else None
        if not axes or data is None:
            return False
        dims = [_static_dim(data.shape, a) for a in axes]
        if any(d is None for d in dims):
            return False  # symbolic or unknown: cannot tell whether it is a no-op
        noop = [a for a, d in zip(axes, dims) if d != 1]
        if not noop:
            return False
        graph = node.graph
        if graph is None:
            return False
        keep = [a for a, d in zip(axes, dims) if d == 1]
        old_axes = node.inputs[1] if len(node.inputs) >= 2 else None
        if keep:
            if len(node.inputs) >= 2 and node.inputs[1] is not None:
                const = ir.node(
                    "Constant",
                    inputs=[],
                    attributes={"value": ir.tensor(np.asarray(keep, dtype=np.int64))},
                    name=f"{node.name}_axes_fixed" if node.name else None,
                )
                graph.insert_before(node, const)
                node.replace_input_with(1, const.outputs[0])
                _drop_if_unused(graph, old_axes)
            else:
                node.attributes["axes"] = ir.AttrInt64s("axes", keep)
            return True
        identity = ir.node("Identity", inputs=[data], name=node.name, metadata_props=dict(node.metadata_props))
        old = node.outputs[0]
        new = identity.outputs[0]
        new.type = old.type
        new.shape = old.shape
        name = old.name
        old.name = None  # free the name for the replacement
        graph.insert_after(node, identity)
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        new.name = name
        _drop_if_unused(graph, old_axes)
        return True


def _drop_if_unused(graph: ir.Graph | ir.Function, value: ir.Value | None) -> None:
    """Remove the initializer `value` once nothing uses it any more."""
    if value is None or not isinstance(graph, ir.Graph):
        return
    if value.uses() or value in graph.inputs or value.is_graph_output():
        return
    if value.name is not None and graph.initializers.get(value.name) is value:
        del graph.initializers[value.name]

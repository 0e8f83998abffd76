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

The TorchScript exporter (``dynamo=False``) writes ``squeeze(1)`` as torch's rule spelled out: ``If(Shape(x)[1] ==
1)`` with ``Squeeze(x, [1])`` in the then-branch and ``Identity(x)`` in the else-branch. onnxruntime infers the shapes
of both branches when it loads the graph, so the then-branch fails the same way although it never runs. The pass
fixes the Squeeze inside the branch (its input, a value of the outer graph, is usually without a recorded shape
there: the pass then asks onnx's shape inference, weights left out, for the shapes of just the Squeeze inputs it
needs), and an ``If`` whose two branches then return the same outer values unchanged becomes ``Identity`` (the
condition's now unused ``Shape``/``Gather``/``Equal`` nodes go with it).

The pass walks subgraphs (any depth) and model-local functions. Shapes come from the values (the dynamo exporter
records them) or from onnx shape inference of the main graph and its subgraphs; inside functions only recorded
shapes count.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes.graph_utils import drop_dead
from graph_passes.onnx_proto import weights_left_out

logger = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")


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


def _is_squeeze(node: ir.Node) -> bool:
    return node.op_type == "Squeeze" and node.domain in _DEFAULT_DOMAINS


def _needs_shape(node: ir.Node) -> bool:
    """A Squeeze with constant axes whose input has no static size recorded at one of them."""
    axes = _squeeze_axes(node)
    data = node.inputs[0] if node.inputs else None
    return bool(axes) and data is not None and any(_static_dim(data.shape, a) is None for a in axes)


def _inferred_shapes(model: ir.Model, names: set[str]) -> dict[str, ir.Shape]:
    """Shapes of the values `names` (main graph and subgraphs) from onnx shape inference, weights left out.

    Non-strict: the failing Squeeze itself only loses its own output shape. Returns what inference found."""
    with weights_left_out(model):
        proto = ir.serde.serialize_model(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as exc:  # an unknown op or a malformed graph: decide from recorded shapes only
        logger.debug("shape inference failed (%s): no-op Squeezes are found from recorded shapes only", exc)
        return {}
    found: dict[str, ir.Shape] = {}
    for graph in ir.serde.deserialize_model(inferred).graphs():
        values = [*graph.inputs, *(v for node in graph for v in node.outputs)]
        for value in values:
            if value.name in names and value.shape is not None:
                found[value.name] = value.shape
    return found


class FixNoopSqueezePass(ir.passes.InPlacePass):
    """Turn Squeezes of static non-1 dimensions (torch's no-op ``squeeze(dim)``) into Identity, in every graph and
    subgraph, and fold the ``If`` the TorchScript exporter wraps such a Squeeze in."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
        squeezes = [node for graph_like in graphs for node in ir.traversal.RecursiveGraphIterator(graph_like)
                    if _is_squeeze(node)]
        unknown = {node.inputs[0].name for node in squeezes if _needs_shape(node) and node.inputs[0].name}
        shapes = _inferred_shapes(model, unknown) if unknown else {}
        count = sum(self._fix(node, shapes) for node in squeezes)
        folded = _fold_passthrough_ifs(model)
        if count:
            logger.info("replaced %d no-op Squeeze node(s)", count)
        if folded:
            logger.info("folded %d If node(s) whose branches return their input unchanged", folded)
        return ir.passes.PassResult(model, modified=bool(count or folded))

    @staticmethod
    def _fix(node: ir.Node, shapes: dict[str, ir.Shape]) -> bool:
        axes = _squeeze_axes(node)
        data = node.inputs[0] if node.inputs else None
        if not axes or data is None:
            return False
        shape = data.shape
        if any(_static_dim(shape, a) is None for a in axes):
            shape = shapes.get(data.name or "")
        dims = [_static_dim(shape, a) for a in axes]
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
                drop_dead(graph, old_axes)
            else:
                node.attributes["axes"] = ir.AttrInt64s("axes", keep)
            return True
        identity = ir.node("Identity", inputs=[data], name=node.name, metadata_props=dict(node.metadata_props))
        old = node.outputs[0]
        new = identity.outputs[0]
        new.type = data.type if data.type is not None else old.type
        new.shape = shape  # Identity keeps its input's shape (the exporter may have recorded the squeezed one)
        name = old.name
        old.name = None  # free the name for the replacement
        graph.insert_after(node, identity)
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        new.name = name
        drop_dead(graph, old_axes)
        return True


def _passthrough_source(branch: ir.Graph, value: ir.Value) -> ir.Value | None:
    """The outer-scope value a branch output is (through Identity nodes), or None when the branch computes it."""
    while True:
        producer = value.producer()
        if producer is None:
            is_own = value in branch.inputs or branch.initializers.get(value.name or "") is value
            return None if is_own else value
        if producer.graph is not branch:
            return value
        if producer.op_type != "Identity" or producer.domain not in _DEFAULT_DOMAINS or not producer.inputs:
            return None
        source = producer.inputs[0]
        if source is None:
            return None
        value = source


def _fold_passthrough_ifs(model: ir.Model) -> int:
    """Replace every ``If`` whose branches return the same outer values unchanged by Identity nodes; innermost
    first, so that folding a nested If can make its parent foldable."""
    folded = 0
    ifs = [node for node in ir.traversal.RecursiveGraphIterator(model.graph)
           if node.op_type == "If" and node.domain in _DEFAULT_DOMAINS]
    for node in reversed(ifs):
        then_attr, else_attr = node.attributes.get("then_branch"), node.attributes.get("else_branch")
        graph = node.graph
        if then_attr is None or else_attr is None or graph is None:
            continue
        then_g, else_g = then_attr.as_graph(), else_attr.as_graph()
        if not len(then_g.outputs) == len(else_g.outputs) == len(node.outputs):
            continue
        sources = []
        for then_out, else_out in zip(then_g.outputs, else_g.outputs):
            source = _passthrough_source(then_g, then_out)
            if source is None or _passthrough_source(else_g, else_out) is not source:
                break
            sources.append(source)
        else:
            cond = node.inputs[0] if node.inputs else None
            for i, (old, source) in enumerate(zip(node.outputs, sources)):
                suffix = f"_{i}" if len(sources) > 1 else ""
                identity = ir.node("Identity", inputs=[source], name=f"{node.name}{suffix}" if node.name else None,
                                   metadata_props=dict(node.metadata_props))
                new = identity.outputs[0]
                new.type = old.type if old.type is not None else source.type
                new.shape = source.shape if source.shape is not None else old.shape
                name = old.name
                old.name = None
                graph.insert_before(node, identity)
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
                new.name = name
            graph.remove(node, safe=True)
            drop_dead(graph, cond)
            folded += 1
    return folded

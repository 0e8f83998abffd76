"""Small onnx-ir helpers shared by the passes."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from graph_passes import tags


def tensor_name(site: str) -> str:
    """A name for values and nodes made for `site` (module paths may hold ``#``, which some tools reject)."""
    return site.replace("#", "_")


def tagged_matmuls(graph: ir.Graph, role: str) -> dict[str, list[ir.Node]]:
    """MatMuls (and Convs) carrying a site tag with the given role, grouped by site, in graph order."""
    out: dict[str, list[ir.Node]] = {}
    for node in graph:
        site = tags.site_of(node)
        if node.op_type in ("MatMul", "Conv") and site is not None and tags.role_of(node) == role:
            out.setdefault(site, []).append(node)
    return out


def site_input(node: ir.Node) -> tuple[ir.Node, int]:
    """(consumer, input index) through which a site node reads its activation: the MatMul's input 0, or for a Conv
    site the token view's Reshape (`graph_passes.conv_sites`) that the site's transform and quantizer feed."""
    if node.op_type == "Conv":
        back = node.inputs[0].producer()
        view = back.inputs[0].producer() if back is not None else None
        if view is None or tags.CONV_VIEW not in view.metadata_props:
            raise ValueError(f"conv site {tags.site_of(node)} has no token view (run ConvSitesPass first)")
        return view, 0
    return node, 0


def quantization_point(node: ir.Node) -> tuple[ir.Value, ir.Node, int]:
    """(value, consumer, input index) where a site's activation quantizer goes: the site input, or for a
    single-Hadamard site the input of its back rotation (HQ-DM quantizes the rotated activation)."""
    consumer, index = site_input(node)
    value = consumer.inputs[index]
    back = value.producer()
    if back is not None and tags.ROTATE_BACK in back.metadata_props:
        return back.inputs[0], back, 0
    return value, consumer, index


def site_width(node: ir.Node) -> int:
    """The input channels of a site MatMul (``W^T`` [in, out]) or Conv (``W`` [out, in, kh, kw])."""
    shape = node.inputs[1].shape
    dim = shape[1] if node.op_type == "Conv" else shape[0]
    if not isinstance(dim, int):
        raise ValueError(f"cannot tell the input width of {node.name}")
    return dim


def redirect_uses(old: ir.Value, new: ir.Value, keep: Iterable[ir.Node] = ()) -> None:
    """Make every consumer of `old` (except the nodes in `keep`) read `new`.

    A graph output is replaced too, and `new` takes over its name, type and shape: output names are public."""
    keep_ids = {id(n) for n in keep}
    for node, index in list(old.uses()):
        if id(node) not in keep_ids:
            node.replace_input_with(index, new)
    new.type, new.shape = old.type, old.shape
    graph = old.graph
    if graph is not None and old.is_graph_output():
        name = old.name
        old.name = f"{name}.before_correction"
        for i, output in enumerate(graph.outputs):
            if output is old:
                graph.outputs[i] = new
        new.name = name


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new constant initializer under a name not used in the graph yet."""
    base, count = name, 0
    while name in graph.initializers:
        count += 1
        name = f"{base}_{count}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def drop_dead(graph: ir.Graph | ir.Function, value: ir.Value | None) -> None:
    """Once nothing uses `value`, remove it: an initializer is unregistered, a node that computed only it is removed,
    and so on up through that node's inputs."""
    pending = [value]
    while pending:
        value = pending.pop()
        if value is None or value.uses() or value.is_graph_output() or value in graph.inputs:
            continue
        producer = value.producer()
        if producer is None:
            if isinstance(graph, ir.Graph) and value.name is not None and graph.initializers.get(value.name) is value:
                del graph.initializers[value.name]
            continue
        if producer.graph is not graph or any(out.uses() or out.is_graph_output() for out in producer.outputs):
            continue
        inputs = list(producer.inputs)
        graph.remove(producer, safe=True)
        pending.extend(inputs)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's array when it is constant (an initializer or a ``Constant`` node's output), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def shared_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A small constant initializer shared by every node that asks for `name` (created once)."""
    if name in graph.initializers:
        return graph.initializers[name]
    return add_initializer(graph, name, array)


def make_node(op_type: str, inputs: list[ir.Value | None], name: str, *, domain: str = "", num_outputs: int = 1,
              metadata: dict[str, str] | None = None, **attrs) -> ir.Node:
    node = ir.Node(domain, op_type, inputs, attributes=ir.convenience.convert_attributes(attrs),
                   num_outputs=num_outputs, name=name, metadata_props=dict(metadata or {}))
    for i, out in enumerate(node.outputs):
        out.name = f"{name}_out{i}" if num_outputs > 1 else f"{name}_out"
    return node


class NodeSequence:
    """Graph nodes built in order with `make_node`: unique names ``<prefix>.<i>_<Op>`` and shared metadata. The
    caller inserts `nodes` (``graph.insert_before`` or ``graph.extend``). Function bodies use
    `graph_passes.hadanorm_ops.FunctionBody` instead (their values live in a function, not in the graph)."""

    def __init__(self, prefix: str, metadata: dict[str, str] | None = None):
        self.prefix = prefix
        self.metadata = dict(metadata or {})
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs: list[ir.Value | None], **attrs) -> ir.Value:
        node = make_node(op_type, inputs, f"{self.prefix}.{len(self.nodes)}_{op_type}", metadata=self.metadata,
                         **attrs)
        self.nodes.append(node)
        return node.outputs[0]

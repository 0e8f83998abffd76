"""Small onnx-ir helpers shared by the passes."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir


def tensor_name(site: str) -> str:
    """A name for values and nodes made for `site` (module paths may hold ``#``, which some tools reject)."""
    return site.replace("#", "_")


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
              **attrs) -> ir.Node:
    """A node named `name` whose outputs are named ``<name>_out`` (``<name>_out<i>`` for several)."""
    node = ir.Node(domain, op_type, inputs, attributes=ir.convenience.convert_attributes(attrs),
                   num_outputs=num_outputs, name=name)
    for i, out in enumerate(node.outputs):
        out.name = f"{name}_out{i}" if num_outputs > 1 else f"{name}_out"
    return node


class NodeSequence:
    """Graph nodes built in order with `make_node`: unique names ``<prefix>.<i>_<Op>``. The caller inserts `nodes`
    (``graph.insert_before`` or ``graph.extend``). Function bodies use `graph_passes.hadanorm_ops.FunctionBody`
    instead (their values live in a function, not in the graph)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs: list[ir.Value | None], **attrs) -> ir.Value:
        node = make_node(op_type, inputs, f"{self.prefix}.{len(self.nodes)}_{op_type}", **attrs)
        self.nodes.append(node)
        return node.outputs[0]


def only_reader(value: ir.Value) -> ir.Node | None:
    """The one node that reads `value`, when there is exactly one and `value` is not a graph output."""
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def is_standard_binary(node: ir.Node | None, op_type: str) -> bool:
    """`node` is the standard-domain `op_type` with two inputs (``Add``, ``Mul``, ...)."""
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type == op_type and len(node.inputs) == 2


def known_dims(value: ir.Value | None) -> tuple | None:
    """The value's dimensions when every one is known (an int, or a named symbol as its name), else None: two values
    with equal tuples have the same shape in every run."""
    if value is None or value.shape is None:
        return None
    dims = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            dims.append(dim.value)
        else:
            return None
    return tuple(dims)


def is_row_of(dims: tuple | None, out_dims: tuple) -> bool:
    """`dims` is one row that broadcasts over the tokens of a [..., N, d] value of `out_dims`: [d], or [..., 1, d]
    with its leading dimensions (the kernels' per-batch layout of a bias, gate or modulation)."""
    if dims is None or len(out_dims) < 2:
        return False
    return dims == out_dims[-1:] or (len(dims) == len(out_dims) and dims[-2] == 1 and dims[:-2] == out_dims[:-2]
                                     and dims[-1] == out_dims[-1])

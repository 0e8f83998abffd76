"""ONNX function bodies of the ``hadanorm`` ops: one builder of the body nodes and one place that adds an op's
function (and the domain import) to a model.

Every custom op the passes write carries a function body, so stock onnxruntime runs the file without the kernel
library: the online transforms (`graph_passes.hadanorm_ops`), the integer ops (`graph_passes.int_ops`) and the fused
attention (`graph_passes.attention_op`). Each describes one op form as an `OpSpec` (its type, overload and body);
`ensure_function(model, spec)` adds that body once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import onnx_ir as ir

from graph_passes.domain import HADANORM_DOMAIN, HADANORM_OPSET_VERSION, ONNX_OPSET


class OpSpec(Protocol):
    """One form of a ``hadanorm`` op: its op type and overload, and its function body."""

    @property
    def op_type(self) -> str: ...

    @property
    def overload(self) -> str: ...

    def function(self) -> ir.Function: ...


def ensure_function(model: ir.Model, spec: OpSpec) -> None:
    """Add the op's function body (the overload of this form) and the domain import to the model (once)."""
    model.opset_imports[HADANORM_DOMAIN] = HADANORM_OPSET_VERSION
    model.graph.opset_imports[HADANORM_DOMAIN] = HADANORM_OPSET_VERSION
    key = (HADANORM_DOMAIN, spec.op_type, spec.overload)
    if key not in model.functions:
        model.functions[key] = spec.function()


class FunctionBody:
    """Builds the nodes of one function body with unique value names."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []
        self._count = 0

    def op(self, op_type: str, inputs: list[ir.Value], **attrs) -> ir.Value:
        self._count += 1
        node = ir.Node("", op_type, inputs, attributes=ir.convenience.convert_attributes(attrs),
                       name=f"n{self._count}_{op_type}")
        node.outputs[0].name = f"v{self._count}_{op_type}"
        self.nodes.append(node)
        return node.outputs[0]

    def ref_constant(self, attribute: str, ref_attr_name: str, type_: ir.AttributeType) -> ir.Value:
        """A ``Constant`` whose value is the calling node's attribute `ref_attr_name`."""
        self._count += 1
        attr = ir.Attr(attribute, type_, None, ref_attr_name=ref_attr_name)
        node = ir.Node("", "Constant", [], attributes=[attr], name=f"n{self._count}_Constant")
        node.outputs[0].name = f"v{self._count}_{ref_attr_name}"
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array: np.ndarray) -> ir.Value:
        return self.op("Constant", [], value=ir.tensor(array))

    def rotate(self, x: ir.Value, h_left: ir.Value, h_right: ir.Value) -> ir.Value:
        shape = self.op("Shape", [x])
        lead = self.op("Shape", [x], end=-1)
        k = self.op("Shape", [h_left], start=0, end=1)
        m = self.op("Shape", [h_right], start=0, end=1)
        x4 = self.op("Reshape", [x, self.op("Concat", [lead, k, m], axis=0)])
        right = self.op("MatMul", [x4, self.op("Transpose", [h_right], perm=[1, 0])])
        both = self.op("MatMul", [h_left, right])
        return self.op("Reshape", [both, shape])

    def function(self, op_type: str, inputs: list[ir.Value], outputs: Sequence[ir.Value], output_names: Iterable[str],
                 overload: str = "", attributes: Iterable[ir.Attr] = ()) -> ir.Function:
        """The ``hadanorm`` function `op_type` (`overload`) with this body, its outputs named `output_names`."""
        for value, name in zip(outputs, output_names):
            value.name = name
        graph = ir.Graph(inputs, list(outputs), nodes=self.nodes, opset_imports={"": ONNX_OPSET}, name=op_type)
        return ir.Function(HADANORM_DOMAIN, op_type, overload, graph=graph, attributes=list(attributes))

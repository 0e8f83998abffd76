"""The online-transform ops of the ``hadanorm`` domain, each with an ONNX function body.

For one activation ``x`` of shape ``[..., N, d]`` (tokens on axis -2, channels on axis -1):

    mean   = mean over tokens of x                    (only the Center* ops; per batch element)
    x'     = (x - mean) * mul                         (mul = sign / s: SmoothQuant scales and Hadamard signs)
    y      = x' (H_L (x) H_R)^T                       (only the *Rotate ops)
    mean_y = (mean * mul) (H_L (x) H_R)^T             (second output of the Center* ops)

The Kronecker product is never formed: ``x'`` is reshaped to ``[..., K, M]`` and ``y = H_L X H_R^T``. Block-diagonal
Hadamards pass ``H_L = I``. Four op types cover the six methods (``Scale``, ``ScaleRotate``, ``CenterScale``,
``CenterScaleRotate``); the function bodies let stock onnxruntime run the graph with no kernel library, and a
kernel library may register faster implementations of the same ops.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graph_passes.domain import HADANORM_DOMAIN, HADANORM_OPSET_VERSION

_ONNX_OPSET = 21


@dataclasses.dataclass(frozen=True)
class TransformOp:
    """Which parts of the online transform an op applies."""

    center: bool
    rotate: bool

    @property
    def op_type(self) -> str:
        return ("Center" if self.center else "") + "Scale" + ("Rotate" if self.rotate else "")

    @property
    def num_outputs(self) -> int:
        return 2 if self.center else 1

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("x", "mul", "h_left", "h_right") if self.rotate else ("x", "mul")


ALL_OPS: tuple[TransformOp, ...] = tuple(TransformOp(c, r) for c in (False, True) for r in (False, True))


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


def transform_body(body: FunctionBody, spec: TransformOp, inputs: list[ir.Value]) -> list[ir.Value]:
    """The op's maths on function inputs ``(x, mul[, h_left, h_right])``: ``[y]`` or ``[y, mean_y]``."""
    x, mul = inputs[0], inputs[1]
    if spec.center:
        mean = body.op("ReduceMean", [x, body.const(np.array([-2], dtype=np.int64))], keepdims=1)
        scaled = [body.op("Mul", [body.op("Sub", [x, mean]), mul]), body.op("Mul", [mean, mul])]
    else:
        scaled = [body.op("Mul", [x, mul])]
    return [body.rotate(value, inputs[2], inputs[3]) if spec.rotate else value for value in scaled]


def build_function(spec: TransformOp) -> ir.Function:
    inputs = [ir.Value(name=name) for name in spec.input_names]
    body = FunctionBody()
    outputs = transform_body(body, spec, inputs)
    for value, name in zip(outputs, ("y", "mean_y")):
        value.name = name
    graph = ir.Graph(inputs, outputs, nodes=body.nodes, opset_imports={"": _ONNX_OPSET}, name=spec.op_type)
    return ir.Function(HADANORM_DOMAIN, spec.op_type, graph=graph, attributes=[])


def ensure_function(model: ir.Model, spec: TransformOp) -> None:
    """Add the op's function body and the domain import to the model (once)."""
    model.opset_imports[HADANORM_DOMAIN] = HADANORM_OPSET_VERSION
    model.graph.opset_imports[HADANORM_DOMAIN] = HADANORM_OPSET_VERSION
    key = (HADANORM_DOMAIN, spec.op_type, "")
    if key not in model.functions:
        model.functions[key] = build_function(spec)

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

from graph_passes.function_ops import FunctionBody
from graph_passes.function_ops import ensure_function  # noqa: F401  (tests and benchmarks add bodies from here)


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

    @property
    def overload(self) -> str:
        return ""

    def function(self) -> ir.Function:
        return build_function(self)


ALL_OPS: tuple[TransformOp, ...] = tuple(TransformOp(c, r) for c in (False, True) for r in (False, True))


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
    return body.function(spec.op_type, inputs, transform_body(body, spec, inputs), ("y", "mean_y"))

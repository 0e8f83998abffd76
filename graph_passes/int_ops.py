"""The integer-execution ops of the ``hadanorm`` domain (the ``fused`` format), each with an ONNX function body.

Quantize ops, attribute ``bits`` (2..8), one per transform variant (``Quantize``, ``ScaleQuantize``,
``ScaleRotateQuantize``, ``CenterScaleQuantize``, ``CenterScaleRotateQuantize``): ``y`` = the transform of
`graph_passes.hadanorm_ops` (``y = x`` for ``Quantize``), then per token (last axis), asymmetric min/max in float32:

    qmax  = 2^bits - 1
    hi    = max(max_i y_i, 0),  lo = min(min_i y_i, 0)
    scale = max((hi - lo) / qmax, FLT_MIN)               (rounded to the activation dtype, then used as float32)
    zp    = clip(round(-lo / scale), 0, qmax)
    codes = clip(round(y / scale) + zp, 0, qmax)         (uint8; round half to even)

``Modulate`` + ``ScaleQuantize`` / ``ScaleRotateQuantize`` / ``CenterScaleQuantize`` / ``CenterScaleRotateQuantize``
(two more inputs ``x_scale``, ``x_shift``, each ``[d]`` or ``[..., 1, d]``): the same op on ``x * x_scale + x_shift``
(a ``Mul``, then an ``Add``: a DiT block's adaLN modulation before a linear; `graph_passes.fuse_modulation`).

Outputs ``codes`` uint8 ``[..., N, d]``, ``scale`` T ``[..., N, 1]``, ``zero_point`` uint8 ``[..., N, 1]`` and, for the
Center ops, ``mean_y`` T ``[..., 1, d]`` (the transformed mean token, as the transform op's second output).

``IntMatMul4`` / ``IntMatMul8`` (``codes, a_scale, a_zero_point, b, scales, zero_points, bias``), attribute
``block_size``: ``y = (codes - a_zero_point) * a_scale @ w + bias`` with ``w`` the packed weight of
`graph_passes.int_packing` (4-bit or 8-bit container) and ``bias`` ``[N]`` or ``[..., 1, N]``. The kernel library
computes ``sum (c - z)(u - zw)`` exactly in int32 per block and applies the scales once per block.

``IntMatMul{4,8}LowRank`` (two more inputs ``t`` ``[..., M, r]``, ``right`` ``[r, N]``): the same plus ``t @ right``, a
low-rank branch's second product (`graph_passes.fuse_matmul_low_rank`); ``IntMatMul{4,8}[LowRank]Gelu``: then
``Gelu(approximate="tanh")`` (`graph_passes.fuse_matmul_activation`); ``IntMatMul{4,8}[LowRank]Residual`` (one more
input ``residual``, the output's shape): then ``residual + y``; ``IntMatMul{4,8}[LowRank]GatedResidual`` (``gate``
``[N]`` or ``[..., 1, N]``, then ``residual``): then ``residual + gate * y`` (`graph_passes.fuse_matmul_residual`: a
DiT block's gated residual stream). The kernel applies each to a task's output while it is in cache.

``FloatMatMul4`` / ``FloatMatMul8`` (``x, b, scales, zero_points``): ``y = x @ w`` for a float ``x`` (the bias
correction's mean token).

The function bodies dequantize and run a float MatMul: stock onnxruntime runs the file without the library, slowly.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import onnx_ir as ir

from graph_passes.domain import HADANORM_DOMAIN
from graph_passes.function_ops import FunctionBody, ensure_function
from graph_passes.graph_utils import redirect_uses
from graph_passes.hadanorm_ops import TransformOp, transform_body


@dataclasses.dataclass(frozen=True)
class QuantizeOp:
    """A transform (or none) fused with the per-token activation quantizer."""

    transform: TransformOp | None
    modulate: bool = False  # x_scale, x_shift: the op reads x * x_scale + x_shift

    def __post_init__(self) -> None:
        if self.modulate and self.transform is None:
            raise ValueError("a modulated quantize op has a transform (Scale*)")

    @property
    def op_type(self) -> str:
        return ("Modulate" if self.modulate else "") + (self.transform.op_type if self.transform else "") + "Quantize"

    @property
    def input_names(self) -> tuple[str, ...]:
        names = self.transform.input_names if self.transform else ("x",)
        return names + (("x_scale", "x_shift") if self.modulate else ())

    @property
    def num_outputs(self) -> int:
        return 4 if self.transform is not None and self.transform.center else 3

    @property
    def overload(self) -> str:
        return ""

    def function(self) -> ir.Function:
        return build_function(self)


class MatMulActivation(enum.Enum):
    """What an integer matmul applies to its output (``IntMatMul{4,8}`` + suffix)."""

    NONE = ""
    GELU_TANH = "Gelu"  # ONNX Gelu(approximate="tanh"), fused by graph_passes.fuse_matmul_activation


class MatMulResidual(enum.Enum):
    """What an integer matmul adds to its output last (``IntMatMul{4,8}[LowRank]`` + suffix;
    graph_passes.fuse_matmul_residual)."""

    NONE = ""
    ADD = "Residual"  # y = residual + y
    GATED = "GatedResidual"  # y = residual + gate * y


@dataclasses.dataclass(frozen=True)
class MatMulOp:
    """``IntMatMul{4,8}[LowRank][Gelu]`` (quantized activation codes) or ``FloatMatMul{4,8}`` (float activation)."""

    bits: int  # weight container: 4 or 8
    integer_input: bool
    activation: MatMulActivation = MatMulActivation.NONE
    low_rank: bool = False  # two more inputs t [..., M, r], right [r, N]: y += t @ right (before the activation)
    residual: MatMulResidual = MatMulResidual.NONE  # [gate,] residual: last, after the low-rank term

    def __post_init__(self) -> None:
        if ((self.activation is not MatMulActivation.NONE or self.low_rank or self.residual is not MatMulResidual.NONE)
                and not self.integer_input):
            raise ValueError("only IntMatMul takes an activation, a low-rank term or a residual")
        if self.activation is not MatMulActivation.NONE and self.residual is not MatMulResidual.NONE:
            raise ValueError("an integer matmul takes an activation or a residual, not both")

    @property
    def op_type(self) -> str:
        return (("Int" if self.integer_input else "Float") + f"MatMul{self.bits}" + ("LowRank" if self.low_rank else "")
                + self.activation.value + self.residual.value)

    @property
    def input_names(self) -> tuple[str, ...]:
        weights = ("b", "scales", "zero_points")
        if self.integer_input:
            residual = {MatMulResidual.NONE: (), MatMulResidual.ADD: ("residual",),
                        MatMulResidual.GATED: ("gate", "residual")}[self.residual]
            return (("codes", "a_scale", "a_zero_point", *weights, "bias") + (("t", "right") if self.low_rank else ())
                    + residual)
        return ("x", *weights)

    @property
    def overload(self) -> str:
        return ""

    def function(self) -> ir.Function:
        return build_function(self)




def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _quantize_body(body: FunctionBody, spec: QuantizeOp, inputs: list[ir.Value]) -> list[ir.Value]:
    if spec.modulate:
        *inputs, x_scale, x_shift = inputs
        inputs = [body.op("Add", [body.op("Mul", [inputs[0], x_scale]), x_shift]), *inputs[1:]]
    x = inputs[0]
    transformed = transform_body(body, spec.transform, inputs) if spec.transform else [x]
    y = transformed[0]
    y32 = body.op("Cast", [y], to=ir.DataType.FLOAT)
    bits = body.ref_constant("value_int", "bits", ir.AttributeType.INT)
    qmax = body.op("Sub", [body.op("Pow", [body.const(np.array(2.0, np.float32)),
                                          body.op("Cast", [bits], to=ir.DataType.FLOAT)]),
                           body.const(np.array(1.0, np.float32))])
    zero = body.const(np.array(0.0, np.float32))
    last = body.const(_i64(-1))
    hi = body.op("Max", [body.op("ReduceMax", [y32, last], keepdims=1), zero])
    lo = body.op("Min", [body.op("ReduceMin", [y32, last], keepdims=1), zero])
    scale32 = body.op("Max", [body.op("Div", [body.op("Sub", [hi, lo]), qmax]),
                              body.const(np.array(np.finfo(np.float32).tiny, np.float32))])
    scale_t = body.op("CastLike", [scale32, x])  # the scale the graph carries, in the activation dtype
    scale = body.op("Cast", [scale_t], to=ir.DataType.FLOAT)  # ... and the one the codes are computed with
    zp = body.op("Clip", [body.op("Round", [body.op("Neg", [body.op("Div", [lo, scale])])]), zero, qmax])
    codes = body.op("Clip", [body.op("Add", [body.op("Round", [body.op("Div", [y32, scale])]), zp]), zero, qmax])
    outputs = [body.op("Cast", [codes], to=ir.DataType.UINT8), scale_t, body.op("Cast", [zp], to=ir.DataType.UINT8)]
    return outputs + transformed[1:]


def _dequantized_weight(body: FunctionBody, spec: MatMulOp, b: ir.Value, scales: ir.Value, zero_points: ir.Value,
                        k_source: ir.Value) -> ir.Value:
    """``w`` [K, N] in the dtype of `scales` from the packed layout (see `graph_passes.int_packing`)."""
    b_shape = body.op("Shape", [b])
    tiles_groups = body.op("Slice", [b_shape, body.const(_i64(0)), body.const(_i64(2))])
    if spec.bits == 4:
        lo = body.op("BitwiseAnd", [b, body.const(np.array(15, np.uint8))])
        hi = body.op("BitShift", [b, body.const(np.array(4, np.uint8))], direction="RIGHT")
        axis2 = body.const(_i64(2))
        both = body.op("Concat", [body.op("Unsqueeze", [lo, axis2]), body.op("Unsqueeze", [hi, axis2])], axis=2)
        v = body.op("Reshape", [both, body.op("Concat", [tiles_groups, body.const(_i64(2, 16, 4))], axis=0)])
        v = body.op("Transpose", [v], perm=[1, 2, 4, 0, 3])  # [g, h, j, t, c]: k = 8g + 4h + j, n = 16t + c
    else:
        v = body.op("Reshape", [b, body.op("Concat", [tiles_groups, body.const(_i64(16, 4))], axis=0)])
        v = body.op("Transpose", [v], perm=[1, 3, 0, 2])  # [g, j, t, c]: k = 4g + j
    n_pad = body.op("Mul", [body.op("Slice", [b_shape, body.const(_i64(0)), body.const(_i64(1))]),
                            body.const(_i64(16))])
    codes = body.op("Reshape", [v, body.op("Concat", [body.const(_i64(-1)), n_pad], axis=0)])  # [K_pad, N_pad]
    s_shape = body.op("Shape", [scales])
    n = body.op("Slice", [s_shape, body.const(_i64(1)), body.const(_i64(2))])
    codes = body.op("Slice", [codes, body.const(_i64(0)), n, body.const(_i64(1))])  # [K_pad, N]
    k_blocks = body.op("Slice", [s_shape, body.const(_i64(0)), body.const(_i64(1))])
    blocks = body.op("Reshape", [codes, body.op("Concat", [k_blocks, body.const(_i64(-1)), n], axis=0)])
    one = body.const(_i64(1))
    centered = body.op("Sub", [body.op("CastLike", [blocks, scales]),
                               body.op("Unsqueeze", [body.op("CastLike", [zero_points, scales]), one])])
    w = body.op("Mul", [centered, body.op("Unsqueeze", [scales, one])])
    w = body.op("Reshape", [w, body.op("Concat", [body.const(_i64(-1)), n], axis=0)])  # [K_pad, N]
    k = body.op("Shape", [k_source], start=-1)
    return body.op("Slice", [w, body.const(_i64(0)), k, body.const(_i64(0))])  # [K, N]


def _matmul_body(body: FunctionBody, spec: MatMulOp, inputs: list[ir.Value]) -> list[ir.Value]:
    if spec.integer_input:
        codes, a_scale, a_zp, b, scales, zps, bias = inputs[:7]
        w = _dequantized_weight(body, spec, b, scales, zps, codes)
        a = body.op("Mul", [body.op("Sub", [body.op("CastLike", [codes, scales]), body.op("CastLike", [a_zp, scales])]),
                            a_scale])
        y = body.op("Add", [body.op("MatMul", [a, w]), bias])
        if spec.low_rank:
            y = body.op("Add", [y, body.op("MatMul", inputs[7:9])])
        if spec.activation is MatMulActivation.GELU_TANH:
            y = body.op("Gelu", [y], approximate="tanh")
        first = 9 if spec.low_rank else 7
        if spec.residual is MatMulResidual.GATED:
            y = body.op("Add", [inputs[first + 1], body.op("Mul", [inputs[first], y])])
        elif spec.residual is MatMulResidual.ADD:
            y = body.op("Add", [inputs[first], y])
        return [y]
    x, b, scales, zps = inputs
    return [body.op("MatMul", [x, _dequantized_weight(body, spec, b, scales, zps, x)])]


def build_function(spec: QuantizeOp | MatMulOp) -> ir.Function:
    inputs = [ir.Value(name=name) for name in spec.input_names]
    body = FunctionBody()
    if isinstance(spec, QuantizeOp):
        outputs = _quantize_body(body, spec, inputs)
        names, attributes = ("codes", "scale", "zero_point", "mean_y"), ["bits"]
    else:
        outputs = _matmul_body(body, spec, inputs)
        names, attributes = ("y",), ["block_size"]
    return body.function(spec.op_type, inputs, outputs, names,
                         attributes=[ir.Attr(a, ir.AttributeType.INT, None) for a in attributes])


def replace_matmul(model: ir.Model, node: ir.Node, spec: MatMulOp, inputs: list[ir.Value], output: ir.Value,
                   removed: list[ir.Node]) -> ir.Node:
    """Write ``spec`` (an epilogue form of the integer matmul `node`, same attributes) reading `inputs`, in place of
    `output` (its readers and name move to the new op), after `output`'s producer; then remove `removed` (`node`
    and what the epilogue absorbed). The new node's name ends in its op type, as the emitters name theirs."""
    ensure_function(model, spec)
    graph = model.graph
    new = ir.Node(HADANORM_DOMAIN, spec.op_type, inputs, attributes=list(node.attributes.values()),
                  name=f"{node.name.removesuffix(node.op_type)}{spec.op_type}" if node.name else None)
    graph.insert_after(output.producer(), new)
    name = output.name
    redirect_uses(output, new.outputs[0])
    graph.remove(removed, safe=True)
    new.outputs[0].name = name
    return new

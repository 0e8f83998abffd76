"""The ``qdq`` format: per-token dynamic (or static per-timestep) activation QDQ, INT-b ``DequantizeLinear`` weights.

Each site linear ``MatMul(a, W^T)`` becomes ``MatMul(QDQ(a~), DequantizeLinear(q, scale[, zp], axis=0,
block_size=B))`` with the plan's integers (`graph_passes.site_plan`). The activation quantizer (one per quantized
tensor, shared by the site's linears; sites without a transform that read one tensor share its quantizer) is
ReduceMax/ReduceMin over the last axis -> scale and zero point -> blocked ``QuantizeLinear``/``DequantizeLinear``
with ``axis=-1`` and ``block_size = width`` (one block per token): `activation_qdq`. The maths is in
`graph_passes.quantization`; static per-timestep quantizers in `graph_passes.static_act_quant`.

Bias corrections keep their float mean token: ``float-token`` multiplies it by the same ``DequantizeLinear`` weight,
``exact`` by an int8 per-output-channel copy (``DequantizeLinear(q8, scale, axis=1)``).

Conv sites: the quantizer goes on the site's tokens (per pixel), and the kernel ``W`` [out, in, kh, kw] is stored
as the matrix ``[in * kh * kw, out]`` (rows: input channel, then tap) in blocks of ``B * kh * kw`` rows;
``DequantizeLinear`` of that matrix is transposed and reshaped back to the kernel. Single-Hadamard sites (HQ-DM)
get their quantizer before the back rotation.

Note: onnxruntime's default graph optimizations fuse ``DequantizeLinear + MatMul`` into ``MatMulNBits`` whose
default accuracy level quantizes the activations to int8; `runtime.session` sets the session options that keep the
numbers of this graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.emit import SiteEmitter
from graph_passes.graph_utils import NodeSequence, add_initializer, make_node, shared_constant, tensor_name
from graph_passes.insert_transforms import float_dtype
from graph_passes.methods import BiasCorrection
from graph_passes.quantization import QuantizedWeight, container
from graph_passes.site_plan import SitePlan, StaticScales, WeightPlan
from graph_passes.static_act_quant import TimestepIndex, static_qdq


class QdqEmitter(SiteEmitter):
    quantizes = True

    def start(self) -> None:
        self.quantized: dict[int, ir.Value] = {}  # id(quantized tensor) -> its DequantizeLinear output
        self.timestep_index: TimestepIndex | None = None

    def quantize(self, index: int, plan: SitePlan, x: ir.Value, before: ir.Node) -> ir.Value:
        if id(x) not in self.quantized:
            spec = plan.act
            if spec.static is not None:
                dq = static_qdq(self.graph, before, x, spec.bits, plan.name, spec.static.scales,
                                self._timestep_index(spec.static))
            else:
                dq = activation_qdq(self.graph, before, x, spec.bits, plan.width, plan.name)
            self.quantized[id(x)] = dq
        return self.quantized[id(x)]

    def _timestep_index(self, static: StaticScales) -> TimestepIndex:
        if self.timestep_index is None:
            self.timestep_index = TimestepIndex(self.graph, static.timestep_input, static.timesteps)
        return self.timestep_index

    def weight(self, plan: SitePlan, weight: WeightPlan, node: ir.Node) -> ir.Value:
        key = ("dq", id(weight))
        if key not in self.weights:
            value = node.inputs[1]
            inputs = self._codes(f"{self.weight_name(plan, weight, node)}.q{weight.quantized.bits}", weight.quantized)
            dq = make_node("DequantizeLinear", inputs, f"{inputs[0].name}.dq", axis=0,
                           block_size=weight.quantized.block)
            dq.outputs[0].type, dq.outputs[0].shape = value.type, value.shape
            self.graph.insert_before(node, dq)
            self.weights[key] = dq.outputs[0]
        return self.weights[key]

    def conv_weight(self, plan: SitePlan, weight: WeightPlan, node: ir.Node) -> ir.Value:
        """``DequantizeLinear`` of the kernel's ``[in * kh * kw, out]`` matrix, turned back into the kernel."""
        key = ("dq", id(weight))
        if key not in self.weights:
            value, qw = node.inputs[1], weight.quantized
            name = f"{self.weight_name(plan, weight, node)}.q{qw.bits}"
            seq = NodeSequence(name)
            inputs = self._codes(name, qw)
            matrix = seq.op("DequantizeLinear", inputs, axis=0, block_size=qw.block)
            shape = add_initializer(self.graph, f"{inputs[0].name}.kernel_shape",
                                    np.array(weight.kernel_shape, np.int64))
            kernel = seq.op("Reshape", [seq.op("Transpose", [matrix], perm=[1, 0]), shape])
            kernel.type, kernel.shape = value.type, value.shape
            self.graph.insert_before(node, seq.nodes)
            self.weights[key] = kernel
        return self.weights[key]

    def correction_weight(self, plan: SitePlan, weight: WeightPlan, main: ir.Value, node: ir.Node) -> ir.Value:
        if plan.bias_correction is not BiasCorrection.EXACT:
            return main
        key = ("q8", id(weight))
        if key not in self.weights:
            value, qw = node.inputs[1], weight.correction
            q = add_initializer(self.graph, f"{self.weight_name(plan, weight, node)}.q8", qw.q)
            scale = add_initializer(self.graph, f"{q.name}.scale", qw.scale.reshape(-1))
            dq = make_node("DequantizeLinear", [q, scale], f"{q.name}.dq", axis=1)
            dq.outputs[0].type, dq.outputs[0].shape = value.type, value.shape
            self.graph.insert_before(node, dq)
            self.weights[key] = dq.outputs[0]
        return self.weights[key]

    def _codes(self, name: str, qw: QuantizedWeight) -> list[ir.Value]:
        """The initializers ``q, scale[, zero_point]`` of a weight (named ``<name>``, ``.scale``, ``.zero_point``)."""
        q = add_initializer(self.graph, name, qw.q)
        inputs = [q, add_initializer(self.graph, f"{q.name}.scale", qw.scale)]
        if qw.zero_point is not None:
            inputs.append(add_initializer(self.graph, f"{q.name}.zero_point", qw.zero_point))
        return inputs


def activation_qdq(graph: ir.Graph, before: ir.Node, x: ir.Value, bits: int, width: int, site: str) -> ir.Value:
    """Insert a per-token dynamic asymmetric QDQ of `x` (`width` channels, of site `site`) before `before`; returns
    the DQ output.

    When `bits` is narrower than its container (UINT4 holds 2-3 bits, UINT8 5-7), `x` is first clipped to
    ``[-zp * scale, (qmax - zp) * scale]`` (per token) so that ``round(x / scale) + zp`` stays in
    ``0..2^bits - 1`` (the container would saturate one level too high); the result equals
    ``clip(round(x / scale) + zp, 0, qmax)``.
    """
    dtype = float_dtype(x)
    zp_type, _ = container(bits, signed=False)
    axes = shared_constant(graph, "hadanorm.last_axis", np.array([-1], dtype=np.int64))
    zero = shared_constant(graph, f"hadanorm.zero_{dtype}", np.array(0, dtype=dtype))
    qmax = shared_constant(graph, f"hadanorm.qmax{bits}_{dtype}", np.array(2**bits - 1, dtype=dtype))
    tiny = shared_constant(graph, f"hadanorm.tiny_{dtype}", np.array(np.finfo(dtype).tiny, dtype=dtype))
    seq = NodeSequence(tensor_name(f"{site}.act_q"))
    op = seq.op

    hi = op("Max", [op("ReduceMax", [x, axes], keepdims=1), zero])
    lo = op("Min", [op("ReduceMin", [x, axes], keepdims=1), zero])
    scale = op("Max", [op("Div", [op("Sub", [hi, lo]), qmax]), tiny])
    zp_float = op("Clip", [op("Round", [op("Neg", [op("Div", [lo, scale])])]), zero, qmax])
    zp = op("Cast", [zp_float], to=zp_type)
    source = x
    if bits not in (4, 8):
        low = op("Mul", [op("Neg", [zp_float]), scale])
        high = op("Mul", [op("Sub", [qmax, zp_float]), scale])
        source = op("Max", [op("Min", [x, high]), low])  # Clip takes scalar bounds only
    q = op("QuantizeLinear", [source, scale, zp], axis=-1, block_size=width)
    dq = op("DequantizeLinear", [q, scale, zp], axis=-1, block_size=width)
    dq.type, dq.shape = x.type, x.shape
    graph.insert_before(before, seq.nodes)
    return dq

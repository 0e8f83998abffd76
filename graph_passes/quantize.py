"""Pass (e): weights to INT-b in blocks along the input dimension, activations to per-token dynamic QDQ.

Each site MatMul ``MatMul(a, W^T)`` becomes ``MatMul(QDQ(a), DequantizeLinear(q, scale[, zp], axis=0,
block_size=B))``. The activation quantizer (one per activation tensor, shared by the site's MatMuls) is
ReduceMax/ReduceMin over the last axis -> scale and zero point -> blocked ``QuantizeLinear``/``DequantizeLinear``
with ``axis=-1`` and ``block_size = width`` (one block per token). The maths is in `graph_passes.quantization`.

Bias-correction MatMuls (``hadanorm.role = bias-correction``) keep their float mean token: in ``float-token`` mode
they read the same dequantized weight as the site MatMul, in ``exact`` mode an int8 per-output-channel copy.

Conv sites (`graph_passes.conv_sites`): the quantizer goes on the site's tokens (per pixel), and the weight
``W`` [out, in, kh, kw] is quantized as the matrix ``[in * kh * kw, out]`` (rows: input channel, then tap) in blocks
of ``B * kh * kw`` rows, i.e. blocks of ``B`` input channels with all their taps (``B >= in``: per output channel);
``DequantizeLinear`` of that matrix is transposed and reshaped back to the kernel. Single-Hadamard sites (HQ-DM)
get their quantizer before the back rotation (`graph_passes.graph_utils.quantization_point`). With an
`ActScaleTable` the activation quantizers are static per-tensor ones with a scale per timestep
(`graph_passes.static_act_quant`) instead of per-token dynamic ones.

This is the ``qdq`` format; `graph_passes.lower_nbits` and `graph_passes.lower_fused` lower it to the others.
Note: onnxruntime's default graph optimizations fuse ``DequantizeLinear + MatMul`` into ``MatMulNBits`` whose
default accuracy level quantizes the activations to int8; `runtime.session` sets the session options that keep the
numbers of this graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import dataclasses

from graph_passes import tags
from graph_passes.graph_utils import (
    NodeSequence,
    add_initializer,
    make_node,
    quantization_point,
    shared_constant,
    site_width,
    tensor_name,
)
from graph_passes.methods import BiasCorrection
from graph_passes.static_act_quant import ActScaleTable, TimestepIndex, static_qdq
from graph_passes.quantization import (
    QuantConfig,
    container,
    quantize_weight,
    quantize_weight_per_channel_int8,
)


def _float_dtype(value: ir.Value) -> np.dtype:
    return value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)


class QuantizePass(ir.passes.InPlacePass):
    """`outer_sites`: the sites outside the model's blocks; they take ``config.for_site(outer=True)`` (8-bit weights
    and activations by default), the others `config`."""

    def __init__(self, config: QuantConfig, act_scales: ActScaleTable | None = None,
                 outer_sites: frozenset[str] = frozenset()):
        super().__init__()
        self.config = config
        self.act_scales = act_scales
        self.outer_sites = outer_sites

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        act_cache: dict[int, ir.Value] = {}
        weight_cache: dict[int, ir.Value] = {}
        int8_cache: dict[int, ir.Value] = {}
        self._index = TimestepIndex(graph, self.act_scales) if self.act_scales is not None else None
        matmuls = [n for n in graph if n.op_type in ("MatMul", "Conv") and tags.site_of(n) is not None]
        mains = [n for n in matmuls if tags.role_of(n) == tags.ROLE_MAIN]
        corrections = [n for n in matmuls if tags.role_of(n) == tags.ROLE_BIAS_CORRECTION]
        quantized_inputs: set[tuple[int, int]] = set()  # (consumer, index): a site's shared view/back rotation
        for node in mains:
            activation, consumer, index = quantization_point(node)
            weight = node.inputs[1]
            config = self.config.for_site(tags.site_of(node) in self.outer_sites)
            if (id(consumer), index) not in quantized_inputs:
                quantized_inputs.add((id(consumer), index))
                if id(activation) not in act_cache:
                    act_cache[id(activation)] = self._activation_qdq(graph, consumer, activation, site_width(node),
                                                                   tags.site_of(node), config)
                consumer.replace_input_with(index, act_cache[id(activation)])
            if id(weight) not in weight_cache:
                weight_cache[id(weight)] = self._weight_dq(graph, node, weight, config)
            node.replace_input_with(1, weight_cache[id(weight)])
        for node in corrections:
            weight = node.inputs[1]
            if node.metadata_props.get(tags.BIAS_CORRECTION) == BiasCorrection.EXACT.value:
                if id(weight) not in int8_cache:
                    int8_cache[id(weight)] = self._weight_int8_dq(graph, node, weight)
                node.replace_input_with(1, int8_cache[id(weight)])
            else:
                node.replace_input_with(1, weight_cache[id(weight)])
        return ir.passes.PassResult(model, modified=bool(mains))

    def _activation_qdq(self, graph: ir.Graph, before: ir.Node, x: ir.Value, width: int, site: str,
                        config: QuantConfig) -> ir.Value:
        if self.act_scales is not None:
            return static_qdq(graph, before, x, config.act_bits, site, self.act_scales, self._index)
        return activation_qdq(graph, before, x, config.act_bits, width, site)

    def _weight_dq(self, graph: ir.Graph, before: ir.Node, weight: ir.Value, config: QuantConfig) -> ir.Value:
        if before.op_type == "Conv":
            return self._conv_weight_dq(graph, before, weight, config)
        original = weight.const_value.numpy()
        qw = quantize_weight(original, config, original.dtype)
        q_init = add_initializer(graph, f"{weight.name}.q{config.weight_bits}", qw.q)
        name = q_init.name
        inputs = [q_init, add_initializer(graph, f"{name}.scale", qw.scale)]
        if qw.zero_point is not None:
            inputs.append(add_initializer(graph, f"{name}.zero_point", qw.zero_point))
        block = min(config.weight_block, original.shape[0])
        node = make_node("DequantizeLinear", inputs, f"{name}.dq", axis=0, block_size=block,
                         metadata={tags.WEIGHT_ROLE: tags.ROLE_MAIN})
        node.outputs[0].type, node.outputs[0].shape = weight.type, weight.shape
        graph.insert_before(before, node)
        return node.outputs[0]

    def _conv_weight_dq(self, graph: ir.Graph, before: ir.Node, weight: ir.Value, config: QuantConfig) -> ir.Value:
        """``W`` [out, in, kh, kw] as ``[in * kh * kw, out]`` in blocks of ``B * kh * kw`` rows, dequantized and
        turned back into the kernel."""
        original = weight.const_value.numpy()
        out, cin = original.shape[:2]
        taps = int(np.prod(original.shape[2:]))
        rows = original.reshape(out, cin * taps).T
        block = min(config.weight_block, cin) * taps
        qw = quantize_weight(rows, dataclasses.replace(config, weight_block=block), original.dtype)
        name = f"{weight.name}.q{config.weight_bits}"
        seq = NodeSequence(name, metadata={tags.WEIGHT_ROLE: tags.ROLE_MAIN})
        q_init = add_initializer(graph, name, qw.q)
        inputs = [q_init, add_initializer(graph, f"{q_init.name}.scale", qw.scale)]
        if qw.zero_point is not None:
            inputs.append(add_initializer(graph, f"{q_init.name}.zero_point", qw.zero_point))
        matrix = seq.op("DequantizeLinear", inputs, axis=0, block_size=block)
        shape = add_initializer(graph, f"{q_init.name}.kernel_shape", np.array(original.shape, np.int64))
        kernel = seq.op("Reshape", [seq.op("Transpose", [matrix], perm=[1, 0]), shape])
        kernel.type, kernel.shape = weight.type, weight.shape
        graph.insert_before(before, seq.nodes)
        return kernel

    def _weight_int8_dq(self, graph: ir.Graph, before: ir.Node, weight: ir.Value) -> ir.Value:
        original = weight.const_value.numpy()
        q, scale = quantize_weight_per_channel_int8(original, original.dtype)
        q_init = add_initializer(graph, f"{weight.name}.q8", q)
        name = q_init.name
        inputs = [q_init, add_initializer(graph, f"{name}.scale", scale)]
        node = make_node("DequantizeLinear", inputs, f"{name}.dq", axis=1, metadata={tags.WEIGHT_ROLE: tags.ROLE_BIAS_CORRECTION})
        node.outputs[0].type, node.outputs[0].shape = weight.type, weight.shape
        graph.insert_before(before, node)
        return node.outputs[0]


def activation_qdq(graph: ir.Graph, before: ir.Node, x: ir.Value, bits: int, width: int | None = None,
                   site: str | None = None) -> ir.Value:
    """Insert a per-token dynamic asymmetric QDQ of `x` (`width` channels, of site `site`) before `before`; returns
    the DQ output. Without `width` / `site`, `before` is the site's MatMul: its weight's rows and its site tag.

    Every node of the quantizer carries ``tags.ACT_QUANT`` (the lowering passes find it by that tag). When `bits`
    is narrower than its container (UINT4 holds 2-3 bits, UINT8 5-7), `x` is first clipped to
    ``[-zp * scale, (qmax - zp) * scale]`` (per token) so that ``round(x / scale) + zp`` stays in ``0..2^bits - 1`` (the container
    would saturate one level too high); the result equals ``clip(round(x / scale) + zp, 0, qmax)``.
    """
    dtype = _float_dtype(x)
    zp_type, _ = container(bits, signed=False)
    width = width if width is not None else site_width(before)
    site = site if site is not None else tags.site_of(before)
    name = tensor_name(f"{site}.act_q")
    axes = shared_constant(graph, "hadanorm.last_axis", np.array([-1], dtype=np.int64))
    zero = shared_constant(graph, f"hadanorm.zero_{dtype}", np.array(0, dtype=dtype))
    qmax = shared_constant(graph, f"hadanorm.qmax{bits}_{dtype}", np.array(2**bits - 1, dtype=dtype))
    tiny = shared_constant(graph, f"hadanorm.tiny_{dtype}", np.array(np.finfo(dtype).tiny, dtype=dtype))
    seq = NodeSequence(name, metadata={tags.ACT_QUANT: site})
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
    seq.nodes[-1].metadata_props[tags.ACT_BITS] = str(bits)
    dq.type, dq.shape = x.type, x.shape
    graph.insert_before(before, seq.nodes)
    return dq

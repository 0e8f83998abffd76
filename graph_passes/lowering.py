"""What the lowering passes read from the ``qdq`` graph: activation quantizers, weight DequantizeLinears, biases.

The ``nbits`` and ``fused`` formats are written by lowering the ``qdq`` graph that `QuantizePass` leaves, so every
format carries exactly the same integers and scales. A site MatMul there is
``MatMul(DQ_act(Q_act(x)), DQ_w(q, scale[, zp]))``, followed (centered sites, ``float-token``/``exact``) by
``Add(·, MatMul(mean~, DQ_w'))`` and usually by the linear's ``Add(·, bias)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graph_passes import tags
from graph_passes.int_packing import PackedWeight, pack


@dataclasses.dataclass
class ActivationQuantizer:
    x: ir.Value  # what is quantized
    dq: ir.Node  # its DequantizeLinear (the value the site MatMuls read)
    bits: int
    site: str


def activation_quantizer(value: ir.Value) -> ActivationQuantizer | None:
    """The per-token quantizer whose DequantizeLinear produces `value`, or None."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or tags.ACT_BITS not in dq.metadata_props:
        return None
    q = dq.inputs[0].producer()
    assert q is not None and q.op_type == "QuantizeLinear"
    x = q.inputs[0]
    clip = x.producer()
    if clip is not None and clip.op_type == "Max" and tags.ACT_QUANT in clip.metadata_props:
        x = clip.inputs[0].producer().inputs[0]  # Max(Min(x, high), low): the b-bit grid clip of narrow widths
    return ActivationQuantizer(x, dq, int(dq.metadata_props[tags.ACT_BITS]), dq.metadata_props[tags.ACT_QUANT])


def weight_dq(value: ir.Value) -> ir.Node | None:
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or tags.WEIGHT_ROLE not in node.metadata_props:
        return None
    return node


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def weight_codes(dq: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """``(q [K, N] int64, scale [k_blocks, N], zero_point [k_blocks, N] int64 | None, block, bits of container)``.

    Per-output-channel DequantizeLinears (``axis=1``, the ``exact`` correction's int8 copy) come back as one block."""
    q = np.asarray(_const(dq.inputs[0])).astype(np.int64)
    scale = np.asarray(_const(dq.inputs[1]))
    zp = _const(dq.inputs[2]) if len(dq.inputs) > 2 else None
    zp = None if zp is None else np.asarray(zp).astype(np.int64)
    axis = dq.attributes.get_int("axis", 1)
    container_bits = 4 if dq.inputs[0].dtype in (ir.DataType.INT4, ir.DataType.UINT4) else 8
    if axis == 1:  # one scale per output channel
        return q, scale.reshape(1, -1), None if zp is None else zp.reshape(1, -1), q.shape[0], container_bits
    block = dq.attributes.get_int("block_size", 0) or q.shape[0]
    return q, scale, zp, block, container_bits


def repack(dq: ir.Node) -> PackedWeight:
    """The weight of a qdq weight DequantizeLinear in the ``fused`` layout (same integers and scales)."""
    q, scale, zp, block, bits = weight_codes(dq)
    granule = 8 if bits == 4 else 4
    if block % granule:
        if block < q.shape[0]:
            raise ValueError(f"weight block size {block} is not a multiple of {granule}; use --weight-block 128")
        block += granule - block % granule  # a single block: pad it
    signed = dq.inputs[0].dtype in (ir.DataType.INT4, ir.DataType.INT8)
    if bits == 4:
        offset = 8 if signed else 0  # int4 -> unsigned nibble codes
    else:
        offset = 0 if signed else -128  # uint8 -> signed container
    zp = np.zeros(scale.shape, dtype=np.int64) if zp is None else zp
    return pack(q + offset, scale, zp + offset, bits, block)


def constant_bias(add: ir.Node, value: ir.Value, n: int) -> ir.Value | None:
    """The other input of ``Add(value, bias)`` when it is a constant of shape [n]."""
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    array = _const(other)
    if array is None or array.shape != (n,):
        return None
    return other


def single_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]

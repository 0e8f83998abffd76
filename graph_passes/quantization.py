"""Quantization maths in numpy: weights in blocks along the input dimension, activations per token.

Weights ``W^T`` ``[in, out]``, blocks of ``B`` rows (the last block may be shorter):

* symmetric (default): ``scale = max|w| / (2^(b-1) - 1)``, ``q = clip(round(w / scale), -(2^(b-1) - 1), 2^(b-1) - 1)``
* asymmetric: ``scale = (max(w, 0) - min(w, 0)) / (2^b - 1)``, ``zp = clip(round(-min / scale), 0, 2^b - 1)``,
  ``q = clip(round(w / scale) + zp, 0, 2^b - 1)``

Activations (built as graph nodes in `graph_passes.quantize.activation_qdq`), per token (last axis), dynamic
asymmetric min/max with zero in the range, computed in the activation dtype:
``scale = max((max(x, 0) - min(x, 0)) / (2^b - 1), tiny)``, ``zp = clip(round(-min / scale), 0, 2^b - 1)``,
``q = saturate(round(x / scale) + zp)`` in the container, ``x^ = (q - zp) * scale``.

Containers: INT4/UINT4 for up to 4 bits, INT8/UINT8 (narrower range) for 5 to 8 bits. Rounding is half-to-even.
"""

from __future__ import annotations

import dataclasses
import enum

import ml_dtypes
import numpy as np
import onnx_ir as ir


class OutputFormat(enum.Enum):
    """How the quantized linears are written (the same integers and scales in every format)."""

    QDQ = "qdq"  # QuantizeLinear/DequantizeLinear around float MatMuls: portable, simulates the integer maths
    NBITS = "nbits"  # com.microsoft::MatMulNBits (int4/int8 weights in memory, int8 dot products): stock onnxruntime
    FUSED = "fused"  # hadanorm::*Quantize + IntMatMul ops: integer kernels of the hadanorm library


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = 4
    act_bits: int = 4
    weight_block: int = 128
    weight_symmetric: bool = True
    format: OutputFormat = OutputFormat.QDQ

    def __post_init__(self) -> None:
        for bits in (self.weight_bits, self.act_bits):
            if not 2 <= bits <= 8:
                raise ValueError(f"bit width {bits} is outside 2..8")

    @property
    def label(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"


def container(bits: int, signed: bool) -> tuple[ir.DataType, type]:
    if bits <= 4:
        return (ir.DataType.INT4, ml_dtypes.int4) if signed else (ir.DataType.UINT4, ml_dtypes.uint4)
    return (ir.DataType.INT8, np.int8) if signed else (ir.DataType.UINT8, np.uint8)


@dataclasses.dataclass
class QuantizedWeight:
    q: np.ndarray  # [in, out] in the container dtype
    scale: np.ndarray  # [ceil(in / block), out] in the weight's float dtype
    zero_point: np.ndarray | None  # same shape as scale, container dtype (asymmetric only)
    block: int

    def dequantize(self) -> np.ndarray:
        rows = self.q.shape[0]
        scale = np.repeat(self.scale.astype(np.float64), self.block, axis=0)[:rows]
        q = self.q.astype(np.float64)
        if self.zero_point is not None:
            q = q - np.repeat(self.zero_point.astype(np.float64), self.block, axis=0)[:rows]
        return q * scale


def _block_reduce(w: np.ndarray, block: int, reduce) -> np.ndarray:
    rows = w.shape[0]
    blocks = -(-rows // block)
    padded = np.zeros((blocks * block, w.shape[1]), dtype=w.dtype)
    padded[:rows] = w
    return reduce(padded.reshape(blocks, block, w.shape[1]), axis=1)


def quantize_weight(weight_t: np.ndarray, config: QuantConfig, scale_dtype: np.dtype) -> QuantizedWeight:
    """Quantize ``W^T`` [in, out] (float64 maths; scales rounded to `scale_dtype` before the integers are set)."""
    w = np.asarray(weight_t, dtype=np.float64)
    block, bits = config.weight_block, config.weight_bits
    _, np_type = container(bits, signed=config.weight_symmetric)
    if config.weight_symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _block_reduce(np.abs(w), block, np.max) / qmax
        scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
        full = np.repeat(scale.astype(np.float64), block, axis=0)[: w.shape[0]]
        q = np.clip(np.round(w / full), -qmax, qmax)
        return QuantizedWeight(q.astype(np_type), scale, None, block)
    qmax = 2**bits - 1
    wmin = np.minimum(_block_reduce(w, block, np.min), 0.0)
    wmax = np.maximum(_block_reduce(w, block, np.max), 0.0)
    scale = (wmax - wmin) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
    zp = np.clip(np.round(-wmin / scale.astype(np.float64)), 0, qmax)
    full = np.repeat(scale.astype(np.float64), block, axis=0)[: w.shape[0]]
    full_zp = np.repeat(zp, block, axis=0)[: w.shape[0]]
    q = np.clip(np.round(w / full) + full_zp, 0, qmax)
    return QuantizedWeight(q.astype(np_type), scale, zp.astype(np_type), block)


def quantize_weight_per_channel_int8(weight_t: np.ndarray, scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (axis 1 of ``W^T``): the ``exact`` bias-correction copy."""
    w = np.asarray(weight_t, dtype=np.float64)
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
    q = np.clip(np.round(w / scale.astype(np.float64)[None, :]), -127, 127).astype(np.int8)
    return q, scale

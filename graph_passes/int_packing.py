"""Packed weight layouts of the ``fused`` format (``hadanorm::IntMatMul4/8``, ``FloatMatMul4/8``), in numpy.

A weight ``W^T`` ``[K, N]`` quantized in blocks of ``bs`` rows along ``K`` is stored as unsigned (4-bit) or signed
(8-bit) codes ``u[k, n]`` with a scale and a zero point per (block, column):

    w[k, n] = scales[k // bs, n] * (u[k, n] - zero_points[k // bs, n])

Tensors (``tiles = ceil(N / 16)``, ``k_blocks = ceil(K / bs)``, ``K_pad = k_blocks * bs``):

* ``scales`` ``[k_blocks, N]`` (float), ``zero_points`` ``[k_blocks, N]`` (uint8 for 4-bit, int8 for 8-bit);
* 4-bit ``b`` uint8 ``[tiles, K_pad / 8, 64]``: byte ``[t, g, 4c + j]`` = ``u[8g + j, 16t + c]`` in the low nibble
  and ``u[8g + 4 + j, 16t + c]`` in the high nibble (codes 0..15);
* 8-bit ``b`` int8 ``[tiles, K_pad / 4, 64]``: byte ``[t, g, 4c + j]`` = ``u[4g + j, 16t + c]`` (codes -128..127).

One 64-byte row holds 16 columns x 4 consecutive ``k`` (x2 nibbles): the operand of one AVX-512 VNNI
``vpdpbusd`` against 4 activation bytes broadcast to every lane (NEON ``sdot`` takes the same 4-byte groups).
Padding rows (``k >= K``) hold the block's zero point, so they add nothing; padding columns are ignored.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graph_passes.quantization import QuantConfig, QuantizedWeight, quantize_weight

TILE = 16  # output columns per 64-byte row


@dataclasses.dataclass
class PackedWeight:
    b: np.ndarray
    scales: np.ndarray  # [k_blocks, N], the weight's float dtype
    zero_points: np.ndarray  # [k_blocks, N], uint8 (4-bit) or int8 (8-bit)
    bits: int  # container: 4 or 8
    block_size: int
    k: int
    n: int

    @property
    def nbytes(self) -> int:
        return self.b.nbytes + self.scales.nbytes + self.zero_points.nbytes


def container_bits(weight_bits: int) -> int:
    return 4 if weight_bits <= 4 else 8


def _padded_codes(u: np.ndarray, zero_points: np.ndarray, block: int, dtype) -> np.ndarray:
    k, n = u.shape
    k_blocks = zero_points.shape[0]
    tiles = -(-n // TILE)
    full = np.repeat(zero_points.astype(np.int64), block, axis=0)  # [K_pad, N]: padding rows = zero point
    full[:k] = u
    padded = np.zeros((k_blocks * block, tiles * TILE), dtype=np.int64)
    padded[:, :n] = full
    return padded.astype(dtype)


def pack(u: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, block: int) -> PackedWeight:
    """Pack codes ``u`` [K, N] (uint in 0..15 for bits 4, int in -128..127 for bits 8)."""
    k, n = u.shape
    if bits == 4:
        if block % 8:
            raise ValueError(f"4-bit block size {block} is not a multiple of 8")
        p = _padded_codes(u, zero_points, block, np.uint8)  # [K_pad, N_pad]
        g = p.shape[0] // 8
        tiles = p.shape[1] // TILE
        v = p.reshape(g, 2, 4, tiles, TILE)  # [g, h, j, t, c]: k = 8g + 4h + j, n = 16t + c
        v = v.transpose(3, 0, 1, 4, 2)  # [t, g, h, c, j]
        b = (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(tiles, g, 4 * TILE).astype(np.uint8)
        zp = zero_points.astype(np.uint8)
    elif bits == 8:
        if block % 4:
            raise ValueError(f"8-bit block size {block} is not a multiple of 4")
        p = _padded_codes(u, zero_points, block, np.int8)
        g = p.shape[0] // 4
        tiles = p.shape[1] // TILE
        b = p.reshape(g, 4, tiles, TILE).transpose(2, 0, 3, 1).reshape(tiles, g, 4 * TILE).astype(np.int8)
        zp = zero_points.astype(np.int8)
    else:
        raise ValueError(f"container bits must be 4 or 8, got {bits}")
    return PackedWeight(np.ascontiguousarray(b), scales, zp, bits, block, k, n)


def unpack_codes(packed: PackedWeight) -> np.ndarray:
    """The codes ``u`` [K, N] back from ``packed.b`` (int64)."""
    b = packed.b
    tiles = b.shape[0]
    if packed.bits == 4:
        g = b.shape[1]
        v = b.astype(np.int64).reshape(tiles, g, TILE, 4)  # [t, g, c, j]
        both = np.stack([v & 0x0F, v >> 4], axis=2)  # [t, g, h, c, j]
        full = both.transpose(1, 2, 4, 0, 3).reshape(g * 8, tiles * TILE)
    else:
        g = b.shape[1]
        v = b.astype(np.int64).reshape(tiles, g, TILE, 4)  # [t, g, c, j]
        full = v.transpose(1, 3, 0, 2).reshape(g * 4, tiles * TILE)
    return full[: packed.k, : packed.n]


def dequantize(packed: PackedWeight) -> np.ndarray:
    """``W^T`` [K, N] in float64."""
    u = unpack_codes(packed)
    zp = np.repeat(packed.zero_points.astype(np.float64), packed.block_size, axis=0)[: packed.k]
    scale = np.repeat(packed.scales.astype(np.float64), packed.block_size, axis=0)[: packed.k]
    return (u - zp) * scale


def repack(qw: QuantizedWeight) -> PackedWeight:
    """A quantized weight (`graph_passes.quantization`) in this layout: the same integers and scales. Symmetric
    codes get the container's midpoint as zero point (8 for 4 bits, 0 for 8 bits); unsigned 8-bit codes move to
    the signed container. A single block that is not a multiple of the layout's granule (8 rows for 4 bits, 4 for
    8) is padded with zero-point rows."""
    bits = container_bits(qw.bits)
    q = qw.q.astype(np.int64)
    block, granule = qw.block, 8 if bits == 4 else 4
    if block % granule:
        if block < q.shape[0]:
            raise ValueError(f"weight block size {block} is not a multiple of {granule}; use --weight-block 128")
        block += granule - block % granule  # a single block: pad it
    if bits == 4:
        offset = 8 if qw.symmetric else 0  # int4 -> unsigned nibble codes
    else:
        offset = 0 if qw.symmetric else -128  # uint8 -> signed container
    zp = np.zeros(qw.scale.shape, dtype=np.int64) if qw.zero_point is None else qw.zero_point.astype(np.int64)
    return pack(q + offset, qw.scale, zp + offset, bits, block)


def quantize_and_pack(weight_t: np.ndarray, weight_bits: int, block: int, symmetric: bool,
                      scale_dtype: np.dtype) -> PackedWeight:
    """Quantize ``W^T`` [K, N] exactly like every format (`graph_passes.quantization.quantize_weight`) and pack
    it."""
    config = QuantConfig(weight_bits=weight_bits, act_bits=8, weight_block=block, weight_symmetric=symmetric)
    return repack(quantize_weight(weight_t, config, scale_dtype))

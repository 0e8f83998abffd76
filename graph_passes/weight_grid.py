"""The min/max weight grid of one group, shared by every weight range (min/max, MSE, GPTQ): the scale is rounded to
the scale dtype before any integer is set.

- symmetric: ``scale = amax / qmax`` (1 where amax = 0), codes ``round(w / scale)`` in ``[-qmax, qmax]``;
- asymmetric: ``lo = min(w, 0)``, ``hi = max(w, 0)``, ``scale = (hi - lo) / qmax`` (1 where 0),
  ``zero_point = clip(round(-lo / scale), 0, qmax)``, codes ``round(w / scale) + zero_point`` in ``[0, qmax]``.

Two-level scales (``--weight-scales two-level``, symmetric weights of at most 4 bits): each output column's block
scales are put on ``c r`` with one unit ``c`` per column and an integer ``r`` in ``1..16`` per block:

- ``c = max_blk scale / 16`` over the column's blocks that are not all zero, rounded up to a value of the scale
  dtype whose significand has its 4 lowest bits zero (so every ``c r`` is exact in the scale dtype);
- ``r``: of ``floor(scale / c)`` and ``ceil(scale / c)`` (in 1..16; 1 for blocks of zeros) the one whose codes give
  the block the smaller squared error (`graph_passes.quantization`; GPTQ, which sets a group's scale before its
  codes exist, takes the ceil: ``c r >= scale``, no range shrinks);
- codes are then set with ``c r`` as the block's scale, as for any scale. A weight whose blocks' squared errors grow
  by more than 12.2% (0.5 dB) on average, each relative to its block-scale error, keeps its block scales.

Then ``r q`` (``|q| <= 7``) fits int8 and the CPU kernels run the weight as an 8-bit one with a single scale per
column over the whole input (no per-block fold; `runtime/kernels/int_kernels.h`, TwoLevel); every format stores the
same block scales, so any runtime reads the file as before.
"""

from __future__ import annotations

import numpy as np


def sym_scale(amax: np.ndarray, qmax: int, scale_dtype: np.dtype) -> np.ndarray:
    scale = amax / qmax
    return np.where(scale > 0, scale, 1.0).astype(scale_dtype)


def asym_scale_zp(wmin: np.ndarray, wmax: np.ndarray, qmax: int,
                  scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    scale = (wmax - wmin) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
    zp = np.clip(np.round(-wmin / scale.astype(np.float64)), 0, qmax)
    return scale, zp


TWO_LEVEL_RATIO = 16  # the largest r of two-level scales
_FREE_BITS = 4  # low significand bits of c left zero: c r exact for r <= 16


def _round_up_coarse(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The smallest positive value of `dtype` >= `value` whose significand's `_FREE_BITS` lowest bits are zero."""
    dtype = np.dtype(dtype)
    uint = {4: np.uint32, 2: np.uint16}[dtype.itemsize]
    v = value.astype(dtype)
    bits = v.view(uint).astype(np.int64)
    bits = np.where(v.astype(np.float64) < value, bits + 1, bits)  # rounded down: the next value up
    step = 1 << _FREE_BITS
    bits = (bits + step - 1) // step * step  # a carry into the exponent stays a valid, larger positive value
    return bits.astype(uint).view(dtype)


def two_level_unit(scale: np.ndarray, amax: np.ndarray, scale_dtype: np.dtype) -> np.ndarray:
    """``c`` per output column (module docstring) from the block scales and maxima [blocks, out], float64 of the
    scale dtype; 1 / 16 for a column of zeros."""
    top = np.where(np.asarray(amax) > 0, np.asarray(scale, dtype=np.float64), 0.0).max(axis=0)
    unit = _round_up_coarse(np.where(top > 0, top / TWO_LEVEL_RATIO, 1.0 / TWO_LEVEL_RATIO), scale_dtype)
    return unit.astype(np.float64)


def two_level_grid(ratio: np.ndarray, amax: np.ndarray, unit: np.ndarray, scale_dtype: np.dtype) -> np.ndarray:
    """``unit r`` in the scale dtype (exact) for integer ratios [.., out], clipped to 1..16, 1 for blocks of zeros."""
    ratio = np.where(np.asarray(amax) > 0, np.clip(ratio, 1, TWO_LEVEL_RATIO), 1.0)
    return (unit * ratio).astype(scale_dtype)


def two_level_scale(scale: np.ndarray, amax: np.ndarray, unit: np.ndarray, scale_dtype: np.dtype) -> np.ndarray:
    """Block scales [.., out] snapped up to ``unit r``, ``r = ceil(scale / unit)`` (`two_level_grid`). GPTQ's groups
    take this; `graph_passes.quantization` also tries the floor."""
    return two_level_grid(np.ceil(np.asarray(scale, dtype=np.float64) / unit), amax, unit, scale_dtype)

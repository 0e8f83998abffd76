"""HQ-DM's integer form: the unrotated integer weight times the raw Hadamard, split into int8 parts.

A single-Hadamard site computes ``y = Q(x~) R W^T`` with ``x~ = x R^T`` rotated, ``R = H_L (x) H_R`` orthonormal
(the back rotation), and ``W^T`` quantized unrotated: ``W^T[k, n] = s[k // B, n] (q - z)[k, n]`` in blocks of
``B`` rows. Every nonzero entry of a Hadamard factor has the same magnitude (``1 / sqrt(order)``; an identity
factor 1), so ``R = c R_raw`` with ``R_raw`` in {-1, 0, 1} and ``c = 1 / sqrt(n_H)``. When every row group that
``R`` mixes lies inside one weight block (the Hadamard block divides ``B``, or the weight is one block per output
channel), the scales factor out of the sum:

    (R W^T)[k, n] = c s[k // B, n] M[k, n],     M = R_raw (q - z)       (exact integers)

``|M| <= n_H * max|q - z|`` (480 for HQ-DM's 32 and 4-bit asymmetric weights), too wide for int8, so
``M = sum_p 128^p m_p`` with ``m_p`` in -64..63 (two parts, ``low + 128 * high``, for ``|M| <= 8127``), and

    y = sum_p IntMatMul8(codes, m_p, scales = 128^p c s)

one exact int32 dot product per part (`graph_passes.emit_fused`).
"""

from __future__ import annotations

import numpy as np

from graph_passes.errors import GraphInputError


def _raw(factor: np.ndarray) -> tuple[np.ndarray, float]:
    """(integer matrix in {-1, 0, 1}, c) with ``factor = c * raw``."""
    f = np.asarray(factor, dtype=np.float64)
    c = float(np.abs(f[f != 0]).min())
    raw = np.round(f / c)
    if np.abs(raw * c - f).max() > 1e-3 * c or np.abs(raw).max() > 1:
        raise ValueError("a Hadamard factor is not a scaled +-1 matrix")
    return raw.astype(np.int64), c


def rotated_integer_weight(w_int: np.ndarray, left: np.ndarray, right: np.ndarray, block: int
                           ) -> tuple[np.ndarray, float]:
    """``(M = R_raw w_int, c)`` for ``R = left (x) right`` and an integer weight ``w_int`` [K, N] in blocks of
    `block` rows; raises `GraphInputError` when ``R`` mixes rows of different weight blocks."""
    k_rows = w_int.shape[0]
    left_raw, c_left = _raw(left)
    right_raw, c_right = _raw(right)
    group = right.shape[0] if np.array_equal(left_raw, np.eye(left.shape[0], dtype=np.int64)) else k_rows
    if block < k_rows and block % group:
        raise GraphInputError(
            f"--method hqdm --format fused: the Hadamard mixes {group} input channels but the weight blocks hold "
            f"{block}; use --hadamard block with a block that divides --weight-block, or per-channel weights "
            "(--weight-block at least the width)")
    x = w_int.reshape(left.shape[0], right.shape[0], -1)
    m = np.einsum("ak,bm,kmn->abn", left_raw, right_raw, x).reshape(w_int.shape)
    return m, c_left * c_right


def int8_parts(m: np.ndarray) -> list[np.ndarray]:
    """``m = sum_p 128^p part_p`` with every part in -64..63 (int8); at least one part."""
    parts = []
    rest = np.asarray(m, dtype=np.int64)
    while True:
        high = (rest + 64) // 128
        parts.append((rest - 128 * high).astype(np.int8))
        rest = high
        if not rest.any():
            return parts

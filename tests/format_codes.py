"""The integers a 4-bit symmetric weight is stored as in each output format, read back from the written models:
the check that qdq, nbits and fused carry the same codes and scales (tests/test_site_plan.py, tests/test_gptq.py)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.int_packing import PackedWeight, unpack_codes


def initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def assert_same_int4_codes(qdq: ir.Model, nbits: ir.Model, fused: ir.Model, weight: str) -> np.ndarray:
    """`weight`'s int4 codes [K, N] and scales in the qdq model equal MatMulNBits' ([N, k_blocks, 8] bytes, low nibble
    first, zero point 8) and IntMatMul4's packed layout (unsigned nibbles, zero point 8); returns the qdq codes."""
    q = initializer(qdq, f"{weight}.q4").astype(np.int64)
    scale = initializer(qdq, f"{weight}.q4.scale")
    k, n = q.shape
    b = initializer(nbits, f"{weight}.q4.nbits").astype(np.int64)
    codes = np.stack([b & 15, b >> 4], axis=-1).reshape(n, -1).T[:k] - 8
    assert np.array_equal(codes, q)
    assert np.array_equal(initializer(nbits, f"{weight}.q4.nbits_scales"), scale.T)
    packed = PackedWeight(initializer(fused, f"{weight}.q4.packed4"), initializer(fused, f"{weight}.q4.scales"),
                          initializer(fused, f"{weight}.q4.zero_points"), 4, 16, k, n)
    assert np.array_equal(unpack_codes(packed) - 8, q) and np.all(packed.zero_points == 8)
    assert np.array_equal(packed.scales, scale)
    return q

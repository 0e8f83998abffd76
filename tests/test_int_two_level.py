"""Two-level weight scales (`--weight-scales two-level`): the quantizer's scales are one unit per output column times
an integer 1..16 per block, and IntMatMul4 runs such a weight as an 8-bit one over a single block (int_kernels.h,
TwoLevel): every kernel path gives the scalar path's bits, the result is the block path's within float rounding,
and both equal the exact maths."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from graph_passes.gptq import GptqFactor
from graph_passes.int_packing import repack, unpack_codes
from graph_passes.quantization import QuantConfig, WeightRange, WeightScales, quantize_weight
from graph_passes.weight_grid import TWO_LEVEL_RATIO
from tests.kernel_env import kernel_session, supported_isas
from tests.test_int_kernels import (F16, F32, MatMulCase, activations, int_matmul_model, int_matmul_reference,
                                    one_node_model, onnx_type, rel_l2, run_every_path, run_on, weight_inits)


@pytest.fixture(scope="module")
def library(kernel_library):
    return kernel_library


def weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    """W^T [k, n] with rows of different sizes (so the blocks' scales differ) and a few large columns."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * np.exp(0.5 * rng.standard_normal((k, 1))) / np.sqrt(k)
    w[:, : max(1, n // 10)] *= 5.0
    w[256:384, 1] = 0.0  # a block of zeros
    return w


def two_level(w: np.ndarray, bits: int = 4, dtype=F32, weight_range=WeightRange.MINMAX, gptq=None):
    config = QuantConfig(weight_bits=bits, weight_scales=WeightScales.TWO_LEVEL, weight_range=weight_range)
    return quantize_weight(w, config, np.dtype(dtype), gptq)


def unit_and_ratio(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = scale.astype(np.float64)
    unit = np.zeros(s.shape[1])
    for j in range(s.shape[1]):  # the largest c with every s / c an integer in 1..16
        for big in range(TWO_LEVEL_RATIO, 0, -1):
            c = s[:, j].max() / big
            r = s[:, j] / c
            if np.all(np.abs(r - np.round(r)) < 1e-9) and r.min() >= 1 - 1e-9:
                unit[j] = c
                break
    return unit, s / unit


@pytest.mark.parametrize("dtype", [F32, F16])
def test_two_level_scales_structure(dtype):
    """Every column's block scales are c r with r an integer in 1..16 (exact in the scale dtype), each block's r the
    floor or the ceil of its min/max scale over c, and blocks of zeros take r = 1."""
    w = weight(1152, 40)
    block = quantize_weight(w, QuantConfig(), np.dtype(dtype))
    tl = two_level(w, dtype=dtype)
    unit, ratio = unit_and_ratio(tl.scale)
    assert np.all(np.abs(ratio - np.round(ratio)) == 0) and ratio.min() >= 1 and ratio.max() <= TWO_LEVEL_RATIO
    live = np.ones(tl.scale.shape, bool)
    live[2, 1] = False  # the block of zeros: min/max gives it scale 1
    exact = block.scale.astype(np.float64)[live] / np.broadcast_to(unit, tl.scale.shape)[live]
    assert np.all((ratio[live] == np.floor(exact)) | (ratio[live] == np.ceil(exact)) | (ratio[live] == 1))
    assert ratio[2, 1] == 1  # rows 256..383 of column 1: zeros
    assert np.array_equal(tl.q[256:384, 1], np.zeros(128))


@pytest.mark.parametrize("spread", [0.0, 0.5, 1.0])
def test_two_level_weight_error(spread):
    """Two-level against block min/max scales, weight SQNR on weights whose rows differ in size by exp(spread N):
    measured 18.60 -> 18.93, 14.69 -> 15.05, 12.89 -> 13.06 dB (choosing each block's ratio by its error clips a
    little where that pays, as the MSE range does); bound: never more than 0.5 dB below (the guard's tolerance)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1152, 256)) * np.exp(rng.standard_normal((1152, 1)) * spread)

    def sqnr(q):
        return 10 * np.log10((w**2).sum() / ((q.dequantize() - w) ** 2).sum())

    block, tl = sqnr(quantize_weight(w, QuantConfig(), np.dtype(F32))), sqnr(two_level(w))
    assert tl >= block - 0.5, (block, tl)


def test_two_level_guard_keeps_block_scales():
    """A weight whose columns' blocks differ by far more than 16x keeps its block scales (on the two-level grid the
    small blocks' errors would grow far more than 12.2% on average, relative to their own)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1152, 32))
    w[:128] *= 400.0  # one block per column 400x the others: the small blocks all at r = 1
    block, tl = quantize_weight(w, QuantConfig(), np.dtype(F32)), two_level(w)
    np.testing.assert_array_equal(tl.scale, block.scale)


def test_two_level_gptq_scales():
    """GPTQ sets each group's scale on the two-level grid of the column's unit (from the unquantized weight)."""
    w = weight(256, 24)
    x = np.random.default_rng(3).standard_normal((512, 256))
    tl = two_level(w, weight_range=WeightRange.GPTQ, gptq=GptqFactor.of(x.T @ x))
    _, ratio = unit_and_ratio(tl.scale)
    assert np.all(np.abs(ratio - np.round(ratio)) == 0) and ratio.max() <= TWO_LEVEL_RATIO


CASES = [  # (case, what it covers)
    MatMulCase(1152, 272, 4, 4, True, 2, 53, "B1N"),  # amx: 32-row panels, leftover rows, 17 column tiles
    MatMulCase(4608, 96, 4, 8, True, 1, 40, "N"),  # 36 blocks, 8-bit activations
    MatMulCase(200, 100, 4, 4, True, 3, 5, "B1N"),  # K not a multiple of the block, N not of 16
    MatMulCase(1152, 72, 4, 4, True, 1, 33, "N", F16),
    MatMulCase(512, 48, 3, 4, True, 1, 19, "N", F32, 256),  # 3-bit weights, block 256
    MatMulCase(1152, 200, 4, 4, True, 2, 300, "B1N"),  # 600 rows: several row tasks, the weight expanded once
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_two_level_matmul_every_path(library, case, monkeypatch):
    """Every path's bits equal the scalar path's (the 8-bit one-block route), the exact maths within float
    rounding, and the block route (HADANORM_KERNELS_TWO_LEVEL=0) within float rounding of it but not bit for bit (it
    folds block by block: the route really changes)."""
    isas = supported_isas(library)
    p = repack(two_level(weight(case.k, case.n), bits=case.wbits, dtype=case.dtype))
    codes, scale, zp, bias = activations(case)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    model = int_matmul_model(case, p)
    (y,) = run_every_path(library, isas, model, feeds)
    expected = int_matmul_reference(codes, scale, zp, p, bias)
    if case.dtype == F32:
        assert rel_l2(y, expected) <= 1e-6
    else:
        np.testing.assert_allclose(y.astype(np.float64), expected, rtol=2**-10, atol=2**-24 * 4)
    monkeypatch.setenv("HADANORM_KERNELS_TWO_LEVEL", "0")
    (block,) = run_on(library, model, feeds, isas[-1])
    assert rel_l2(block, y.astype(np.float64)) <= (1e-6 if case.dtype == F32 else 2**-10)
    if case.dtype == F32 and case.k >= 1152:
        assert not np.array_equal(block, y)


def test_two_level_expanded_once_for_several_row_tasks(library):
    """Over one row task's rows (amx 256, avx512vnni 96, ...) the call expands the weight once into scratch that every
    task reads (matmul_ops.cc), where each task expanded its own tiles before: the same bytes, so the 600 rows in one
    call give the bits of 8-row calls (one row task each on every path, the scalar one's 8 rows included: their own
    expansion), on every path."""
    case = MatMulCase(1152, 200, 4, 4, True, 1, 600, "N")
    p = repack(two_level(weight(case.k, case.n)))
    codes, scale, zp, bias = activations(case)
    model = int_matmul_model(case, p)
    for isa in supported_isas(library):
        (whole,) = kernel_session(model, library, isa).run(None, {"codes": codes, "a_scale": scale,
                                                                  "a_zero_point": zp, "bias": bias})
        session = kernel_session(model, library, isa)
        parts = [session.run(None, {"codes": codes[:, r:r + 8], "a_scale": scale[:, r:r + 8],
                                    "a_zero_point": zp[:, r:r + 8], "bias": bias})[0] for r in range(0, 600, 8)]
        assert np.array_equal(whole, np.concatenate(parts, axis=1)), isa


def test_two_level_refused_past_the_int32_range(library, monkeypatch):
    """Past 65536 rows the one-block int32 sums could overflow (255 x 128 a row), so the weight keeps the block route:
    the same bits as with HADANORM_KERNELS_TWO_LEVEL=0, the exact maths within float rounding."""
    case = MatMulCase(65536 + 128, 16, 4, 8, True, 1, 3, "N")
    p = repack(two_level(weight(case.k, case.n)))
    codes, scale, zp, bias = activations(case)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    isa = supported_isas(library)[-1]
    (y,) = run_on(library, int_matmul_model(case, p), feeds, isa)
    assert rel_l2(y, int_matmul_reference(codes, scale, zp, p, bias)) <= 1e-6
    monkeypatch.setenv("HADANORM_KERNELS_TWO_LEVEL", "0")
    (block,) = run_on(library, int_matmul_model(case, p), feeds, isa)
    np.testing.assert_array_equal(y, block)


def test_two_level_weight_as_input(library, monkeypatch):
    """A two-level weight fed at run time takes the same route as a constant one (same bits)."""
    case = CASES[0]
    p = repack(two_level(weight(case.k, case.n)))
    codes, scale, zp, bias = activations(case)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    isa = supported_isas(library)[-1]
    (constant,) = run_on(library, int_matmul_model(case, p), feeds, isa)
    (fed,) = run_on(library, int_matmul_model(case, p, constant_weight=False),
                    {**feeds, "b": p.b, "scales": p.scales, "zero_points": p.zero_points}, isa)
    np.testing.assert_array_equal(fed, constant)


FLOAT_CASES = [  # (case, what it covers): FloatMatMul4, the mean token's product
    MatMulCase(1152, 272, 4, 8, True, 2, 1, "N"),  # 17 column tiles, one token per batch element
    MatMulCase(200, 100, 4, 8, True, 3, 2, "N"),  # K not a multiple of the block, N not of 16
    MatMulCase(1152, 72, 4, 8, True, 1, 3, "N", F16),
]


@pytest.mark.parametrize("case", FLOAT_CASES, ids=[c.id for c in FLOAT_CASES])
def test_two_level_float_matmul_every_path(library, case, monkeypatch):
    """FloatMatMul4 keeps no per-block scales of a two-level weight (each task rebuilds c r from the units and
    ratios): every path's bits equal the scalar path's and the block route's (HADANORM_KERNELS_TWO_LEVEL=0, which
    keeps the scales), the exact maths within float rounding."""
    isas = supported_isas(library)
    p = repack(two_level(weight(case.k, case.n), bits=case.wbits, dtype=case.dtype))
    x = np.random.default_rng(case.k).standard_normal((case.batch, case.m, case.k)).astype(case.dtype)
    model = one_node_model("FloatMatMul4", {"x": x}, weight_inits(p), ["y"], block_size=p.block_size)
    (y,) = run_every_path(library, isas, model, {"x": x})
    u = unpack_codes(p).astype(np.float64)
    scales = np.repeat(p.scales.astype(np.float64), p.block_size, axis=0)[: case.k]
    expected = x.astype(np.float64) @ ((u - 8.0) * scales)
    tol = 1e-6 if case.dtype == F32 else 2**-10
    assert rel_l2(y, expected) <= tol
    monkeypatch.setenv("HADANORM_KERNELS_TWO_LEVEL", "0")
    (block,) = run_on(library, model, {"x": x}, isas[-1])
    np.testing.assert_array_equal(block, y)


def test_two_level_shared_by_the_kernels_of_one_weight(library):
    """IntMatMul4 and the FloatMatMul4 of its mean token read the same initializers and share one two-level form
    (int_kernels.h, detect_two_level): in one session both give the bits each gives alone, and a second session on
    another two-level weight with the same shapes gives that weight's results (outputs only: the test does not see
    whether the form was shared)."""
    case = CASES[0]
    isa = supported_isas(library)[-1]
    codes, scale, zp, bias = activations(case)
    x = np.random.default_rng(3).standard_normal((case.batch, 1, case.k)).astype(F32)
    for seed in (0, 1):
        p = repack(two_level(weight(case.k, case.n, seed=seed)))
        inits = [numpy_helper.from_array(v, k) for k, v in weight_inits(p).items()]
        nodes = [helper.make_node("IntMatMul4", ["codes", "a_scale", "a_zero_point", "b", "scales", "zero_points",
                                                 "bias"], ["y"], domain="hadanorm", block_size=p.block_size),
                 helper.make_node("FloatMatMul4", ["x", "b", "scales", "zero_points"], ["mean_y"], domain="hadanorm",
                                  block_size=p.block_size)]
        feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias, "x": x}
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info(k, onnx_type(v.dtype), list(v.shape)) for k, v in feeds.items()],
            [helper.make_empty_tensor_value_info("y"), helper.make_empty_tensor_value_info("mean_y")], inits)
        both = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("hadanorm", 1)],
                                 ir_version=10).SerializeToString()
        y, mean_y = run_on(library, both, feeds, isa)
        (y_alone,) = run_on(library, int_matmul_model(case, p), {k: v for k, v in feeds.items() if k != "x"}, isa)
        (mean_alone,) = run_on(library, one_node_model("FloatMatMul4", {"x": x}, weight_inits(p), ["y"],
                                                       block_size=p.block_size), {"x": x}, isa)
        np.testing.assert_array_equal(y, y_alone)
        np.testing.assert_array_equal(mean_y, mean_alone)
        assert rel_l2(y, int_matmul_reference(codes, scale, zp, p, bias)) <= 1e-6


FAST_CALIB = ("--calib-samples", "1", "--calib-steps", "2")


def test_two_level_cli(tiny_onnx, tmp_path, hn_cli, kernel_library):
    """`--weight-scales two-level` writes two-level scales into every IntMatMul4 and records it in the metadata; with
    asymmetric weights it is a one-line error."""
    import onnx
    from onnx import numpy_helper

    fused = tmp_path / "f.onnx"
    result = hn_cli(tiny_onnx, "--weight-scales", "two-level", "--format", "fused", "-o", fused, *FAST_CALIB)
    assert result.exit_code == 0, result.err
    model = onnx.load(fused)
    assert {p.key: p.value for p in model.metadata_props}["hn_export.weight_scales"] == "two-level"
    inits = {i.name: i for i in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type.startswith("IntMatMul4"):
            scales = numpy_helper.to_array(inits[node.input[4]]).astype(np.float64)
            _, ratio = unit_and_ratio(scales)
            assert np.all(ratio == np.round(ratio)) and ratio.max() <= TWO_LEVEL_RATIO, node.name
            checked += 1
    assert checked > 0
    bad = tmp_path / "bad.onnx"
    result = hn_cli(tiny_onnx, "--weight-scales", "two-level", "--asymmetric-weights", "-o", bad, *FAST_CALIB)
    assert result.exit_code == 2 and "--weight-scales two-level needs symmetric weights" in result.err
    assert "Traceback" not in result.err and not bad.exists()

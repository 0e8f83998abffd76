"""The integer kernels of the hadanorm library (quantize ops, IntMatMul4/8, FloatMatMul4/8, float16 everywhere)
against numpy references written from the definitions, on every instruction-set path this CPU has.

Every vector path must equal the scalar path bit for bit (the kernels compute the same integers and the same float
epilogue in the same order), and the scalar path must match numpy: quantize codes bit-exact, matmuls within
relative L2 1e-6 of float64 (float32 outputs). The one exception, the transform's dense h_left product on the
AVX-512 paths (kernel_env.FMA_DENSE_LEFT_ISAS), is covered in tests/test_kernel_dispatch.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.hadamard import HadamardMode, hadamard_factors
from graph_passes.int_packing import PackedWeight, quantize_and_pack, unpack_codes
from tests.graphs import dit_like_input
from tests.kernel_env import ALL_ISAS, FMA_DENSE_LEFT_ISAS, kernel_session, library_isa, supported_isas

F32, F16 = np.float32, np.float16


# ---------------------------------------------------------------------------------------------------------------
# Library, paths, sessions
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def library(kernel_library) -> Path:
    return kernel_library  # tests/conftest.py: built once, or skipped with the reason


@pytest.fixture(scope="module")
def isas(library) -> list[str]:
    """The paths this CPU (and this build) supports, scalar first."""
    return supported_isas(library)


def onnx_type(dtype) -> int:
    return {np.dtype(F32): TensorProto.FLOAT, np.dtype(F16): TensorProto.FLOAT16,
            np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}[np.dtype(dtype)]


def one_node_model(op_type: str, inputs: dict[str, np.ndarray], initializers: dict[str, np.ndarray],
                   outputs: list[str], **attrs) -> bytes:
    """One hadanorm node; `inputs` become graph inputs (dynamic shapes), `initializers` constants."""
    names = [*inputs, *initializers]
    order = attrs.pop("order", names)
    node = helper.make_node(op_type, order, outputs, domain="hadanorm", **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, onnx_type(v.dtype), [f"d{k}{i}" for i in range(v.ndim)])
         for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info(k) for k in outputs],
        [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("hadanorm", 1)],
                              ir_version=10)
    return model.SerializeToString()


def run_on(library: Path, model: bytes, feeds: dict[str, np.ndarray], isa: str | None = None) -> list[np.ndarray]:
    return kernel_session(model, library, isa).run(None, feeds)


def run_every_path(library: Path, isas: list[str], model: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The scalar path's outputs, after checking every other path gives the same bits."""
    reference = run_on(library, model, feeds, "scalar")
    for isa in isas[1:]:
        assert_same_bits(run_on(library, model, feeds, isa), reference, f"{isa} differs from scalar")
    return reference


def assert_same_bits(got: list[np.ndarray], reference: list[np.ndarray], message: str) -> None:
    for r, g in zip(reference, got, strict=True):
        assert r.dtype == g.dtype and r.shape == g.shape, message
        np.testing.assert_array_equal(g, r, err_msg=message)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------------------------------------------------------
# Quantize ops
# ---------------------------------------------------------------------------------------------------------------


def quantize_reference(y: np.ndarray, bits: int, half_scale: bool):
    """The definition, in float32 (IEEE divisions, round half to even)."""
    y = y.astype(F32)
    qmax = F32(2**bits - 1)
    hi = np.maximum(y.max(axis=-1, keepdims=True), F32(0))
    lo = np.minimum(y.min(axis=-1, keepdims=True), F32(0))
    scale = np.maximum((hi - lo) / qmax, np.finfo(F32).tiny)
    if half_scale:
        scale = scale.astype(F16).astype(F32)
    zp = np.clip(np.rint(-(lo / scale)), F32(0), qmax)
    codes = np.clip(np.rint(y / scale) + zp, F32(0), qmax)
    return codes.astype(np.uint8), scale, zp.astype(np.uint8)


QUANTIZE_OPS = {  # op -> (transform op giving y, centers, rotates)
    "Quantize": (None, False, False),
    "ScaleQuantize": ("Scale", False, False),
    "ScaleRotateQuantize": ("ScaleRotate", False, True),
    "CenterScaleQuantize": ("CenterScale", True, False),
    "CenterScaleRotateQuantize": ("CenterScaleRotate", True, True),
}


def transform_consts(width: int, rotate: bool, mode: HadamardMode, dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(width)
    mul = np.exp(rng.standard_normal(width) * 0.5)
    consts = {"mul": mul}
    if rotate:
        h = hadamard_factors(width, mode, block_size=8 if width == 72 else 128, seed=3)
        consts = {"mul": mul * h.signs, "h_left": h.left, "h_right": h.right}
    return {k: v.astype(dtype) for k, v in consts.items()}


QUANTIZE_CASES = [  # (op, width, bits, dtype, Hadamard mode, batch, tokens)
    ("Quantize", 72, 4, F32, HadamardMode.FULL, 1, 7),
    ("Quantize", 4608, 8, F16, HadamardMode.FULL, 3, 5),
    ("ScaleQuantize", 1152, 3, F32, HadamardMode.FULL, 3, 17),
    ("ScaleQuantize", 72, 6, F16, HadamardMode.FULL, 1, 4),
    ("CenterScaleQuantize", 1152, 4, F32, HadamardMode.FULL, 3, 33),
    ("CenterScaleQuantize", 4608, 6, F16, HadamardMode.FULL, 1, 9),
    ("ScaleRotateQuantize", 1152, 4, F32, HadamardMode.FULL, 1, 16),
    ("ScaleRotateQuantize", 4608, 8, F32, HadamardMode.BLOCK, 3, 6),
    ("ScaleRotateQuantize", 72, 3, F16, HadamardMode.BLOCK, 3, 6),
    ("CenterScaleRotateQuantize", 1152, 4, F32, HadamardMode.BLOCK, 3, 20),
    ("CenterScaleRotateQuantize", 4608, 4, F32, HadamardMode.FULL, 1, 8),
    ("CenterScaleRotateQuantize", 1152, 6, F16, HadamardMode.FULL, 3, 7),
]


@pytest.mark.parametrize("op,width,bits,dtype,mode,batch,tokens", QUANTIZE_CASES,
                         ids=[f"{c[0]}-{c[1]}-a{c[2]}-{np.dtype(c[3]).name}-{c[4].value}" for c in QUANTIZE_CASES])
def test_quantize_ops_bit_exact(library, isas, op, width, bits, dtype, mode, batch, tokens):
    """On every path: codes / scale / zero point equal numpy's quantizer applied to y, where y is computed in float32
    from the same (float16-exact) values: by numpy for Quantize / ScaleQuantize, by the same path's float32 transform
    kernel for the others (the same code path). mean_y equals the transform kernel's second output (rounded to
    float16). Across paths the same bits, except where the rotation has a dense h_left (full Hadamard), which the
    AVX-512 paths multiply with fused multiply-adds: there the same bits within each group of paths."""
    transform, center, rotate = QUANTIZE_OPS[op]
    x = dit_like_input(width, batch=batch, tokens=tokens, seed=bits).astype(dtype)
    consts = transform_consts(width, rotate, mode, dtype) if transform else {}
    model = one_node_model(op, {"x": x}, consts, ["codes", "scale", "zero_point", "mean_y"][:3 + center], bits=bits)
    x32 = x.astype(F32)
    consts32 = {k: v.astype(F32) for k, v in consts.items()}
    first_of_group: dict[bool, list[np.ndarray]] = {}
    for isa in isas:
        got = run_on(library, model, {"x": x}, isa)
        if transform is None:
            y, mean_y = x32, None
        elif transform == "Scale":
            y, mean_y = x32 * consts32["mul"], None
        else:  # the float32 transform kernel of this path on the same values
            outs = run_on(library, one_node_model(transform, {"x": x32}, consts32, ["y", "mean_y"][:1 + center]),
                          {"x": x32}, isa)
            y, mean_y = outs[0], (outs[1] if center else None)
        codes, scale, zp = quantize_reference(y, bits, half_scale=dtype == F16)
        assert got[0].dtype == np.uint8 and got[1].dtype == dtype and got[2].dtype == np.uint8
        np.testing.assert_array_equal(got[0], codes, err_msg=isa)
        np.testing.assert_array_equal(got[1].astype(F32), scale, err_msg=isa)
        np.testing.assert_array_equal(got[2], zp, err_msg=isa)
        if center:
            assert got[3].dtype == dtype and got[3].shape == (batch, 1, width)
            np.testing.assert_array_equal(got[3], mean_y.astype(dtype), err_msg=isa)
        group = rotate and mode == HadamardMode.FULL and isa in FMA_DENSE_LEFT_ISAS
        if group in first_of_group:
            assert_same_bits(got, first_of_group[group], f"{isa} differs from the other paths")
        else:
            first_of_group[group] = got


@pytest.mark.parametrize("mode", [HadamardMode.BLOCK, HadamardMode.FULL], ids=lambda m: m.value)
def test_transform_constants_fed_at_run_time(library, isas, mode):
    """mul / h_left / h_right fed at run time (the rotation plan built per call) give the same bits as initializers
    (the plan built once when the kernel is created, transform_ops.cc ConstantRotation), on every path."""
    x = dit_like_input(1152, batch=2, tokens=24, seed=5).astype(F32)
    consts = transform_consts(1152, True, mode, F32)
    outputs = ["codes", "scale", "zero_point", "mean_y"]
    order = ["x", "mul", "h_left", "h_right"]
    for isa in isas:
        constant = run_on(library, one_node_model("CenterScaleRotateQuantize", {"x": x}, consts, outputs, bits=4,
                                                  order=order), {"x": x}, isa)
        fed = run_on(library, one_node_model("CenterScaleRotateQuantize", {"x": x, **consts}, {}, outputs, bits=4,
                                             order=order), {"x": x, **consts}, isa)
        assert_same_bits(fed, constant, f"{isa}: fed constants differ from initializers")


def test_quantize_edge_rows(library, isas):
    """All-zero, all-positive, all-negative, constant and tiny rows; ties on .5 (round half to even); a row whose ends
    both round up at 4 bits (13.5 .. -1.5: scale 1, zero point round(1.5) = 2, round(13.5) + 2 = 16 clamped to 15)."""
    rows = np.array([np.zeros(72), np.linspace(0.5, 3.0, 72), -np.linspace(0.5, 3.0, 72), np.full(72, -2.5),
                     np.full(72, 1e-30), np.arange(72) * 0.5 - 10.0, np.linspace(13.5, -1.5, 72)], dtype=F32)[None]
    for bits in (2, 4, 5, 8):
        got = run_every_path(library, isas, one_node_model("Quantize", {"x": rows}, {},
                                                           ["codes", "scale", "zero_point"], bits=bits), {"x": rows})
        for g, e in zip(got, quantize_reference(rows, bits, half_scale=False)):
            np.testing.assert_array_equal(g, e)



def test_quantize_near_ties(library, isas):
    """Values within a few ulp of a half-integer multiple of the scale, where y * (1 / scale) and the IEEE quotient
    y / scale can round to different integers: the AVX-512 quantizer's reciprocal path must redo those vectors with
    the division (bit-identical to the scalar path and to numpy's definition)."""
    rng = np.random.default_rng(7)
    for bits in (4, 8):
        qmax = 2**bits - 1
        rows = []
        for _ in range(24):
            lo, hi = -rng.uniform(0.1, 3.0), rng.uniform(0.1, 3.0)
            scale = max((F32(hi) - F32(lo)) / F32(qmax), np.finfo(F32).tiny)
            k = rng.integers(-qmax // 2, qmax // 2, size=1152).astype(np.float64) + 0.5
            y = (k * np.float64(scale)).astype(F32)  # near k + 0.5 times the scale, then nudged by -3..3 ulp
            y = y + rng.integers(-3, 4, size=y.shape).astype(F32) * np.spacing(np.abs(y)).astype(F32)
            y[0], y[1] = F32(lo), F32(hi)  # the row's range, so the scale is the one above
            rows.append(np.clip(y, F32(lo), F32(hi)))
        x = np.stack(rows)[None].astype(F32)
        got = run_every_path(library, isas, one_node_model("Quantize", {"x": x}, {},
                                                           ["codes", "scale", "zero_point"], bits=bits), {"x": x})
        for g, e in zip(got, quantize_reference(x, bits, half_scale=False)):
            np.testing.assert_array_equal(g, e)
        y, scale = x.astype(F32), got[1]
        offsets = np.abs(y / scale - np.rint(y / scale))
        assert np.mean(offsets > 0.5 - 2**-12) > 0.5  # the case is what it claims: most values sit near a tie

def test_quantize_non_finite_and_extreme_rows(library, isas):
    """Tokens with a NaN, +-inf, values whose Hadamard sums overflow, tiny values, and float16 tokens whose scale
    rounds to 0 in float16: every path gives the scalar path's bits (codes: NaN -> 0, the clamp to 0..qmax), through
    the quantizer alone, the one-pass block-Hadamard quantizer of the Center / Modulate ops, and float16 scales."""
    rng = np.random.default_rng(11)
    x = dit_like_input(1152, batch=1, tokens=8, seed=2).astype(F32)
    x[0, 1, 5] = np.nan
    x[0, 2, 300] = np.inf
    x[0, 3, 700] = -np.inf
    x[0, 4] = 3e38 * np.sign(rng.standard_normal(1152))  # block sums overflow to +-inf
    x[0, 5] = 1e-38 * rng.standard_normal(1152)
    x[0, 6] = 0.0
    quantize = one_node_model("Quantize", {"x": x}, {}, ["codes", "scale", "zero_point"], bits=8)
    assert run_every_path(library, isas, quantize, {"x": x})[0][0, 1, 5] == 0  # NaN -> code 0
    x_tokens = np.concatenate([x[:, :1], x[:, 4:]], axis=1)  # no NaN / inf token: a finite mean for the centered op
    for op, feeds_x in (("ScaleRotateQuantize", x), ("CenterScaleRotateQuantize", x_tokens)):
        center = op.startswith("Center")
        consts = transform_consts(1152, True, HadamardMode.BLOCK, F32)
        model = one_node_model(op, {"x": feeds_x}, consts, ["codes", "scale", "zero_point", "mean_y"][:3 + center],
                               bits=4)
        run_every_path(library, isas, model, {"x": feeds_x})
    row = (1, 1, 1152)
    modulate = one_node_model("ModulateScaleRotateQuantize",
                              {"x": x, "x_scale": np.full(row, 2.0, F32), "x_shift": np.full(row, -1e30, F32)},
                              transform_consts(1152, True, HadamardMode.BLOCK, F32), ["codes", "scale", "zero_point"],
                              bits=4, order=["x", "mul", "h_left", "h_right", "x_scale", "x_shift"])
    run_every_path(library, isas, modulate,
                   {"x": x, "x_scale": np.full(row, 2.0, F32), "x_shift": np.full(row, -1e30, F32)})
    tiny = (np.arange(144, dtype=F32).reshape(1, 2, 72) % 3 - 1.0) * F32(6e-8)  # float16 subnormals
    half = one_node_model("Quantize", {"x": tiny.astype(F16)}, {}, ["codes", "scale", "zero_point"], bits=8)
    got = run_every_path(library, isas, half, {"x": tiny.astype(F16)})
    assert np.all(got[1] == 0)  # the case is what it claims: the scale rounds to 0 in float16


# ---------------------------------------------------------------------------------------------------------------
# IntMatMul / FloatMatMul
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatMulCase:
    k: int
    n: int
    wbits: int
    abits: int
    symmetric: bool
    batch: int
    m: int
    bias: str  # "N" or "B1N"
    dtype: type = F32
    block: int = 128

    @property
    def container(self) -> int:
        return 4 if self.wbits <= 4 else 8

    @property
    def id(self) -> str:
        return (f"K{self.k}-N{self.n}-w{self.wbits}a{self.abits}-{'sym' if self.symmetric else 'asym'}-"
                f"B{self.batch}M{self.m}-bias{self.bias}-{np.dtype(self.dtype).name}")


MATMUL_CASES = [
    MatMulCase(72, 72, 4, 4, True, 1, 7, "N"),
    MatMulCase(1152, 4608, 3, 3, False, 3, 3, "B1N"),
    MatMulCase(4608, 1152, 4, 8, True, 1, 9, "N"),
    MatMulCase(200, 100, 4, 6, False, 3, 4, "B1N"),  # K not a multiple of the block, N not of 16
    MatMulCase(1152, 72, 4, 4, True, 3, 33, "N", F16),
    MatMulCase(72, 1152, 3, 8, False, 1, 20, "B1N", F16),
    MatMulCase(72, 72, 8, 8, True, 3, 7, "B1N"),
    MatMulCase(1152, 4608, 6, 6, False, 1, 3, "N"),
    MatMulCase(4608, 1152, 8, 4, False, 3, 3, "B1N"),
    MatMulCase(200, 100, 6, 3, True, 1, 13, "N"),
    MatMulCase(1152, 72, 8, 8, False, 3, 9, "N", F16),
    MatMulCase(72, 1152, 6, 4, True, 1, 5, "B1N", F16),
    MatMulCase(512, 48, 4, 8, False, 1, 19, "N", F32, 256),  # a block over 128 (int32 corrections)
    MatMulCase(300, 40, 8, 8, True, 3, 6, "B1N", F32, 300),  # one block (per-channel), not a multiple of 8
    # the amx path's shapes: 32-row panels, a 16-row panel, leftover rows (on avx512vnni), an odd column tile, k steps
    # of 64 (block 128), 32 (block 32 and 96) and 16 (block 48), a block over 128, 8-bit weights
    MatMulCase(1152, 272, 4, 4, False, 2, 53, "B1N"),  # rows 106 = 3 x 32 + 10, 17 column tiles
    MatMulCase(640, 48, 4, 8, True, 2, 24, "N", F16, 32),  # rows 48 = 32 + 16
    MatMulCase(576, 40, 4, 4, False, 1, 70, "N", F32, 96),  # rows 70 = 2 x 32 + 6, 3 tiles, N not a multiple of 16
    MatMulCase(384, 64, 4, 4, True, 1, 37, "N", F32, 48),
    MatMulCase(1024, 80, 4, 4, False, 1, 33, "B1N", F32, 512),
    MatMulCase(1152, 96, 8, 8, False, 2, 40, "B1N"),
    MatMulCase(512, 48, 6, 6, True, 1, 64, "N", F16, 256),
    MatMulCase(256, 48, 4, 4, False, 2, 300, "B1N"),  # 600 rows: amx row tasks of 320 + 280 (balanced_row_tasks)
]


def packed_weight(case: MatMulCase, seed: int = 0) -> PackedWeight:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((case.k, case.n)) / np.sqrt(case.k)
    w[:, : max(1, case.n // 10)] *= 5.0  # a few large columns
    return quantize_and_pack(w, case.wbits, case.block, case.symmetric, np.dtype(case.dtype))


def weight_inits(p: PackedWeight) -> dict[str, np.ndarray]:
    return {"b": p.b, "scales": p.scales, "zero_points": p.zero_points}


def activations(case: MatMulCase, seed: int = 1):
    rng = np.random.default_rng(seed)
    qmax = 2**case.abits - 1
    lead = (case.batch, case.m)
    codes = rng.integers(0, qmax + 1, size=(*lead, case.k), dtype=np.uint8)
    zp = rng.integers(0, qmax + 1, size=(*lead, 1), dtype=np.uint8)
    scale = (rng.uniform(0.5, 2.0, size=(*lead, 1)) / qmax).astype(case.dtype)
    bias_shape = (case.n,) if case.bias == "N" else (case.batch, 1, case.n)
    bias = rng.standard_normal(bias_shape).astype(case.dtype)
    return codes, scale, zp, bias


def int_matmul_reference(codes, scale, zp, p: PackedWeight, bias) -> np.ndarray:
    """float64 of a_scale * sum_blk scales[blk] * I[blk] + bias, with I the exact integer block sums."""
    u = unpack_codes(p).astype(np.float64)  # [K, N]
    k = u.shape[0]
    zw = np.repeat(p.zero_points.astype(np.float64), p.block_size, axis=0)[:k]
    c = codes.astype(np.float64) - zp.astype(np.float64)  # [..., M, K]
    acc = 0.0
    for blk in range(p.scales.shape[0]):
        sl = slice(blk * p.block_size, min(k, (blk + 1) * p.block_size))
        acc = acc + (c[..., sl] @ (u[sl] - zw[sl])) * p.scales[blk].astype(np.float64)  # integers exact in f64
    return scale.astype(np.float64) * acc + bias.astype(np.float64)


def int_matmul_model(case: MatMulCase, p: PackedWeight, constant_weight: bool = True) -> bytes:
    feeds_spec = {"codes": np.zeros((1, 1, case.k), np.uint8), "a_scale": np.zeros((1, 1, 1), case.dtype),
                  "a_zero_point": np.zeros((1, 1, 1), np.uint8),
                  "bias": np.zeros((case.n,) if case.bias == "N" else (1, 1, case.n), case.dtype)}
    inits = weight_inits(p)
    if not constant_weight:
        feeds_spec.update(inits)
        inits = {}
    order = ["codes", "a_scale", "a_zero_point", "b", "scales", "zero_points", "bias"]
    return one_node_model(f"IntMatMul{case.container}", feeds_spec, inits, ["y"], block_size=p.block_size,
                          order=order)


@pytest.mark.parametrize("case", MATMUL_CASES, ids=[c.id for c in MATMUL_CASES])
def test_int_matmul(library, isas, case):
    p = packed_weight(case)
    codes, scale, zp, bias = activations(case)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    (y,) = run_every_path(library, isas, int_matmul_model(case, p), feeds)
    assert y.dtype == case.dtype and y.shape == (case.batch, case.m, case.n)
    expected = int_matmul_reference(codes, scale, zp, p, bias)
    if case.dtype == F32:
        assert rel_l2(y, expected) <= 1e-6
    else:  # the float32 result rounded once to float16
        np.testing.assert_allclose(y.astype(np.float64), expected, rtol=2**-10, atol=2**-24 * 4)


RESIDUAL_CASES = [  # (case, epilogue, gate layout)
    (MatMulCase(1152, 272, 4, 4, False, 2, 53, "B1N"), "GatedResidual", "B1N"),  # amx panels + leftover rows
    (MatMulCase(1152, 272, 4, 4, False, 2, 53, "B1N"), "Residual", None),
    (MatMulCase(200, 100, 8, 8, True, 3, 7, "N"), "GatedResidual", "N"),  # N not a multiple of 16
    (MatMulCase(576, 40, 4, 4, False, 1, 70, "N", F32, 96), "GatedResidual", "B1N"),
    (MatMulCase(72, 1152, 4, 4, True, 3, 20, "B1N", F16), "GatedResidual", "B1N"),
    (MatMulCase(1152, 72, 8, 8, False, 1, 33, "N", F16), "Residual", None),
]


@pytest.mark.parametrize("case,epilogue,gate_layout", RESIDUAL_CASES,
                         ids=[f"{c.id}-{e}-{g}" for c, e, g in RESIDUAL_CASES])
def test_int_matmul_residual(library, isas, case, epilogue, gate_layout):
    """IntMatMul{4,8}[Gated]Residual: y = residual + [gate *] (the IntMatMul's y), the product rounded, then the sum
    (the graph's Mul, then its Add). float32: the same bits as IntMatMul followed by numpy's float32 Mul and Add, on
    every path; float16: that float32 result rounded once to half (the unfused graph rounds twice more: within 2 ulp
    of half)."""
    p = packed_weight(case)
    codes, scale, zp, bias = activations(case)
    rng = np.random.default_rng(4)
    out_shape = (case.batch, case.m, case.n)
    residual = rng.standard_normal(out_shape).astype(case.dtype)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias, "residual": residual}
    order = ["codes", "a_scale", "a_zero_point", "b", "scales", "zero_points", "bias", "residual"]
    if gate_layout:
        feeds["gate"] = rng.standard_normal((case.n,) if gate_layout == "N" else (case.batch, 1, case.n)).astype(
            case.dtype)
        order.insert(7, "gate")
    model = one_node_model(f"IntMatMul{case.container}{epilogue}", {k: feeds[k] for k in order if k in feeds},
                           weight_inits(p), ["y"], block_size=p.block_size, order=order)
    (y,) = run_every_path(library, isas, model, feeds)
    assert y.dtype == case.dtype and y.shape == out_shape
    (y_plain,) = run_on(library, int_matmul_model(case, p), {k: feeds[k] for k in ("codes", "a_scale", "a_zero_point",
                                                                                "bias")})
    product = y_plain.astype(F32)
    gated = feeds["gate"].astype(F32) * product if gate_layout else product
    np.testing.assert_array_equal(y, (residual.astype(F32) + gated).astype(case.dtype))


def test_int_matmul_low_rank_gated_residual(library, isas):
    """IntMatMul4LowRankGatedResidual: the low-rank term first, then residual + gate * y: the bits of
    IntMatMul4LowRank followed by numpy's float32 Mul and Add, on every path."""
    case = MatMulCase(1152, 100, 4, 4, False, 2, 53, "B1N")
    p = packed_weight(case)
    codes, scale, zp, bias = activations(case)
    rng = np.random.default_rng(5)
    t = rng.standard_normal((case.batch, case.m, 8)).astype(F32)
    right = (rng.standard_normal((8, case.n)) * 0.1).astype(F32)
    gate = rng.standard_normal((case.batch, 1, case.n)).astype(F32)
    residual = rng.standard_normal((case.batch, case.m, case.n)).astype(F32)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias, "t": t}
    order = ["codes", "a_scale", "a_zero_point", "b", "scales", "zero_points", "bias", "t", "right"]
    inits = {**weight_inits(p), "right": right}
    (low_rank,) = run_on(library, one_node_model("IntMatMul4LowRank", feeds, inits, ["y"], block_size=p.block_size,
                                                 order=order), feeds)
    fused_feeds = {**feeds, "gate": gate, "residual": residual}
    model = one_node_model("IntMatMul4LowRankGatedResidual", fused_feeds, inits, ["y"], block_size=p.block_size,
                           order=order + ["gate", "residual"])
    (y,) = run_every_path(library, isas, model, fused_feeds)
    np.testing.assert_array_equal(y, residual + gate * low_rank)


def test_int_matmul_residual_bad_shapes(library):
    case = MatMulCase(72, 32, 4, 4, True, 2, 5, "N")
    p = packed_weight(case)
    codes, scale, zp, bias = activations(case)
    order = ["codes", "a_scale", "a_zero_point", "b", "scales", "zero_points", "bias", "gate", "residual"]
    base = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    for gate_shape, residual_shape, message in (((2, 5, 32), (2, 5, 32), r"gate must have shape \[32\] or \[2, 1, 32\]"),
                                                ((32,), (1, 5, 32), r"residual must have the output's shape \[2, 5, 32\]")):
        feeds = {**base, "gate": np.ones(gate_shape, F32), "residual": np.ones(residual_shape, F32)}
        model = one_node_model("IntMatMul4GatedResidual", feeds, weight_inits(p), ["y"], block_size=p.block_size,
                               order=order)
        with pytest.raises(Exception, match=message):
            run_on(library, model, feeds)


MODULATE_CASES = [  # (op, width, bits, Hadamard mode, batch, tokens, modulation layout)
    ("ModulateCenterScaleRotateQuantize", 1152, 4, HadamardMode.BLOCK, 2, 37, "B1D"),
    ("ModulateCenterScaleRotateQuantize", 4608, 4, HadamardMode.FULL, 1, 9, "D"),
    ("ModulateCenterScaleQuantize", 72, 6, HadamardMode.FULL, 3, 20, "B1D"),
    ("ModulateScaleRotateQuantize", 1152, 8, HadamardMode.BLOCK, 2, 5, "B1D"),
    ("ModulateScaleQuantize", 72, 4, HadamardMode.FULL, 1, 6, "D"),
    ("ModulateCenterScaleRotateQuantize", 1152, 4, HadamardMode.BLOCK, 2, 600, "B1D"),  # 4 mean chunks of 256 channels and one of 128
]


@pytest.mark.parametrize("op,width,bits,mode,batch,tokens,layout", MODULATE_CASES,
                         ids=[f"{c[0]}-{c[1]}-a{c[2]}-{c[3].value}-{c[6]}" for c in MODULATE_CASES])
def test_modulate_ops_equal_the_unfused_op(library, isas, op, width, bits, mode, batch, tokens, layout):
    """Modulate*Quantize(x, ..., x_scale, x_shift) gives the bits of the op without the prefix on x * x_scale + x_shift
    computed by numpy in float32 (a Mul, then an Add: what the unfused graph feeds it), on every path."""
    plain_op = op.removeprefix("Modulate")
    transform, center, rotate = QUANTIZE_OPS[plain_op]
    rng = np.random.default_rng(bits)
    x = dit_like_input(width, batch=batch, tokens=tokens, seed=bits).astype(F32)
    row = (width,) if layout == "D" else (batch, 1, width)
    x_scale = (1.0 + 0.5 * rng.standard_normal(row)).astype(F32)
    x_shift = (3.0 * rng.standard_normal(row)).astype(F32)
    consts = transform_consts(width, rotate, mode, F32)
    outputs = ["codes", "scale", "zero_point", "mean_y"][:3 + center]
    modulated = x * x_scale
    modulated = modulated + x_shift
    for isa in isas:
        got = run_on(library, one_node_model(op, {"x": x, "x_scale": x_scale, "x_shift": x_shift}, consts, outputs,
                                             bits=bits, order=["x", *consts, "x_scale", "x_shift"]),
                     {"x": x, "x_scale": x_scale, "x_shift": x_shift}, isa)
        want = run_on(library, one_node_model(plain_op, {"x": modulated}, consts, outputs, bits=bits,
                                              order=["x", *consts]), {"x": modulated}, isa)
        assert_same_bits(got, want, f"{isa}: {op} differs from {plain_op} on the modulated x")


def test_modulate_bad_shape(library):
    x = np.ones((2, 4, 72), F32)
    consts = transform_consts(72, False, HadamardMode.FULL, F32)
    feeds = {"x": x, "x_scale": np.ones((2, 4, 72), F32), "x_shift": np.ones(72, F32)}
    model = one_node_model("ModulateCenterScaleQuantize", feeds, consts, ["codes", "scale", "zero_point", "mean_y"],
                           bits=4, order=["x", "mul", "x_scale", "x_shift"])
    with pytest.raises(Exception, match=r"x_scale must have shape \[72\] or \[2, 1, 72\]"):
        run_on(library, model, feeds)


def test_int_matmul_weight_as_input(library, isas):
    """b / scales / zero_points fed at run time (sums computed per run) give the same bits as constants."""
    case = MatMulCase(200, 100, 4, 4, False, 3, 5, "B1N")
    p = packed_weight(case)
    codes, scale, zp, bias = activations(case)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    (constant,) = run_on(library, int_matmul_model(case, p), feeds)
    (fed,) = run_every_path(library, isas, int_matmul_model(case, p, constant_weight=False),
                            {**feeds, **weight_inits(p)})
    np.testing.assert_array_equal(fed, constant)


def test_int_matmul_extreme_codes(library, isas):
    """All codes 255 against weights at the container's extremes: int32 sums stay exact."""
    for wbits in (4, 8):
        case = MatMulCase(4608, 32, wbits, 8, False, 1, 2, "N")
        rng = np.random.default_rng(wbits)
        w = np.where(rng.random((case.k, case.n)) < 0.5, -1.0, 1.0) * rng.uniform(0.9, 1.0, (case.k, case.n))
        w[:, 0] = 1.0  # zero point 0, codes all at the top
        p = quantize_and_pack(w, wbits, 128, False, np.dtype(F32))
        codes = np.full((1, 2, case.k), 255, np.uint8)
        codes[0, 1, ::2] = 0
        zp = np.array([[[0]], [[255]]], np.uint8).reshape(1, 2, 1)
        scale = np.ones((1, 2, 1), F32)
        bias = np.zeros(case.n, F32)
        (y,) = run_every_path(library, isas, int_matmul_model(case, p),
                              {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias})
        assert rel_l2(y, int_matmul_reference(codes, scale, zp, p, bias)) <= 1e-6


FLOAT_CASES = [
    MatMulCase(72, 72, 4, 8, True, 1, 1, "N"),
    MatMulCase(1152, 4608, 4, 8, False, 3, 1, "N"),
    MatMulCase(4608, 1152, 3, 8, True, 2, 3, "N", F16),
    MatMulCase(200, 100, 8, 8, False, 3, 1, "N"),
    MatMulCase(1152, 1152, 6, 8, True, 1, 2, "N", F16),
    MatMulCase(4608, 72, 8, 8, True, 1, 1, "N", F32, 4608),  # the exact mode's per-channel copy: one block
]


@pytest.mark.parametrize("case", FLOAT_CASES, ids=[c.id for c in FLOAT_CASES])
def test_float_matmul(library, isas, case):
    p = packed_weight(case)
    x = dit_like_input(case.k, batch=case.batch, tokens=case.m, seed=case.k).astype(case.dtype)
    model = one_node_model(f"FloatMatMul{case.container}", {"x": x}, weight_inits(p), ["y"], block_size=p.block_size)
    (y,) = run_every_path(library, isas, model, {"x": x})
    assert y.dtype == case.dtype and y.shape == (case.batch, case.m, case.n)
    u = unpack_codes(p).astype(np.float64)
    zw = np.repeat(p.zero_points.astype(np.float64), p.block_size, axis=0)[: case.k]
    scales = np.repeat(p.scales.astype(np.float64), p.block_size, axis=0)[: case.k]
    expected = x.astype(np.float64) @ ((u - zw) * scales)
    if case.dtype == F32:
        assert rel_l2(y, expected) <= 1e-6
    else:
        np.testing.assert_allclose(y.astype(np.float64), expected, rtol=2**-10, atol=1e-3 * np.abs(expected).max())


# ---------------------------------------------------------------------------------------------------------------
# float16 transform ops, errors, path selection
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Scale", "ScaleRotate", "CenterScale", "CenterScaleRotate"])
def test_transform_ops_float16(library, op):
    """float16 graphs run the kernels: the float32 kernel's result on the same values, rounded to float16."""
    center, rotate = op.startswith("Center"), op.endswith("Rotate")
    consts = transform_consts(1152, rotate, HadamardMode.FULL, F16)
    x = dit_like_input(1152, batch=3, tokens=9).astype(F16)
    outputs = ["y", "mean_y"][:1 + center]
    got = run_on(library, one_node_model(op, {"x": x}, consts, outputs), {"x": x})
    want = run_on(library, one_node_model(op, {"x": x.astype(F32)}, {k: v.astype(F32) for k, v in consts.items()},
                                          outputs), {"x": x.astype(F32)})
    for g, w in zip(got, want):
        assert g.dtype == F16
        np.testing.assert_array_equal(g, w.astype(F16))


def test_bad_packed_weight_shape_message(library):
    case = MatMulCase(256, 64, 4, 4, True, 1, 3, "N")
    p = packed_weight(case)
    codes, scale, zp, bias = activations(dataclasses.replace(case, k=128 + 64))  # K=192 with 2 blocks of 128...
    bad = dataclasses.replace(p, b=p.b[:, :20])  # ... but b cut short
    with pytest.raises(Exception) as info:
        run_on(library, int_matmul_model(case, bad), {"codes": codes, "a_scale": scale, "a_zero_point": zp,
                                                      "bias": bias})
    message = str(info.value)
    assert ("hadanorm::IntMatMul4: b has shape [4, 20, 64] but N=64, K=192, block_size=128 need [4, 32, 64]; "
            "re-quantize with hn-export") in message


def test_bad_block_size_message(library):
    case = MatMulCase(72, 16, 4, 4, True, 1, 1, "N")
    p = packed_weight(case)
    model = one_node_model("FloatMatMul4", {"x": np.zeros((1, 1, 72), F32)}, weight_inits(p), ["y"], block_size=12)
    with pytest.raises(Exception, match=r"hadanorm::FloatMatMul4: attribute block_size=12 must be a positive "
                                        r"multiple of 8"):
        run_on(library, model, {"x": np.zeros((1, 1, 72), F32)})


def test_isa_selection(library, isas, monkeypatch, tmp_path):
    """HadanormKernelsIsa() names the best path, honours the override, refuses unknown or missing paths; the call
    log (with HADANORM_KERNELS_CALL_LOG_ISA=1) shows the path that ran."""
    monkeypatch.delenv("HADANORM_KERNELS_ISA", raising=False)
    assert library_isa(library) == isas[-1]  # the best path (ALL_ISAS is in order of preference per CPU family)
    missing = [name for name in ALL_ISAS if name not in isas]
    monkeypatch.setenv("HADANORM_KERNELS_ISA", "sse9")
    assert library_isa(library).startswith("error: HADANORM_KERNELS_ISA=sse9 is not a kernel path")
    case = MatMulCase(72, 16, 4, 4, True, 1, 2, "N")
    p = packed_weight(case)
    model = one_node_model("FloatMatMul4", {"x": np.zeros((1, 2, 72), F32)}, weight_inits(p), ["y"],
                           block_size=p.block_size)
    with pytest.raises(Exception, match="HADANORM_KERNELS_ISA=sse9 is not a kernel path"):
        run_on(library, model, {"x": np.zeros((1, 2, 72), F32)}, isa="sse9")
    if missing:
        with pytest.raises(Exception, match=f"HADANORM_KERNELS_ISA={missing[0]} but this CPU"):
            run_on(library, model, {"x": np.zeros((1, 2, 72), F32)}, isa=missing[0])
    monkeypatch.delenv("HADANORM_KERNELS_ISA")
    log = tmp_path / "calls.log"
    monkeypatch.setenv("HADANORM_KERNELS_CALL_LOG", str(log))
    monkeypatch.setenv("HADANORM_KERNELS_CALL_LOG_ISA", "1")
    for isa in isas:
        run_on(library, model, {"x": np.zeros((1, 2, 72), F32)}, isa=isa)
    assert log.read_text().splitlines() == [f"FloatMatMul4 {isa}" for isa in isas]


def test_own_threads_same_bits(library, monkeypatch):
    case = MatMulCase(1152, 1152, 4, 4, False, 3, 20, "B1N")
    p = packed_weight(case)
    codes, scale, zp, bias = activations(case)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    (pool,) = run_on(library, int_matmul_model(case, p), feeds)
    monkeypatch.setenv("HADANORM_KERNELS_THREADS", "3")
    (own,) = run_on(library, int_matmul_model(case, p), feeds)
    np.testing.assert_array_equal(own, pool)


CPU_HAS_AMX = "amx_int8" in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")
NO_AMX = Path(__file__).resolve().parents[1] / "benchmarks" / "no_amx.py"

REFUSED_AMX_CHILD = r"""
import ctypes, os, sys
import numpy as np
import onnxruntime as ort
from runtime.kernels import register_kernels
library, model, feeds, out = sys.argv[1:5]
isa = ctypes.CDLL(library).HadanormKernelsIsa
isa.restype = ctypes.c_char_p
print("best:", isa().decode())
os.environ["HADANORM_KERNELS_ISA"] = "amx"
print("forced:", isa().decode())
del os.environ["HADANORM_KERNELS_ISA"]
options = ort.SessionOptions()
options.intra_op_num_threads = 2
register_kernels(options, library)
session = ort.InferenceSession(open(model, "rb").read(), options, providers=["CPUExecutionProvider"])
np.save(out, session.run(None, dict(np.load(feeds)))[0])
"""


@pytest.mark.skipif(not CPU_HAS_AMX, reason="this CPU has no AMX-INT8")
def test_amx_refused_falls_back(library, isas, tmp_path):
    """A process denied the AMX tile state (a seccomp filter on arch_prctl(ARCH_REQ_XCOMP_PERM): benchmarks/no_amx.py)
    runs the avx512vnni path, names the refusal when amx is forced, and computes the same bits as the scalar path."""
    import subprocess
    import sys

    assert "amx" in isas  # this process was granted the tile state: the amx path is the best one
    case = MatMulCase(1152, 272, 4, 4, False, 2, 53, "B1N")
    p = packed_weight(case)
    codes, scale, zp, bias = activations(case)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    model = tmp_path / "int.onnx"
    model.write_bytes(int_matmul_model(case, p))
    np.savez(tmp_path / "feeds.npz", **feeds)
    proc = subprocess.run([sys.executable, str(NO_AMX), "--", sys.executable, "-c", REFUSED_AMX_CHILD, str(library),
                           str(model), str(tmp_path / "feeds.npz"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "best: avx512vnni"
    assert lines[1].startswith("forced: error: HADANORM_KERNELS_ISA=amx but the kernel refused this process the AMX "
                               "tile state (arch_prctl ARCH_REQ_XCOMP_PERM: Operation not permitted); unset it or "
                               "use avx512vnni")
    (reference,) = run_on(library, int_matmul_model(case, p), feeds, "scalar")
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), reference)

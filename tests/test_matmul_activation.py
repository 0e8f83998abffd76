"""The epilogues of the kernel library's integer matmul, ``IntMatMul{4,8}[LowRank][Gelu]``, applied to each task's
output, on every instruction-set path this CPU has: ``LowRank`` adds ``t @ right`` (a low-rank branch's second
product), ``Gelu`` applies gelu with the tanh approximation.

LowRank: every path gives the scalar path's bits (per element the r products summed with fmas in order from 0, then
one add), and the result equals the plain IntMatMul's output plus numpy's float64 ``t @ right`` within relative L2
1e-6 (float32 sums of r <= 40 terms).

Every path gives the scalar path's bits (the gelu uses only IEEE-exact operations in one order:
runtime/kernels/portable_loops.h), and the result equals numpy's float64 gelu-tanh of the plain IntMatMul's float32
output within 4 float32 ulp of the largest of |x|, |gelu(x)| and 1 (the rational tanh is within 3.5e-7 of tanh over
[-7.9, 7.9], and tanh is taken as +-1 beyond: at x = -4.84, gelu = -6.5e-7 becomes 0, 1.3 ulp of 4.84), and
onnxruntime's own Gelu(approximate="tanh") on that output within the same bound.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.kernel_env import kernel_session
from tests.test_int_kernels import (F16, F32, MatMulCase, activations, library, isas, one_node_model,  # noqa: F401
                                    packed_weight, run_every_path, run_on, weight_inits)

ORDER = ["codes", "a_scale", "a_zero_point", "b", "scales", "zero_points", "bias"]
CASES = [
    MatMulCase(1152, 272, 4, 4, False, 2, 53, "B1N"),  # amx panels of 32 and 16 rows, leftover rows, 17 tiles
    MatMulCase(200, 100, 4, 6, False, 3, 4, "B1N"),  # K not a multiple of the block, N not of 16
    MatMulCase(1152, 96, 8, 8, False, 2, 40, "B1N"),  # IntMatMul8Gelu
    MatMulCase(72, 1152, 4, 8, True, 1, 20, "N", F16),  # float16 output
]


def gelu_tanh(y: np.ndarray) -> np.ndarray:
    y = y.astype(np.float64)
    return 0.5 * y * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (y + 0.044715 * y**3)))


def models(case: MatMulCase) -> tuple[bytes, bytes]:
    p = packed_weight(case)
    spec = {"codes": np.zeros((1, 1, case.k), np.uint8), "a_scale": np.zeros((1, 1, 1), case.dtype),
            "a_zero_point": np.zeros((1, 1, 1), np.uint8),
            "bias": np.zeros((case.n,) if case.bias == "N" else (1, 1, case.n), case.dtype)}
    op = f"IntMatMul{case.container}"
    return tuple(one_node_model(op + suffix, spec, weight_inits(p), ["y"], block_size=p.block_size, order=ORDER)
                 for suffix in ("", "Gelu"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_int_matmul_gelu(library, isas, case):
    plain_model, gelu_model = models(case)
    codes, scale, zp, bias = activations(case)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    (got,) = run_every_path(library, isas, gelu_model, feeds)
    (plain,) = run_on(library, plain_model, feeds)
    assert got.dtype == case.dtype and got.shape == plain.shape
    expected = gelu_tanh(plain.astype(F32))
    magnitude = np.maximum(np.maximum(np.abs(expected), np.abs(plain.astype(np.float64))), 1.0)
    if case.dtype == F32:
        tolerance = 4 * np.spacing(magnitude.astype(F32))
    else:  # the float32 gelu rounded once to float16 (of the float16-rounded matmul output)
        tolerance = 2**-11 * np.abs(expected) + 4 * np.spacing(magnitude.astype(F32))
    assert np.all(np.abs(got.astype(np.float64) - expected) <= tolerance)
    assert np.abs(expected).max() > 2.0 and (expected < -0.1).any()  # both the linear and the curved part ran


def test_int_matmul_gelu_against_onnxruntime(library):
    """The kernel's gelu against onnxruntime's Gelu(approximate="tanh") node on the same IntMatMul output."""
    case = CASES[0]
    plain_model, gelu_model = models(case)
    codes, scale, zp, bias = activations(case)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    (plain,) = run_on(library, plain_model, feeds)
    (got,) = run_on(library, gelu_model, feeds)
    node = helper.make_node("Gelu", ["y"], ["g"], approximate="tanh")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("g", TensorProto.FLOAT, None)])
    ort_gelu = kernel_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
                              .SerializeToString(), None).run(None, {"y": plain})[0]
    magnitude = np.maximum(np.maximum(np.abs(ort_gelu), np.abs(plain)), 1.0)
    tolerance = 4 * np.spacing(magnitude.astype(F32))
    assert np.all(np.abs(got - ort_gelu) <= tolerance)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("gelu", [False, True], ids=["lowrank", "lowrank-gelu"])
def test_int_matmul_low_rank(library, isas, case, gelu):
    p = packed_weight(case)
    rank = 40 if case.n % 16 else 16  # ranks that are not a multiple of the unroll
    rng = np.random.default_rng(3)
    t = rng.standard_normal((case.batch, case.m, rank)).astype(case.dtype)
    right = (rng.standard_normal((rank, case.n)) / np.sqrt(rank)).astype(case.dtype)
    spec = {"codes": np.zeros((1, 1, case.k), np.uint8), "a_scale": np.zeros((1, 1, 1), case.dtype),
            "a_zero_point": np.zeros((1, 1, 1), np.uint8),
            "bias": np.zeros((case.n,) if case.bias == "N" else (1, 1, case.n), case.dtype),
            "t": np.zeros((1, 1, rank), case.dtype)}
    op = f"IntMatMul{case.container}LowRank" + ("Gelu" if gelu else "")
    model = one_node_model(op, spec, {**weight_inits(p), "right": right}, ["y"], block_size=p.block_size,
                           order=ORDER + ["t", "right"])
    plain_model, _ = models(case)
    codes, scale, zp, bias = activations(case)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    (got,) = run_every_path(library, isas, model, {**feeds, "t": t})
    (plain,) = run_on(library, plain_model, feeds)
    expected = plain.astype(np.float64) + t.astype(np.float64) @ right.astype(np.float64)
    if gelu:
        expected = gelu_tanh(expected)
    tolerance = 1e-6 if case.dtype == F32 else 2**-10
    assert np.linalg.norm(got.astype(np.float64) - expected) <= tolerance * np.linalg.norm(expected)


def test_low_rank_shape_errors(library):
    case = CASES[1]
    p = packed_weight(case)
    codes, scale, zp, bias = activations(case)
    spec = {"codes": codes[:1, :1], "a_scale": scale[:1, :1], "a_zero_point": zp[:1, :1], "bias": bias[:1],
            "t": np.zeros((1, 1, 4), F32)}
    right = np.zeros((4, case.n + 1), F32)
    model = one_node_model("IntMatMul4LowRank", spec, {**weight_inits(p), "right": right}, ["y"],
                           block_size=p.block_size, order=ORDER + ["t", "right"])
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias,
             "t": np.zeros((case.batch, case.m, 4), F32)}
    with pytest.raises(Exception, match=r"right must have shape \[r, 100\] \(N of the weight\), got \[4, 101\]"):
        run_on(library, model, feeds)

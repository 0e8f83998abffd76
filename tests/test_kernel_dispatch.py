"""One dispatch mechanism: every CPU-dependent function of the kernel library is an entry of the path table
(runtime/kernels/int_kernels.h, IsaKernels) that ``HADANORM_KERNELS_ISA`` picks, and every entry is compared across
every path this CPU has.

The entries tested here are the ones that used to be compiled twice and picked by CPU at load time
(``target_clones``) or picked by CPU at run time, out of reach of the override: the transform's row kernels
(TransformKernels: centering + scale, + fast Walsh-Hadamard transform, dense h_right, butterflies across rows,
dense h_left, token means in float32 and float16), the per-weight sums of the matmuls (fill_weight_info) and the
float16 conversions (HalfKernels). The integer kernels' own entries are compared in tests/test_int_kernels.py.

Contract: every path gives the scalar path's bits, except the dense h_left product on the AVX-512 paths
(kernel_env.FMA_DENSE_LEFT_ISAS, widths M that are a multiple of 16; the Paley II factored product there), which uses
fused multiply-adds: within float32
rounding of it (relative L2 <= 1e-6; float16 outputs 1e-4), and not the same bits (which shows the override reached
it).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from graph_passes.hadamard import HadamardMode, hadamard_factors
from tests.graphs import dit_like_input
from tests.kernel_env import FMA_DENSE_LEFT_ISAS, kernel_isa, kernel_session, supported_isas
from tests.test_int_kernels import (
    MatMulCase,
    activations,
    int_matmul_model,
    one_node_model,
    packed_weight,
    rel_l2,
    weight_inits,
)

F32, F16 = np.float32, np.float16
KERNELS = Path(__file__).resolve().parents[1] / "runtime" / "kernels"


@pytest.fixture(scope="module")
def isas(kernel_library) -> list[str]:
    return supported_isas(kernel_library)


def run_on(library: Path, model: bytes, feeds: dict[str, np.ndarray], isa: str) -> list[np.ndarray]:
    return kernel_session(model, library, isa).run(None, feeds)


def sylvester(m: int) -> np.ndarray:
    """Sylvester(m) / sqrt(m): H_2 (x) ... (x) H_2, m a power of two."""
    h = np.ones((1, 1))
    while h.shape[0] < m:
        h = np.kron(h, np.array([[1.0, 1.0], [1.0, -1.0]]))
    return h / np.sqrt(m)


def orthogonal(m: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((m, m)))[0]


@dataclasses.dataclass(frozen=True)
class RowsCase:
    """One transform op whose rotation (h_left K x K, h_right M x M) selects the table entries named in `entries`."""

    name: str
    op: str
    width: int
    h_left: str = "none"  # none | identity | sylvester | paley (full Hadamard's dense factor) | orthogonal
    h_right: str = "none"  # none | sylvester | orthogonal
    k: int = 1
    dtype: type = F32
    entries: str = ""

    @property
    def fma_dense_left(self) -> bool:
        """Whether the AVX-512 paths multiply by h_left with fused multiply-adds (a dense h_left, M % 16 == 0)."""
        return self.h_left in ("paley", "orthogonal") and (self.width // self.k) % 16 == 0

    def consts(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.width)
        mul = np.exp(rng.standard_normal(self.width) * 0.5)
        consts = {"mul": mul}
        if self.op.endswith("Rotate"):
            m = self.width // self.k
            if self.h_left == "paley":  # hadamard_factors' full Hadamard: a Paley factor (x) Sylvester
                h = hadamard_factors(self.width, HadamardMode.FULL, block_size=128, seed=3)
                assert h.left.shape == (self.k, self.k) and h.right.shape == (m, m), (h.left.shape, h.right.shape)
                left, right = h.left, h.right
            else:
                left = {"identity": np.eye(self.k), "sylvester": sylvester(self.k) if self.k > 1 else np.eye(1),
                        "orthogonal": orthogonal(self.k, 1)}[self.h_left]
                right = {"sylvester": sylvester(m), "orthogonal": orthogonal(m, 2)}[self.h_right]
            consts.update(h_left=left, h_right=right)
        return {key: value.astype(self.dtype) for key, value in consts.items()}


ROWS_CASES = [
    RowsCase("scale-72", "Scale", 72, entries="center_scale"),
    RowsCase("center-72", "CenterScale", 72, entries="center_scale, column_mean (64 + 8 channels)"),
    RowsCase("center-1152", "CenterScale", 1152, entries="center_scale, column_mean (4 x 256 + 128 channels)"),
    RowsCase("center-1152-f16", "CenterScale", 1152, dtype=F16,
             entries="column_mean_half, float16 conversions in and out"),
    RowsCase("block-1152", "CenterScaleRotate", 1152, "identity", "sylvester", 9,
             entries="center_scale_fwht (AVX-512 rows of 128)"),
    RowsCase("block-72", "ScaleRotate", 72, "identity", "sylvester", 9,
             entries="center_scale_fwht (rows of 8: the loops on every path)"),
    RowsCase("right-512", "ScaleRotate", 1024, "identity", "sylvester", 2,
             entries="center_scale_fwht (rows of 512: the loops on every path)"),
    RowsCase("sylvester-4096", "CenterScaleRotate", 4096, "sylvester", "sylvester", 16,
             entries="center_scale_fwht (rows of 256), fwht_across_rows"),
    RowsCase("dense-right", "CenterScaleRotate", 1152, "identity", "orthogonal", 9,
             entries="center_scale, dense_right"),
    RowsCase("paley-72", "ScaleRotate", 72, "paley", "sylvester", 36,
             entries="dense_left (M = 2: the loops on every path)"),
    RowsCase("paley-1152", "CenterScaleRotate", 1152, "paley", "sylvester", 36,
             entries="dense_left, paley2_left on AVX-512 (M = 32: fused multiply-adds)"),
    RowsCase("paley-4608", "ScaleRotate", 4608, "paley", "sylvester", 36,
             entries="dense_left, paley2_left on AVX-512 (M = 128: fused multiply-adds)"),
    RowsCase("paley-4608-f16", "CenterScaleRotate", 4608, "paley", "sylvester", 36, F16,
             entries="dense_left / paley2_left, column_mean_half, float16 conversions"),
    RowsCase("orthogonal-left-72", "ScaleRotate", 72, "orthogonal", "sylvester", 9,
             entries="dense_left (M = 8: the loops on every path)"),
    RowsCase("orthogonal-left-1152", "ScaleRotate", 1152, "orthogonal", "sylvester", 36,
             entries="dense_left (not of Paley II form, M = 32: AVX-512 fused multiply-adds)"),
]


@pytest.mark.parametrize("case", ROWS_CASES, ids=[c.name for c in ROWS_CASES])
def test_transform_rows_on_every_path(kernel_library, isas, case):
    """Each table entry of the transform (see `entries`) on every path against the scalar path."""
    x = dit_like_input(case.width, batch=2, tokens=9, seed=case.width).astype(case.dtype)
    outputs = ["y", "mean_y"][:1 + case.op.startswith("Center")]
    model = one_node_model(case.op, {"x": x}, case.consts(), outputs)
    reference = run_on(kernel_library, model, {"x": x}, "scalar")
    # float16 outputs round the float32 results once: a float32 last-bit difference flips a half's last bit now and then
    tol = 1e-6 if case.dtype == F32 else 1e-4
    for isa in isas[1:]:
        got = run_on(kernel_library, model, {"x": x}, isa)
        for name, g, r in zip(outputs, got, reference, strict=True):
            assert g.dtype == r.dtype == case.dtype and g.shape == r.shape
            if case.fma_dense_left and isa in FMA_DENSE_LEFT_ISAS:
                assert rel_l2(g, r) <= tol, (isa, name, rel_l2(g, r))
            else:
                np.testing.assert_array_equal(g, r, err_msg=f"{isa} {name} differs from scalar ({case.entries})")
        if case.fma_dense_left and isa in FMA_DENSE_LEFT_ISAS:
            assert not np.array_equal(got[0], reference[0]), f"{isa} ran the scalar loops, not its AVX-512 product"


@pytest.mark.parametrize("wbits,dtype", [(4, F32), (8, F16)])
def test_fill_weight_info_on_every_path(kernel_library, isas, wbits, dtype):
    """The per-weight sums (weights fed at run time: computed on every run by the path's fill_weight_info), float16
    scales converted by the path's conversions: every path gives the scalar path's bits, and the constant-weight
    result (sums computed once, at session creation)."""
    case = MatMulCase(1152, 100, wbits, 8, False, 2, 7, "B1N", dtype)
    p = packed_weight(case)
    codes, scale, zp, bias = activations(case)
    feeds = {"codes": codes, "a_scale": scale, "a_zero_point": zp, "bias": bias}
    fed = int_matmul_model(case, p, constant_weight=False)
    (reference,) = run_on(kernel_library, fed, {**feeds, **weight_inits(p)}, "scalar")
    for isa in isas:
        (got,) = run_on(kernel_library, fed, {**feeds, **weight_inits(p)}, isa)
        (constant,) = run_on(kernel_library, int_matmul_model(case, p), feeds, isa)
        np.testing.assert_array_equal(got, reference, err_msg=isa)
        np.testing.assert_array_equal(constant, reference, err_msg=isa)


def test_the_override_reaches_every_op(kernel_library, isas, monkeypatch, tmp_path):
    """A transform op (no integer kernel in it) takes its path from HADANORM_KERNELS_ISA too: the call log names the
    path it ran, and an unknown path is refused when the kernel is created."""
    x = dit_like_input(72, batch=1, tokens=3).astype(F32)
    model = one_node_model("Scale", {"x": x}, {"mul": np.ones(72, F32)}, ["y"])
    log = tmp_path / "calls.log"
    monkeypatch.setenv("HADANORM_KERNELS_CALL_LOG", str(log))
    monkeypatch.setenv("HADANORM_KERNELS_CALL_LOG_ISA", "1")
    for isa in isas:
        run_on(kernel_library, model, {"x": x}, isa)
    assert log.read_text().splitlines() == [f"Scale {isa}" for isa in isas]
    with kernel_isa("sse9"):  # registered without runtime.kernels' own check: the kernel itself refuses
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(kernel_library))
        with pytest.raises(Exception, match="hadanorm::Scale: HADANORM_KERNELS_ISA=sse9 is not a kernel path"):
            ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_no_cpu_choice_outside_the_path_tables():
    """No source chooses code by CPU on its own: no target_clones / ifunc multi-versioning, CPU feature checks only
    where the paths' availability is decided (isa.cc; attention_amx.cc for the AMX-BF16 attention path), and no
    environment variable other than the documented ones."""
    sources = {path.name: path.read_text() for path in sorted(KERNELS.glob("*.cc")) + sorted(KERNELS.glob("*.h"))}
    assert sources, KERNELS
    for name, text in sources.items():
        assert "target_clones" not in text and "ifunc" not in text and "HN_HOT" not in text, name
        if name not in ("isa.cc", "attention_amx.cc"):
            assert "__builtin_cpu_supports" not in text and "__get_cpuid" not in text, name
    variables = {v for text in sources.values() for v in re.findall(r'getenv\("([A-Z_]+)"\)', text)}
    assert variables == {"HADANORM_KERNELS_ISA", "HADANORM_KERNELS_THREADS", "HADANORM_KERNELS_CALL_LOG",
                         "HADANORM_KERNELS_CALL_LOG_ISA", "HADANORM_KERNELS_API_VERSION",
                         "HADANORM_KERNELS_TWO_LEVEL"}

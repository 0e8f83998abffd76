"""The C++ kernels of the hadanorm ops (runtime/kernels) against the ONNX function bodies graph_passes writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graph_passes.hadamard import HadamardMode, hadamard_factors
from graph_passes.hadanorm_ops import ALL_OPS, TransformOp, ensure_function
from runtime.domain import HADANORM_DOMAIN
from runtime.kernels import (
    KERNEL_DOMAIN,
    KernelLibraryError,
    load_error_message,
    register_kernels,
)
from tests.graphs import dit_like_input

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = [72, 1152, 4608]
SHAPES = [(b, n) for b in (1, 3) for n in (1, 7, 256)]
OPS = {spec.op_type: spec for spec in ALL_OPS}


@pytest.fixture
def call_log(tmp_path, monkeypatch) -> Path:
    """A file the kernels append one line per run to (HADANORM_KERNELS_CALL_LOG)."""
    path = tmp_path / "calls.log"
    monkeypatch.setenv("HADANORM_KERNELS_CALL_LOG", str(path))
    return path


def calls(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def rotation(width: int, mode: HadamardMode, seed: int | None):
    return hadamard_factors(width, mode, block_size=8 if width == 72 else 128, seed=seed)


def op_model(spec: TransformOp, mul: np.ndarray, h_left: np.ndarray | None = None,
             h_right: np.ndarray | None = None) -> bytes:
    """One hadanorm node (constants as initializers) plus its function body; x is [B, N, d] with dynamic B, N."""
    d = mul.shape[0]
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "N", d]))
    consts = {"mul": mul}
    if spec.rotate:
        consts.update(h_left=h_left, h_right=h_right)
    inits = [ir.Value(name=k, const_value=ir.tensor(np.ascontiguousarray(v, dtype=np.float32)))
             for k, v in consts.items()]
    node = ir.Node(HADANORM_DOMAIN, spec.op_type, [x, *inits], num_outputs=spec.num_outputs, name="op")
    for value, name in zip(node.outputs, ("y", "mean_y")):
        value.name = name
    graph = ir.Graph([x], list(node.outputs), nodes=[node], initializers=inits, opset_imports={"": 21}, name="g")
    model = ir.Model(graph, ir_version=10)
    ensure_function(model, spec)
    return ir.serde.serialize_model(model).SerializeToString()


def sessions(model: bytes, library: Path) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """(function body, kernel) sessions of the same model."""
    plain = ort.SessionOptions()
    with_kernels = ort.SessionOptions()
    register_kernels(with_kernels, library)
    for options in (plain, with_kernels):
        options.intra_op_num_threads = 2
    providers = ["CPUExecutionProvider"]
    return (ort.InferenceSession(model, plain, providers=providers),
            ort.InferenceSession(model, with_kernels, providers=providers))


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_kernel_matches(model: bytes, library: Path, log: Path, op_type: str, width: int, shapes=SHAPES,
                          tol: float = 1e-6) -> None:
    function_session, kernel_session = sessions(model, library)
    for batch, tokens in shapes:
        x = dit_like_input(width, batch=batch, tokens=tokens, seed=batch * 1000 + tokens)
        expected = function_session.run(None, {"x": x})
        before = len(calls(log))
        got = kernel_session.run(None, {"x": x})
        assert calls(log)[before:] == [op_type], "the kernel did not run"
        for name, e, g in zip(("y", "mean_y"), expected, got):
            assert g.shape == e.shape, (name, batch, tokens)
            assert rel_l2(g, e) <= tol, (name, batch, tokens, rel_l2(g, e))


# (op, Hadamard mode): the mode only matters to the rotating ops
OP_MODES = [(op, mode) for op, spec in OPS.items()
            for mode in (list(HadamardMode) if spec.rotate else [HadamardMode.FULL])]


@pytest.mark.parametrize("signs", [None, 7], ids=["nosigns", "signs"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("op_type,mode", OP_MODES, ids=[f"{op}-{mode.value}" for op, mode in OP_MODES])
def test_kernel_equals_function_body(kernel_library, call_log, op_type, mode, width, signs):
    """Widths 72 (36x2 full, 9x8 block), 1152 (36x32, 9x128), 4608 (36x128, 36x128); batch 1, 3; 1, 7, 256 tokens."""
    spec = OPS[op_type]
    rng = np.random.default_rng(width)
    mul = np.exp(rng.standard_normal(width) * 0.5)  # SmoothQuant-like 1 / s
    h = rotation(width, mode, signs)
    if signs is not None:
        mul = mul * h.signs  # the sign flips are folded into mul, as graph_passes writes them
    model = op_model(spec, mul, h.left, h.right)
    assert_kernel_matches(model, kernel_library, call_log, op_type, width)


@pytest.mark.parametrize("op_type", ["ScaleRotate", "CenterScaleRotate"])
def test_kernel_dense_fallbacks(kernel_library, call_log, op_type):
    """h_right not Sylvester (dense matmul path) and h_left almost but not exactly the identity: still exact."""
    width, k, m = 1152, 9, 128
    rng = np.random.default_rng(3)
    h_right = np.linalg.qr(rng.standard_normal((m, m)))[0]
    h_left = np.eye(k)
    h_left[0, 1] = 1e-3
    mul = np.exp(rng.standard_normal(width) * 0.5)
    assert_kernel_matches(op_model(OPS[op_type], mul, h_left, h_right), kernel_library, call_log, op_type, width,
                          shapes=[(1, 7), (3, 256)])


def test_kernel_sylvester_with_wrong_scale(kernel_library, call_log):
    """A scaled Sylvester matrix (not normalised) still uses its own scale: the fast path never changes results."""
    width = 1152
    h = rotation(width, HadamardMode.FULL, None)
    mul = np.ones(width)
    model = op_model(OPS["ScaleRotate"], mul, h.left, h.right * 3.0)
    assert_kernel_matches(model, kernel_library, call_log, "ScaleRotate", width, shapes=[(1, 7)])


def test_kernel_bad_shapes_give_clear_error(kernel_library):
    spec = OPS["ScaleRotate"]
    h = rotation(72, HadamardMode.FULL, None)
    model = op_model(spec, np.ones(72), h.left, np.eye(4))  # 36 * 4 != 72
    options = ort.SessionOptions()
    register_kernels(options, kernel_library)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="do not factor the channel width 72"):
        session.run(None, {"x": np.ones((1, 3, 72), np.float32)})


@pytest.mark.parametrize("level", [ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   ort.GraphOptimizationLevel.ORT_ENABLE_ALL], ids=["none", "basic", "all"])
def test_registered_kernels_take_precedence_over_function_bodies(kernel_library, call_log, level):
    """A model carrying the function bodies runs the kernels once the library is registered (hn-export's own
    session options included); without it, the function bodies run (no kernel call)."""
    from runtime.session import session_options

    width = 1152
    h = rotation(width, HadamardMode.FULL, 5)
    x = dit_like_input(width, batch=1, tokens=7)
    for op_type, spec in OPS.items():
        model = op_model(spec, np.ones(width) * h.signs, h.left, h.right)
        options = session_options()
        options.graph_optimization_level = level
        register_kernels(options, kernel_library)
        before = len(calls(call_log))
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})
        assert calls(call_log)[before:] == [op_type]
        plain = session_options()
        plain.graph_optimization_level = level
        ort.InferenceSession(model, plain, providers=["CPUExecutionProvider"]).run(None, {"x": x})
        assert calls(call_log)[before:] == [op_type]  # unchanged: the function body ran


def test_kernel_own_threads(kernel_library, call_log, monkeypatch):
    """HADANORM_KERNELS_THREADS=3: std::threads instead of onnxruntime's pool, same numbers."""
    monkeypatch.setenv("HADANORM_KERNELS_THREADS", "3")
    h = rotation(1152, HadamardMode.FULL, 1)
    model = op_model(OPS["CenterScaleRotate"], np.ones(1152) * h.signs, h.left, h.right)
    assert_kernel_matches(model, kernel_library, call_log, "CenterScaleRotate", 1152, shapes=[(3, 256)])


def test_kernel_domain_is_the_graph_domain():
    assert KERNEL_DOMAIN == HADANORM_DOMAIN


def test_incompatible_api_version_gives_clear_error(kernel_library, monkeypatch):
    """A library asking for a C API this onnxruntime lacks (simulated: API 999) fails with one actionable line."""
    monkeypatch.setenv("HADANORM_KERNELS_API_VERSION", "999")
    with pytest.raises(KernelLibraryError) as info:
        register_kernels(ort.SessionOptions(), kernel_library)
    message = str(info.value)
    assert "\n" not in message
    assert "C API version 999" in message and ort.__version__ in message
    assert "python -m runtime.kernels.build --force" in message


def test_not_a_library_gives_clear_error(tmp_path):
    fake = tmp_path / "libhadanorm_kernels.so"
    fake.write_bytes(b"not an ELF file\n" * 8)
    with pytest.raises(KernelLibraryError) as info:
        register_kernels(ort.SessionOptions(), fake)
    message = str(info.value)
    assert "\n" not in message and "not a loadable shared library" in message and str(fake) in message
    assert "python -m runtime.kernels.build --force" in message


def test_missing_library_message(tmp_path):
    message = load_error_message(RuntimeError(f"{tmp_path}/x.so: cannot open shared object file: No such file"))
    assert message == "hadanorm kernel library not found; build it with `python -m runtime.kernels.build`"


def test_build_is_cached(kernel_library):
    """A second build with unchanged sources reuses the library (no compiler run)."""
    before = kernel_library.stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "-m", "runtime.kernels.build"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == kernel_library
    assert kernel_library.stat().st_mtime_ns == before
    assert "compiling" not in proc.stderr


def test_kernels_package_imports_stdlib_only():
    code = ("import sys; import runtime.kernels as k; "
            "bad = [m for m in ('onnx', 'onnx_ir', 'numpy', 'onnxruntime', 'torch') if m in sys.modules]; "
            "assert not bad, bad; print(k.library_path() is None or k.library_path().name)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("op_type", ["ScaleRotate", "CenterScaleRotate"])
def test_kernel_sylvester_left_factor(kernel_library, call_log, op_type):
    """A power-of-two width above 256 factors as Sylvester(16) (x) Sylvester(256): both factors run as butterflies
    (across rows for h_left); equal to the function body like every other rotation."""
    h = rotation(4096, HadamardMode.FULL, 7)
    assert (h.left.shape, h.right.shape) == ((16, 16), (256, 256))
    mul = np.exp(np.random.default_rng(4096).standard_normal(4096) * 0.5) * h.signs
    assert_kernel_matches(op_model(OPS[op_type], mul, h.left, h.right), kernel_library, call_log, op_type, 4096)

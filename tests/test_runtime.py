"""runtime.Denoiser: provider choice, input checks with clear errors, load errors, hadanorm path reporting."""

from __future__ import annotations


import numpy as np
import onnx
import pytest

from runtime.denoiser import Denoiser, choose_providers
from runtime.errors import RuntimeInputError


@pytest.fixture(scope="module")
def quantized(tiny_onnx, tmp_path_factory):
    from hn_export.cli import main

    out = tmp_path_factory.mktemp("q") / "tiny.w4a4.onnx"
    try:
        main([str(tiny_onnx), "-o", str(out), "--calib-samples", "1", "--calib-steps", "2", "--no-progress"])
    except SystemExit as exc:
        assert exc.code == 0
    return out


def feeds(batch=2, length=7, dtype=np.float32):
    rng = np.random.default_rng(0)
    return {"hidden_states": rng.standard_normal((batch, 4, 8, 8)).astype(dtype),
            "timestep": np.full((batch,), 500.0, dtype),
            "encoder_hidden_states": rng.standard_normal((batch, length, 32)).astype(dtype)}


def test_runs_and_reports_function_bodies(quantized):
    den = Denoiser(quantized, kernel_library=False)
    out = den(feeds())
    assert out.shape == (2, 8, 8, 8) and np.all(np.isfinite(out))
    assert den.transform_ops == ["CenterScaleRotate"]
    assert den.hadanorm_path == "function bodies"
    assert den.providers[-1] == "CPUExecutionProvider"


def test_fp_graph_has_no_hadanorm_ops(tiny_onnx):
    assert Denoiser(tiny_onnx).hadanorm_path == "none"


@pytest.mark.parametrize("change,message", [
    (lambda f: f.pop("timestep"), "missing ['timestep']"),
    (lambda f: f.update(extra=np.zeros(1, np.float32)), "['extra'] are unknown"),
    (lambda f: f.update(hidden_states=f["hidden_states"].astype(np.float64)), "dtype float64; the model takes float32"),
    (lambda f: f.update(hidden_states=np.zeros((2, 4, 16, 16), np.float32)), "dimension 2 must be 8"),
    (lambda f: f.update(hidden_states=np.zeros((2, 4, 8), np.float32)), "rank 4"),
    (lambda f: f.update(timestep=np.zeros(3, np.float32)), "batch 3, other inputs 2"),
    (lambda f: f.update(encoder_hidden_states=np.full((2, 7, 32), np.nan, np.float32)), "NaN or inf"),
])
def test_bad_inputs_give_clear_errors(tiny_onnx, change, message):
    den = Denoiser(tiny_onnx)
    bad = feeds()
    change(bad)
    with pytest.raises(RuntimeInputError) as info:
        den(bad)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_batch_and_caption_length_are_dynamic(tiny_onnx):
    den = Denoiser(tiny_onnx)
    assert den(feeds(batch=3, length=20)).shape == (3, 8, 8, 8)


def test_unknown_provider(tiny_onnx):
    with pytest.raises(RuntimeInputError, match="not available"):
        Denoiser(tiny_onnx, provider="NoSuch")
    assert choose_providers("CPU") == ["CPUExecutionProvider"]


def test_missing_external_data(tiny_onnx, tmp_path):
    model = onnx.load(tiny_onnx)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=1024)
    assert Denoiser(path)(feeds()).shape == (2, 8, 8, 8)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(RuntimeInputError, match="external data file is missing"):
        Denoiser(path)


def test_hadanorm_ops_without_bodies_or_kernels(quantized, tmp_path):
    model = onnx.load(quantized)
    del model.functions[:]
    path = tmp_path / "stripped.onnx"
    onnx.save(model, path)
    with pytest.raises(RuntimeInputError) as info:
        Denoiser(path, kernel_library=False)
    assert "hadanorm ops but carries no function bodies" in str(info.value)


def test_bad_kernel_library(tiny_onnx, tmp_path):
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"\x7fELF not really a library")
    with pytest.raises(RuntimeInputError) as info:
        Denoiser(tiny_onnx, kernel_library=fake)
    assert "is not a loadable shared library" in str(info.value) and "rebuild it" in str(info.value)
    assert "\n" not in str(info.value)


def test_not_onnx(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_bytes(b"garbage")
    with pytest.raises(RuntimeInputError, match="not a readable ONNX model|cannot load"):
        Denoiser(path)
    with pytest.raises(RuntimeInputError, match="does not exist"):
        Denoiser(tmp_path / "missing.onnx")


def test_kernels_active_and_equal_to_function_bodies(quantized):
    from runtime.kernels.build import build

    library = build()
    with_kernels = Denoiser(quantized, kernel_library=library)
    assert with_kernels.hadanorm_path == "kernels"
    plain = Denoiser(quantized, kernel_library=False)
    a, b = with_kernels(feeds()), plain(feeds())
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-5

"""Bad input around the `nbits` and `fused` formats: one line naming the problem and the fix, exit code 2, nothing
written; and the implementation a Denoiser reports for each format."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from runtime.denoiser import Denoiser
from runtime.errors import RuntimeInputError


@pytest.fixture(scope="module")
def formats(tiny_onnx, tmp_path_factory):
    from hn_export.cli import main

    folder = tmp_path_factory.mktemp("formats")
    out = {}
    for fmt in ("qdq", "nbits", "fused"):
        out[fmt] = folder / f"tiny.{fmt}.onnx"
        try:
            main([str(tiny_onnx), "--format", fmt, "-o", str(out[fmt]), "--calib-samples", "1", "--calib-steps", "2",
                  "--no-progress"])
        except SystemExit as exc:
            assert exc.code == 0
    return out


def feeds(batch=2):
    rng = np.random.default_rng(0)
    return {"hidden_states": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32),
            "timestep": np.full((batch,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 7, 32)).astype(np.float32)}


def test_reported_implementation(formats):
    assert Denoiser(formats["qdq"], kernel_library=False).implementation == "qdq: as written, transforms: function bodies"
    assert Denoiser(formats["nbits"], kernel_library=False).implementation == (
        "nbits: MatMulNBits, transforms: function bodies")
    assert Denoiser(formats["fused"], kernel_library=False).implementation == (
        "fused: function bodies, attention: hadanorm::Attention fast, function bodies")


@pytest.mark.parametrize("args,message", [
    (["--format", "nbits", "--weight-block", "100"],
     "error: --format nbits needs a power-of-two --weight-block >= 16 (MatMulNBits), got 100; use --weight-block 128"),
    (["--format", "fused", "--weight-block", "36"],
     "error: --format fused needs a --weight-block that is a multiple of 8 for 4-bit weights, got 36; "
     "use --weight-block 128"),
    (["--format", "int4"], "error: Invalid value for '--format'"),
])
def test_format_options_refused(tiny_onnx, hn_cli, tmp_path, args, message):
    out = tmp_path / "out.onnx"
    result = hn_cli(tiny_onnx, "-o", out, *args)
    assert result.exit_code == 2
    assert result.err.strip().splitlines() == [result.err.strip()] and result.err.startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_fused_graph_without_bodies_or_library(formats, hn_cli, tmp_path, monkeypatch):
    model = onnx.load(formats["fused"])
    del model.functions[:]
    stripped = tmp_path / "stripped.onnx"
    onnx.save(model, stripped)
    with pytest.raises(RuntimeInputError, match="uses hadanorm ops but carries no function bodies and no kernel "
                                                "library is registered; build the kernels"):
        Denoiser(stripped, kernel_library=False)
    monkeypatch.setattr("runtime.session.library_path", lambda: None)  # as on a machine without the library
    result = hn_cli("diff", stripped, formats["qdq"], "--steps", "0")
    assert result.exit_code == 2 and result.err.count("\n") == 1 and "no kernel library" in result.err


def test_packed_weight_of_wrong_size(formats, tmp_path):
    model = onnx.load(formats["fused"])
    node = next(n for n in model.graph.node if n.op_type == "IntMatMul4")
    inits = {t.name: t for t in model.graph.initializer}
    b = onnx.numpy_helper.to_array(inits[node.input[3]])
    inits[node.input[3]].CopyFrom(onnx.numpy_helper.from_array(b[:-1], node.input[3]))  # one column tile short
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    with pytest.raises(RuntimeInputError, match=r"broken.onnx: a packed weight does not match its declared shape "
                                                r"\(IntMatMul4.*re-quantize the model with `hn-export MODEL.onnx "
                                                r"--format fused`"):
        Denoiser(broken, kernel_library=False)(feeds())  # onnxruntime's shape inference finds it at load time


def test_fp16_graph_runs_with_the_library(tiny_onnx, hn_cli, tmp_path, kernel_library):
    """An fp16 export quantized to every format runs with the kernel library registered (the kernels declare fp16
    and compute in float32) and agrees with the fp16 function bodies up to fp16 rounding flips: measured 38 dB
    (fused, tiny), bound 25 dB; qdq fp16 with the transform kernels likewise."""
    from hn_export.metrics import sqnr_db

    fp16 = tmp_path / "tiny.fp16.onnx"
    assert hn_cli("export", "--preset", "tiny", "--seed", "0", "--fp16", "-o", fp16).exit_code == 0
    half = {k: v.astype(np.float16) for k, v in feeds().items()}
    for fmt in ("qdq", "fused"):
        out = tmp_path / f"tiny.fp16.{fmt}.onnx"
        result = hn_cli(fp16, "--format", fmt, "-o", out, "--calib-samples", "1", "--calib-steps", "2",
                        "--no-progress")
        assert result.exit_code == 0, result.err
        with_kernels = Denoiser(out, kernel_library=kernel_library)
        assert "kernels (" in with_kernels.implementation
        got = with_kernels(half).astype(np.float32)
        want = Denoiser(out, kernel_library=False)(half).astype(np.float32)
        assert np.all(np.isfinite(got)) and sqnr_db(want, got) > 25.0, fmt


def test_median_call_ms_names_every_graph_and_what_ran_it(formats, tiny_onnx):
    """The demo's timing table: one entry per graph, a positive median, the implementation of each."""
    from hn_export.latency import median_call_ms

    timings = median_call_ms({"FP32": tiny_onnx, "nbits": formats["nbits"], "fused": formats["fused"]}, runs=2)
    assert list(timings) == ["FP32", "nbits", "fused"]
    assert all(ms > 0 for ms, _ in timings.values())
    assert [impl.split(":")[0] for _, impl in timings.values()] == ["float", "nbits", "fused"]

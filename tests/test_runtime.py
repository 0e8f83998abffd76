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


def test_shrink_arena_sets_the_run_option_and_keeps_the_output(quantized):
    """Denoiser(shrink_arena=True) runs every call with onnxruntime's arena shrinkage for the CPU (the pipeline's
    choice from about 1 M pixels), and gives the same bits as the default."""
    key = "memory.enable_memory_arena_shrinkage"
    kept, shrunk = Denoiser(quantized), Denoiser(quantized, shrink_arena=True)
    assert shrunk.run_options.get_run_config_entry(key) == "cpu:0"
    with pytest.raises(RuntimeError):  # not set on the default run options
        kept.run_options.get_run_config_entry(key)
    first, second = shrunk(feeds()), shrunk(feeds())
    np.testing.assert_array_equal(first, kept(feeds()))
    np.testing.assert_array_equal(second, first)


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


def _single_op_model(model: onnx.ModelProto, node: onnx.NodeProto) -> bytes:
    """One hadanorm node of `model` with its constant inputs and its function body; input = the node's input 0."""
    from onnx import TensorProto, helper

    inits = {t.name: t for t in model.graph.initializer}
    assert all(name in inits for name in node.input[1:]), "hadanorm ops take constants besides x"
    graph = helper.make_graph(
        [node], "op", [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in node.output],
        [inits[name] for name in node.input[1:]])
    functions = [f for f in model.functions if (f.domain, f.name) == (node.domain, node.op_type)]
    single = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                               functions=functions)
    return single.SerializeToString()


def test_kernels_active_and_equal_to_function_bodies(quantized, tmp_path, monkeypatch, kernel_library):
    """Per op, on the activations the W4A4 graph really feeds each hadanorm op: kernel and function body agree.

    The two whole W4A4 graphs cannot be compared end to end at a tight bound: kernel and function body round
    differently in float32 (relative L2 ~3.6e-7 per op), and a 1e-7 change that moves one activation across a 4-bit
    rounding boundary changes it by a whole quantization step, which later quantizers carry on. Per op, with the
    same input, no quantizer sits between the two numbers, so float32 rounding is all that separates them. Every
    number an op computes is a float32 sum of at most 72 products (the channel rotation; the token mean sums 16 or
    7), and an n-term float32 sum is exact to n * 2^-24 relative to its terms' magnitudes: 72 * 2^-24 = 4.3e-6, the
    bound below. Measured: max 5.8e-7 over the 14 ops and both outputs (and 0 between the extracted op and the
    graph's). End to end, the transform-only graph (hadanorm ops, no quantizers, so no rounding boundary to cross)
    is compared in the next test."""
    from runtime.domain import HADANORM_DOMAIN
    from tests.test_kernels import calls, rel_l2, sessions

    library = kernel_library
    assert Denoiser(quantized, kernel_library=library).hadanorm_path == "kernels"
    model = onnx.load(quantized)
    ops = [node for node in model.graph.node if node.domain == HADANORM_DOMAIN]
    assert len(ops) == 14  # one per activation site of the tiny model
    # every op's input and outputs in the function-body run of the whole graph
    probe = onnx.load(quantized)
    names = list(dict.fromkeys(name for node in ops for name in (node.input[0], *node.output)))
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    onnx.save(probe, tmp_path / "probe.onnx")
    values = dict(zip(names, Denoiser(tmp_path / "probe.onnx", kernel_library=False).session.run(names, feeds())))
    log = tmp_path / "calls.log"
    monkeypatch.setenv("HADANORM_KERNELS_CALL_LOG", str(log))
    for node in ops:
        function_session, kernel_session = sessions(_single_op_model(model, node), library)
        x = {node.input[0]: values[node.input[0]]}
        expected = function_session.run(None, x)
        before = len(calls(log))
        got = kernel_session.run(None, x)
        assert calls(log)[before:] == [node.op_type], "the kernel did not run"
        for name, e, g in zip(node.output, expected, got):
            assert rel_l2(e, values[name]) <= 1e-6, name  # the extracted op is the graph's op (measured 0)
            assert rel_l2(g, e) <= 72 * 2.0**-24, (name, rel_l2(g, e))


def test_kernels_equal_function_bodies_end_to_end_without_quantizers(tiny_onnx, tmp_path, kernel_library):
    """The transform-only graph: 14 hadanorm ops, no rounding to a grid, so the per-op float32 differences (~3.6e-7)
    stay of that order through the network. Measured: relative L2 2.9e-7 (hadanorm, tiny model); bound 1e-5."""
    from hn_export.cli import main

    out = tmp_path / "transformed.onnx"
    with pytest.raises(SystemExit) as info:
        main([str(tiny_onnx), "--transform-only", "-o", str(out), "--calib-samples", "1", "--calib-steps", "2",
              "--no-progress"])
    assert info.value.code == 0
    with_kernels = Denoiser(out, kernel_library=kernel_library)
    assert with_kernels.hadanorm_path == "kernels"
    a, b = with_kernels(feeds()), Denoiser(out, kernel_library=False)(feeds())
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-5

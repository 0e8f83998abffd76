"""Calibration statistics: any input rank (a MatMul on [T, d] included), and the statistics file format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.linears import find_activation_sites
from hn_export.calibration import (
    ALL_LINEARS,
    CalibrationStats,
    _add_stat_outputs,
    calibrate,
)
from hn_export.denoise import DenoiseConfig
from hn_export.errors import UserError

D = 8
# float32 reductions (sums of <= 60 values for the means) against float64 references
TOL = 1e-5


def matmul_model(shape: list | None) -> ir.Model:
    """x (shape as declared; None = undeclared) @ W [D, 4]: one linear whose input has the rank of x."""
    w = np.random.default_rng(0).standard_normal((D, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def tokens(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    """Channel offsets that differ for every leading index, so centering over the wrong axes gives other numbers."""
    rng = np.random.default_rng(seed)
    lead = shape[:-2] if len(shape) >= 2 else ()
    offsets = rng.standard_normal((*lead, 1, D)) * 3.0 if len(shape) >= 2 else rng.standard_normal(D) * 3.0
    return (rng.standard_normal(shape) + offsets).astype(np.float32)


def reference_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documented definition: max over every axis but the last; centering subtracts the mean over axis -2 for
    each index of the axes before it ([T, d]: over axis 0); a rank-1 input is one token (centered to 0)."""
    a = x.astype(np.float64)
    d = a.shape[-1]
    absmax = np.abs(a).reshape(-1, d).max(axis=0)
    if a.ndim == 1:
        return absmax, np.zeros(d)
    centered = a - a.mean(axis=-2, keepdims=True)
    return absmax, np.abs(centered).reshape(-1, d).max(axis=0)


def stats_of(model: ir.Model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    owners, _, _ = _add_stat_outputs(model)
    assert owners == {"hn_calib.0": "x"}
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    absmax, centered = session.run(["hn_calib.0.absmax", "hn_calib.0.centered_absmax"], {"x": x})
    return absmax, centered


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("shape,declared", [
    ((D,), [D]),
    ((6, D), ["T", D]),  # a MatMul on [B, d] (adaLN linears exported as MatMul)
    ((2, 6, D), ["B", "N", D]),
    ((2, 3, 5, D), ["B", "H", "N", D]),
    ((2, 6, D), None),  # rank not declared in the graph
], ids=["rank1", "rank2", "rank3", "rank4", "undeclared"])
def test_statistics_of_any_rank(shape, declared):
    x = tokens(shape)
    absmax, centered = stats_of(matmul_model(declared), x)
    want_absmax, want_centered = reference_stats(x)
    assert absmax.shape == centered.shape == (D,)
    assert rel(absmax, want_absmax) <= TOL
    if x.ndim == 1:
        assert np.all(centered == 0.0)
        return
    assert rel(centered, want_centered) <= TOL
    # the test tells the right token axis from the wrong ones: a mean over every token axis together differs
    a = x.astype(np.float64).reshape(-1, D)
    pooled = np.abs(a - a.mean(axis=0)).max(axis=0)
    if x.ndim > 2:
        assert rel(pooled, want_centered) > 100 * TOL


def gemm_as_matmul(src: Path, dst: Path) -> None:
    """Rewrite every Gemm(x, W, b, transB=1) as MatMul(x, W^T) + b, keeping its module path: the tiny PixArt's
    adaLN linears then are MatMuls on 2-D inputs [B, d]."""
    model = onnx.load(src)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("transB") == 1 and attrs.get("transA", 0) == 0
        assert attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        wt = numpy_helper.to_array(inits[node.input[1]]).T.copy()
        graph.initializer.remove(inits[node.input[1]])
        graph.initializer.append(numpy_helper.from_array(wt, f"{node.input[1]}.t"))
        matmul = helper.make_node("MatMul", [node.input[0], f"{node.input[1]}.t"], [f"{node.output[0]}.mm"],
                                  name=f"{node.name}.mm")
        matmul.metadata_props.extend(node.metadata_props)
        nodes += [matmul, helper.make_node("Add", [f"{node.output[0]}.mm", node.input[2]], list(node.output),
                                           name=f"{node.name}.bias")]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, dst)


def with_activations(path: Path, names: list[str]) -> ort.InferenceSession:
    model = ir.load(path)
    values = {v.name: v for node in model.graph for v in node.outputs}
    for name in names:
        if name in values and not values[name].is_graph_output():
            model.graph.outputs.append(values[name])
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])


def test_calibrates_2d_matmul_inputs(tiny_onnx, tmp_path):
    """The bug: calibration refused a MatMul on a 2-D input (it only ran because the exporter emits Gemm there)."""
    path = tmp_path / "matmul.onnx"
    gemm_as_matmul(tiny_onnx, path)
    rng = np.random.default_rng(4)
    feeds = {"hidden_states": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([20.0, 700.0], np.float32),
             "encoder_hidden_states": (rng.standard_normal((2, 7, 32)) * 0.2).astype(np.float32)}
    ref = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()  # the rewrite keeps the function
    sites = find_activation_sites(ir.load(path), ALL_LINEARS)
    two_d = [s.activation.name for s in sites if s.activation.shape is not None and len(s.activation.shape) == 2]
    assert len(two_d) == 3  # adaln_single: timestep_embedder.linear_1 [B, 256], linear_2 and linear [B, 72]
    calib = tmp_path / "calib.npz"
    np.savez(calib, **feeds)
    stats = calibrate(path, DenoiseConfig(), inputs=calib, progress=False)
    assert stats.calls == 1 and set(two_d) <= set(stats.sites)
    names = sorted(n for n in stats.sites if n not in feeds)
    values = {**feeds, **dict(zip(names, with_activations(path, names).run(names, feeds)))}
    conv_inputs = {s.activation.name for s in sites if s.is_conv}
    assert conv_inputs == {"hidden_states"}  # the patch-embedding conv: statistics of its pixels' channels
    for name in stats.sites:
        value = values[name]
        if name in conv_inputs:  # [B, C, H, W] -> [B, H*W, C]
            value = value.transpose(0, 2, 3, 1).reshape(value.shape[0], -1, value.shape[1])
        want_absmax, want_centered = reference_stats(value)
        assert rel(stats.sites[name].absmax, want_absmax) <= TOL, name
        assert rel(stats.sites[name].centered_absmax, want_centered) <= TOL, name


# ---- the statistics file ------------------------------------------------------------------------------------

def _stats_file(path: Path, arrays: dict[str, np.ndarray], model_hash: str = "h") -> None:
    meta = json.dumps({"model_hash": model_hash, "calls": 3, "source": "test"})
    np.savez(path, __meta__=np.array(meta), **arrays)


def test_saved_file_holds_absmax_and_centered_absmax_only(tmp_path):
    from graph_passes.site_transforms import SiteStats

    stats = CalibrationStats("h", {"a/b": SiteStats(np.arange(3.0), np.arange(3.0) / 2)}, 3, "test")
    stats.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as data:
        assert sorted(data.files) == ["__meta__", "a/b/absmax", "a/b/centered_absmax"]
    loaded = CalibrationStats.load(tmp_path / "s.npz", expected_hash="h")
    assert np.array_equal(loaded.sites["a/b"].absmax, np.arange(3.0))
    assert np.array_equal(loaded.sites["a/b"].centered_absmax, np.arange(3.0) / 2)


def test_older_file_with_mean_still_loads(tmp_path):
    arrays = {"x/absmax": np.array([1.0, 2.0]), "x/centered_absmax": np.array([0.5, 1.0]), "x/mean": np.zeros(2)}
    _stats_file(tmp_path / "old.npz", arrays)
    loaded = CalibrationStats.load(tmp_path / "old.npz", expected_hash="h")
    assert np.array_equal(loaded.sites["x"].absmax, [1.0, 2.0])
    assert np.array_equal(loaded.sites["x"].centered_absmax, [0.5, 1.0])


def test_file_lacking_a_statistic_is_refused(tmp_path):
    _stats_file(tmp_path / "bad.npz", {"x/absmax": np.array([1.0, 2.0]), "x/mean": np.zeros(2)})
    with pytest.raises(UserError) as info:
        CalibrationStats.load(tmp_path / "bad.npz")
    assert str(info.value) == (f"calibration statistics {tmp_path / 'bad.npz'} lack centered_absmax for activation x; "
                               "recalibrate with --save-stats")


def test_cli_reuses_older_stats_files_and_refuses_incomplete_ones(hn_cli, tiny_onnx, tmp_path):
    stats = tmp_path / "stats.npz"
    fresh = tmp_path / "fresh.onnx"
    result = hn_cli(tiny_onnx, "-o", fresh, "--save-stats", stats, "--calib-samples", "1", "--calib-steps", "2",
                    "--no-progress")
    assert result.exit_code == 0, result.err
    with np.load(stats) as data:
        arrays = {k: data[k] for k in data.files}
    old = {**arrays, **{k.replace("/absmax", "/mean"): np.ones_like(v) for k, v in arrays.items()
                        if k.endswith("/absmax")}}
    np.savez(tmp_path / "old.npz", **old)
    result = hn_cli(tiny_onnx, "-o", tmp_path / "old.onnx", "--stats", tmp_path / "old.npz", "--no-progress")
    assert result.exit_code == 0, result.err
    assert (tmp_path / "old.onnx").read_bytes() == fresh.read_bytes()  # the mean played no part
    incomplete = {k: v for k, v in arrays.items() if not k.endswith("/centered_absmax")}
    np.savez(tmp_path / "incomplete.npz", **incomplete)
    result = hn_cli(tiny_onnx, "-o", tmp_path / "x.onnx", "--stats", tmp_path / "incomplete.npz", "--no-progress")
    assert result.exit_code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: calibration statistics ")
    assert "lack centered_absmax for activation" in lines[0] and lines[0].endswith("recalibrate with --save-stats")
    assert not (tmp_path / "x.onnx").exists()


def test_calibrating_a_loaded_model_leaves_it_unchanged(tiny_onnx):
    """The quantize job loads the graph once and calibrates on it: the reductions come out again."""
    from hn_export.denoise import DenoiseConfig
    from hn_export.model_files import load_model

    model = load_model(tiny_onnx)
    before = ir.serde.serialize_model(model).SerializeToString()
    stats = calibrate(tiny_onnx, DenoiseConfig(samples=1, steps=2), progress=False, model=model)
    assert stats.sites and ir.serde.serialize_model(model).SerializeToString() == before


def test_session_failure_leaves_the_model_as_it_was(tiny_onnx, monkeypatch):
    """ShardCalibrator adds its reduction outputs to the caller's model; when the session cannot be opened they
    are taken out again before the error propagates (the model is the caller's, and may be written next)."""
    import hn_export.calibration as calibration

    model = ir.load(str(tiny_onnx))
    outputs, nodes = [v.name for v in model.graph.outputs], len(model.graph)

    def refuse(*args, **kwargs):
        raise RuntimeError("no session here")

    monkeypatch.setattr(calibration, "open_session", refuse)
    with pytest.raises(RuntimeError, match="no session here"):
        with calibration.ShardCalibrator(model, DenoiseConfig(samples=1, steps=1)):
            pass
    assert [v.name for v in model.graph.outputs] == outputs and len(model.graph) == nodes

"""Static per-tensor activation scales with one scale per timestep (HQ-DM's temporal steps)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.linears import SiteSelection
from graph_passes.methods import Method, TransformOptions
from graph_passes.pipeline import quantize_model
from graph_passes.quantization import QuantConfig
from graph_passes.static_act_quant import ActScaleTable
from runtime.session import create_session
from tests.graphs import dit_like_input, serialize

ALL = SiteSelection(include=("",))
TIMESTEPS = np.array([999.0, 500.0, 1.0])
ABSMAX = np.array([9.0, 3.0, 0.5])


def timestep_model(width: int = 64, out: int = 32) -> tuple[ir.Model, np.ndarray]:
    rng = np.random.default_rng(0)
    wt = (rng.standard_normal((width, out)) / np.sqrt(width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["mm"], name="linear"),
         helper.make_node("Cast", ["timestep"], ["t"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["t", "axes"], ["t2"]),
         helper.make_node("Unsqueeze", ["t2", "axes"], ["t3"]),
         helper.make_node("Mul", ["t3", "zero"], ["t0"]),
         helper.make_node("Add", ["mm", "t0"], ["y"])],  # timestep read (times 0) so the input is a real one
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N", width]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "N", out])],
        [numpy_helper.from_array(wt, "wt"), numpy_helper.from_array(np.array([-1], np.int64), "axes"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto), wt


def ref_weight8(wt: np.ndarray) -> np.ndarray:
    out = np.empty_like(wt, dtype=np.float64)
    for start in range(0, wt.shape[0], 128):
        rows = wt[start:start + 128].astype(np.float64)
        scale = (np.abs(rows).max(axis=0) / 127).astype(np.float32).astype(np.float64)
        out[start:start + 128] = np.clip(np.round(rows / scale), -127, 127) * scale
    return out


@pytest.mark.parametrize("act_bits", [4, 3])
def test_graph_picks_the_scale_of_the_nearest_timestep(act_bits):
    """``s_k = absmax_k / (2^(b-1) - 1)`` for the table step nearest the timestep input; symmetric narrow grid."""
    model, wt = timestep_model()
    table = ActScaleTable("timestep", TIMESTEPS, {"linear": ABSMAX})
    quantize_model(model, {}, TransformOptions(method=Method.NONE), QuantConfig(8, act_bits), ALL, act_scales=table)
    session = create_session(serialize(model))
    x = dit_like_input(64, batch=2, tokens=8) * 0.5
    qmax = 2 ** (act_bits - 1) - 1
    for t, k in [(999.0, 0), (500.0, 1), (1.0, 2), (740.0, 1), (260.0, 1), (240.0, 2)]:
        got = session.run(None, {"x": x, "timestep": np.full(2, t, np.float32)})[0]
        s = np.float64(np.float32(ABSMAX[k] / qmax))
        xq = np.clip(np.round(x.astype(np.float64) / s), -qmax, qmax) * s
        want = xq @ ref_weight8(wt)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5, (t, k)


def test_table_length_must_match_its_timesteps():
    with pytest.raises(ValueError, match=r"^the activation scale table has 2 values for site a but 3 timesteps"):
        ActScaleTable("timestep", TIMESTEPS, {"a": ABSMAX[:2]})


CALIB = ("--calib-samples", "1", "--calib-steps", "4", "--no-progress")


def test_cli_calibrates_saves_and_reuses_the_table(hn_cli, tiny_onnx, tmp_path):
    """The table has one entry per calibration step (the scheduler's timesteps) for every site; the saved file
    passed back with --act-scales gives a byte-identical model."""
    from hn_export.act_scales import schedule_timesteps
    from hn_export.graph_import import load_graph

    first, second, table = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "scales.json"
    result = hn_cli(tiny_onnx, "--method", "quarot", "--act-granularity", "timestep", "--save-act-scales", table,
                    "-o", first, *CALIB)
    assert result.exit_code == 0, result.err
    assert "activation scales: 4 timesteps from trajectories" in result.out
    data = json.loads(table.read_text())
    assert data["timesteps"] == list(schedule_timesteps(load_graph(tiny_onnx), 4))
    layers = json.loads(hn_cli("layers", tiny_onnx, "--json").out)
    assert set(data["absmax"]) == {s["name"] for s in layers["sites"]}
    assert all(len(v) == 4 and min(v) > 0 for v in data["absmax"].values())
    result = hn_cli(tiny_onnx, "--method", "quarot", "--act-scales", table, "-o", second, *CALIB)
    assert result.exit_code == 0, result.err
    assert first.read_bytes() == second.read_bytes()


def test_cli_bad_schedules(hn_cli, tiny_onnx, tmp_path):
    """A schedule whose length is not the step count, a site left out, static scales in the fused format:
    one line, exit 2, nothing written."""
    layers = json.loads(hn_cli("layers", tiny_onnx, "--json").out)
    sites = [s["name"] for s in layers["sites"]]
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"timesteps": [999, 500, 1], "absmax": {s: [1.0, 1.0, 1.0] for s in sites}}))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"absmax": {s: [1.0] * 4 for s in sites[1:]}}))
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps({"absmax": {s: [1.0] * (3 if i == 2 else 4) for i, s in enumerate(sites)}}))
    out = tmp_path / "out.onnx"
    cases = [
        (("--act-scales", short), r"^error: .*short.json has 3 timesteps but the schedule has 4 steps \(--calib-steps\);"
                                  r" give one value per step, or pass --calib-steps 3$"),
        (("--act-scales", partial), rf"^error: .*partial.json has no values for 1 site\(s\), e.g. {re.escape(sites[0])};"),
        (("--act-scales", ragged), rf"^error: .*ragged.json has 3 values for site {re.escape(sites[2])} but the "
                                   r"schedule has 4 steps"),
        (("--act-granularity", "timestep", "--format", "fused"),
         r"^error: --act-granularity timestep cannot be written as --format fused"),
    ]
    for args, pattern in cases:
        result = hn_cli(tiny_onnx, "--method", "none", *args, "-o", out, *CALIB)
        assert result.exit_code == 2, (args, result.err)
        assert len(result.err.strip().splitlines()) == 1, result.err
        assert re.match(pattern, result.err.strip()), result.err
        assert not out.exists()

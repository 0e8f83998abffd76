"""Sensitivity: the gated activation-quantizer graph and `hn-export sensitivity`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graph_passes.gated_activation_quant import MASK_INPUT
from graph_passes.linears import SiteSelection
from graph_passes.methods import Method, TransformOptions
from graph_passes.pipeline import quantize_model
from runtime.session import create_session
from tests.graphs import dit_like_input, mlp_model, serialize
from tests.test_passes import calibration_stats

ALL = SiteSelection(include=("",))


@pytest.mark.parametrize("method", [Method.NONE, Method.HADANORM])
def test_gated_graph_mask_semantics(method):
    base = mlp_model(72, 288)
    x = dit_like_input(72)
    stats = calibration_stats(base, x)
    expected = create_session(serialize(base)).run(None, {"x": x})

    def run(model, mask):
        return create_session(serialize(model)).run(None, {"x": x, MASK_INPUT: np.asarray(mask, np.float32)})

    gated = mlp_model(72, 288)
    plan = quantize_model(gated, stats, TransformOptions(method=method), None, ALL, gated_act_bits=4)
    assert len(plan.sites) == 2
    off = run(gated, [0, 0])
    for got, want in zip(off, expected):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5  # all quantizers off = float graph
    on = run(gated, [1, 1])
    assert all(np.linalg.norm(a - b) > 0 for a, b in zip(on, expected))
    first_only = run(gated, [1, 0])
    # quantizer 0 feeds "up" and "side"; "side" (output 1) only sees quantizer 0
    assert np.array_equal(first_only[1], on[1])
    assert not np.array_equal(first_only[0], on[0])


def test_sensitivity_command(hn_cli, tiny_onnx, tmp_path):
    result = hn_cli("sensitivity", tiny_onnx, "--methods", "none,hadanorm", "--steps", "1", "--calib-steps", "2",
                    "--calib-samples", "1", "--out", tmp_path, "--no-progress")
    assert result.exit_code == 0, result.err
    data = json.loads((tmp_path / "sensitivity.json").read_text())
    assert len(data["sites"]) == 2 * 14
    assert set(data["by_role"]) == {"none", "hadanorm"} and len(data["by_role"]["none"]) == 7
    assert set(data["by_block"]["none"]) == {"0", "1"}
    values = [s["sqnr_db"] for s in data["sites"]]
    assert all(np.isfinite(v) and v > 0 for v in values)
    assert (tmp_path / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "text in" in result.out

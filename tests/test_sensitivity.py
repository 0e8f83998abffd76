"""Sensitivity: the gated activation-quantizer graph and `hn-export sensitivity`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from graph_passes.gated_activation_quant import MASK_INPUT
from graph_passes.methods import Method, TransformOptions
from graph_passes.pipeline import quantize_model
from runtime.session import create_session
from tests.cli_runner import run_cli
from tests.graphs import dit_like_input, mlp_model, serialize
from tests.roles import ALL_PIXART
from tests.test_passes import calibration_stats

ALL = ALL_PIXART


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


SENSITIVITY = ("--steps", "1", "--calib-steps", "2", "--calib-samples", "1", "--no-progress")


def sensitivity(model: Path, out: Path, *args) -> dict:
    assert run_cli(["sensitivity", str(model), *SENSITIVITY, "--out", str(out), *map(str, args)]) == 0
    return json.loads((out / "sensitivity.json").read_text())


@pytest.fixture(scope="module")
def default_run(tiny_onnx, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sensitivity")
    return out, sensitivity(tiny_onnx, out, "--methods", "none,hadanorm")


def site_sqnr(data: dict, method: str) -> np.ndarray:
    return np.array([s["sqnr_db"] for s in data["sites"] if s["method"] == method])


# One A4 quantizer at a time on the tiny model (2 blocks, 72 wide), 1 denoising step, seed 0. Measured per-site
# end-of-denoising SQNR: none 24.6 to 68.0 dB (mean 36.2), hadanorm 33.0 to 79.6 dB (mean 53.7); with --seed 1:
# none min 25.3, hadanorm min 40.1, means 38.5 / 57.9. The bounds are the measured minima less 3 dB, and the
# hadanorm-over-none gain of the mean (measured 17.5 and 19.4 dB) at least 10 dB. What they catch: all 14 quantizers
# switched on in every run (a mask bug) measures 9.2 dB for none and 27.2 dB for hadanorm (same settings), below
# both bounds; a gated graph that lost the method's transforms makes hadanorm score like none (gain 0); a
# quantizer that is never switched on gives inf (not finite).
MIN_SQNR_DB = {"none": 24.6 - 3.0, "hadanorm": 33.0 - 3.0}
MIN_HADANORM_GAIN_DB = 10.0


def test_sensitivity_command(default_run):
    out, data = default_run
    assert len(data["sites"]) == 2 * 14
    assert set(data["by_role"]) == {"none", "hadanorm"} and len(data["by_role"]["none"]) == 7
    assert set(data["by_block"]["none"]) == {"0", "1"}
    assert data["meta"]["inputs"] == "seeded" and data["meta"]["samples"] == 1
    for method, bound in MIN_SQNR_DB.items():
        values = site_sqnr(data, method)
        assert len(values) == 14 and np.all(np.isfinite(values)), (method, values)
        assert values.min() >= bound, (method, values)
    gain = site_sqnr(data, "hadanorm").mean() - site_sqnr(data, "none").mean()
    assert gain >= MIN_HADANORM_GAIN_DB, gain
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_inputs_file(hn_cli, tiny_onnx, tmp_path, default_run):
    """--inputs: the denoising runs take the file's caption embeddings (recorded in sensitivity.json)."""
    from tests.test_cli_compare import pairs_file

    result = hn_cli("sensitivity", tiny_onnx, *SENSITIVITY, "--methods", "hadanorm", "--out", tmp_path / "out",
                    "--inputs", pairs_file(tiny_onnx, tmp_path / "other.npz", other_captions=True))
    assert result.exit_code == 0, result.err
    assert "text in" in result.out and "ffn out" in result.out  # the table by role
    data = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert data["meta"]["inputs"] == "file:other.npz" and data["meta"]["samples"] == 1
    got, default = site_sqnr(data, "hadanorm"), site_sqnr(default_run[1], "hadanorm")
    assert got.shape == default.shape == (14,)
    assert np.all(got != default)  # every run is conditioned on other captions
    seeded = sensitivity(tiny_onnx, tmp_path / "seeded", "--methods", "hadanorm", "--inputs",
                         pairs_file(tiny_onnx, tmp_path / "seeded.npz", other_captions=False))
    assert np.array_equal(site_sqnr(seeded, "hadanorm"), default)  # the default run's captions: its numbers


def test_sensitivity_calib_file(tiny_onnx, tmp_path, default_run):
    from tests.test_cli_compare import calib_file

    data = sensitivity(tiny_onnx, tmp_path / "out", "--methods", "hadanorm", "--calib",
                       calib_file(tmp_path / "calib.npz"))
    assert data["meta"]["calibration"] == {"file": "calib.npz"}
    assert not np.array_equal(site_sqnr(data, "hadanorm"), site_sqnr(default_run[1], "hadanorm"))

"""`hn-export compare` and `hn-export sensitivity` on user files: `--calib FILE.npz` (calibration inputs) and
`--inputs FILE.npz` (evaluation inputs), and the one-line errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hn_export.denoise import DenoiseConfig, ModelSignature, sample_conditions
from hn_export.model_files import load_model
from tests.cli_runner import run_cli

FAST = ("--methods", "none,hadanorm", "--bits", "w4a4", "--steps", "2", "--calib-steps", "2", "--calib-samples", "1",
        "--no-progress")
EVAL_SEED = 1000  # compare and sensitivity evaluate from seed --seed + 1000 (--seed 0)


def pairs_file(model: Path, path: Path, other_captions: bool, samples: int = 1) -> Path:
    """(unconditional, conditional) rows for `samples` samples: the seeded latents at t = 500 and either the very
    captions the default run draws (so the default figures must come back) or other ones."""
    sig = ModelSignature.of(load_model(model))
    rng = np.random.default_rng(99)
    rows = {"hidden_states": [], "timestep": [], "encoder_hidden_states": []}
    for index in range(samples):
        cond = sample_conditions(sig, DenoiseConfig(seed=EVAL_SEED), index)
        captions = cond["captions"]
        if other_captions:
            captions = (rng.standard_normal(captions.shape) * 0.2).astype(np.float32)
        rows["hidden_states"].append(np.repeat(cond["latents"], 2, axis=0))
        rows["timestep"].append(np.full(2, 500.0, np.float32))
        rows["encoder_hidden_states"].append(captions)
    np.savez(path, **{k: np.concatenate(v) for k, v in rows.items()})
    return path


def calib_file(path: Path, rows: int = 2) -> Path:
    rng = np.random.default_rng(5)
    np.savez(path, hidden_states=rng.standard_normal((rows, 4, 8, 8)).astype(np.float32),
             timestep=np.linspace(50.0, 900.0, rows).astype(np.float32),
             encoder_hidden_states=(rng.standard_normal((rows, 7, 32)) * 0.2).astype(np.float32))
    return path


def compare(model: Path, out: Path, *args) -> dict:
    assert run_cli(["compare", str(model), *FAST, "--out", str(out), *map(str, args)]) == 0
    return json.loads((out / "results.json").read_text())


def rows(results: dict) -> dict[str, dict]:
    return {r["label"]: r for r in results["results"]}


@pytest.fixture(scope="module")
def default_compare(tiny_onnx, tmp_path_factory) -> dict:
    return compare(tiny_onnx, tmp_path_factory.mktemp("cmp") / "default", "--samples", "1")


def test_inputs_file_of_the_seeded_captions_gives_the_default_figures(tiny_onnx, tmp_path, default_compare):
    results = compare(tiny_onnx, tmp_path / "out", "--inputs", pairs_file(tiny_onnx, tmp_path / "seeded.npz", False))
    assert results["meta"]["inputs"] == "file:seeded.npz" and results["meta"]["samples"] == 1
    assert default_compare["meta"]["inputs"] == "seeded"
    assert results["results"] == default_compare["results"]  # same graphs, same inputs: the same numbers


def test_inputs_file_conditions_the_evaluation(tiny_onnx, tmp_path, default_compare):
    results = compare(tiny_onnx, tmp_path / "out", "--inputs", pairs_file(tiny_onnx, tmp_path / "other.npz", True))
    assert results["meta"]["inputs"] == "file:other.npz"
    got, default = rows(results), rows(default_compare)
    assert got.keys() == default.keys() == {"none", "hadanorm (float-token)"}
    for label in got:  # other captions, other numbers (measured: 7.25 -> 12.27 dB and 20.75 -> 21.89 dB)
        for key in ("single_call", "end_of_denoising"):
            assert got[label][key]["sqnr_db"] != default[label][key]["sqnr_db"], (label, key)


def test_calib_file_calibrates(tiny_onnx, tmp_path, default_compare):
    results = compare(tiny_onnx, tmp_path / "out", "--samples", "1", "--calib", calib_file(tmp_path / "calib.npz"))
    assert results["meta"]["calibration"] == {"file": "calib.npz"}
    assert "steps" in default_compare["meta"]["calibration"]
    got, default = rows(results), rows(default_compare)
    assert got["none"] == default["none"]  # needs no statistics: untouched
    hadanorm = "hadanorm (float-token)"
    assert got[hadanorm]["single_call"]["sqnr_db"] != default[hadanorm]["single_call"]["sqnr_db"]


# ---- bad files: one line, exit code 2, nothing written --------------------------------------------------------

def _garbage(path: Path) -> list[str]:
    path.write_bytes(b"not an npz\n" * 10)
    return ["--calib", str(path)]


def _nan_calib(path: Path) -> list[str]:
    calib_file(path)
    data = dict(np.load(path))
    data["encoder_hidden_states"][1, 2, 3] = np.nan
    np.savez(path, **data)
    return ["--calib", str(path)]


def _no_captions(path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    np.savez(path, hidden_states=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
             timestep=np.ones(2, np.float32))
    return ["--inputs", str(path)]


def _inputs(path: Path, **change) -> list[str]:
    calib_file(path, rows=change.pop("rows", 2))
    data = {**dict(np.load(path)), **change}
    np.savez(path, **data)
    return ["--inputs", str(path)]


BAD = {
    "calib not npz": (_garbage, "calibration input file", "is not a readable .npz", "numpy.savez("),
    "calib NaN": (_nan_calib, "input encoder_hidden_states contains NaN or inf", "pass finite inputs"),
    "inputs missing array": (_no_captions, "lacks arrays ['encoder_hidden_states']", "it must hold"),
    "inputs odd rows": (lambda p: _inputs(p, rows=3), "holds 3 rows", "pass an even, nonzero number of rows"),
    "inputs caption width": (lambda p: _inputs(p, encoder_hidden_states=np.zeros((2, 7, 16), np.float32)),
                             "has shape (2, 7, 16); the model takes [N, ?, 32]", "of this model's shapes"),
    "inputs row counts": (lambda p: _inputs(p, timestep=np.ones(4, np.float32)), "different sample counts",
                          "same first axis"),
    "inputs and samples": (lambda p: ["--samples", "1", *_inputs(p)], "--samples and --inputs both given",
                           "drop --samples"),
}


@pytest.mark.parametrize("command", ["compare", "sensitivity"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_files(hn_cli, tiny_onnx, tmp_path, command, kind):
    make, *expected = BAD[kind]
    args = make(tmp_path / "in.npz")
    out = tmp_path / "out"
    result = hn_cli(command, tiny_onnx, "--methods", "hadanorm", "--steps", "1", "--out", out, "--no-progress", *args)
    assert result.exit_code == 2, (result.exit_code, result.err, result.out[-500:])
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "; " in lines[0] and all(text in lines[0] for text in expected), lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


def test_compare_formats_record_what_ran(tiny_onnx, tmp_path):
    """--formats runs the same quantization as qdq and fused: results.json and table.md name the format and the
    implementation of every row, and the two formats agree (same integers; measured 0.00 dB apart on tiny) when the
    fused graph keeps the softmax attention (--attention none; its bf16 default is tests/test_attention.py's)."""
    out = tmp_path / "cmp"
    assert run_cli(["compare", str(tiny_onnx), *FAST, "--formats", "qdq,fused", "--attention", "none",
                    "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["method"], r["format"]) for r in rows] == [
        ("none", "qdq"), ("hadanorm", "qdq"), ("none", "fused"), ("hadanorm", "fused")]
    assert rows[0]["implementation"] == "qdq: as written"
    assert all(r["implementation"].startswith("fused: ") for r in rows[2:])
    for qdq, fused in zip(rows[:2], rows[2:]):
        assert abs(qdq["end_of_denoising"]["sqnr_db"] - fused["end_of_denoising"]["sqnr_db"]) < 0.5
    assert "| runs as |" in (out / "table.md").read_text()


def test_compare_low_ranks_and_weight_ranges_are_points(tiny_onnx, tmp_path):
    """--low-ranks and --weight-ranges multiply the grid: each point is labelled by its weight options (bits
    w4a4, w4a4-r8, w4a4-mse, w4a4-mse-r8) and records them in results.json; on this model the rank-8 branch lifts
    HadaNorm's single-call SQNR with min/max weights (measured 17.4 -> 23.8 dB; the bound keeps 1 dB; with MSE
    ranges 23.5 -> 20.4: not a rule on a 72-wide model with one sample)."""
    out = tmp_path / "cmp"
    assert run_cli(["compare", str(tiny_onnx), *FAST, "--methods", "hadanorm", "--weight-ranges", "minmax,mse",
                    "--low-ranks", "0,8", "--samples", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["bits"], r["weight_range"], r["low_rank"]) for r in rows] == [
        ("w4a4", "minmax", 0), ("w4a4-r8", "minmax", 8), ("w4a4-mse", "mse", 0), ("w4a4-mse-r8", "mse", 8)]
    assert rows[1]["single_call"]["sqnr_db"] >= rows[0]["single_call"]["sqnr_db"] + 1.0


@pytest.mark.parametrize("value,message", [("x", "--low-ranks item 'x' is not a whole number >= 0"),
                                           (",", "--low-ranks ',' names no rank")])
def test_compare_bad_low_ranks(hn_cli, tiny_onnx, tmp_path, value, message):
    result = hn_cli("compare", tiny_onnx, *FAST, "--low-ranks", value, "--out", tmp_path / "cmp")
    assert result.exit_code == 2 and message in result.err and "Traceback" not in result.err
    assert not (tmp_path / "cmp").exists()

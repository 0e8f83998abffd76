"""`hn-export diff`: figures, --json, --min-sqnr exit codes, --per-layer, FP16 reference."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def pair(tiny_onnx, tmp_path_factory):
    from hn_export.cli import main

    folder = tmp_path_factory.mktemp("diff")
    fp16, w4 = folder / "tiny.fp16.onnx", folder / "tiny.w4a4.onnx"
    for args in (["export", "--preset", "tiny", "--seed", "0", "--fp16", "-o", str(fp16)],
                 [str(tiny_onnx), "-o", str(w4), "--calib-samples", "1", "--calib-steps", "2", "--no-progress"]):
        try:
            main(args)
        except SystemExit as exc:
            assert exc.code == 0
    return w4, fp16


def test_diff_against_fp16_with_json_and_per_layer(hn_cli, pair, tmp_path):
    w4, fp16 = pair
    out = tmp_path / "d.json"
    result = hn_cli("diff", w4, fp16, "--steps", "3", "--per-layer", "--json", out)
    assert result.exit_code == 0, result.err
    data = json.loads(out.read_text())
    single, end = data["outputs"]["single_call"], data["outputs"]["end_of_denoising"]
    assert 3.0 < single["sqnr_db"] < 60.0 and 0.9 < single["cosine"] < 1.0
    assert end["sqnr_db"] is not None and end["rel_l2"] > 0
    assert len(data["per_layer"]) == 14
    assert {row["role"] for row in data["per_layer"]} >= {"self-attn in", "ffn out", "text in"}
    assert "latents after 3 steps" in result.out


def test_fp32_vs_fp16_is_close(hn_cli, tiny_onnx, pair, tmp_path):
    out = tmp_path / "d.json"
    assert hn_cli("diff", tiny_onnx, pair[1], "--steps", "2", "--json", out).exit_code == 0
    assert json.loads(out.read_text())["outputs"]["single_call"]["sqnr_db"] > 40.0


def test_min_sqnr_exit_codes(hn_cli, pair):
    w4, fp16 = pair
    assert hn_cli("diff", w4, fp16, "--steps", "0", "--min-sqnr", "1").exit_code == 0
    result = hn_cli("diff", w4, fp16, "--steps", "0", "--min-sqnr", "200")
    assert result.exit_code == 1
    assert "below --min-sqnr 200" in result.err


def test_identical_graphs(hn_cli, tiny_onnx, tmp_path):
    out = tmp_path / "same.json"
    assert hn_cli("diff", tiny_onnx, tiny_onnx, "--steps", "2", "--json", out, "--min-sqnr", "100").exit_code == 0
    data = json.loads(out.read_text())
    assert data["outputs"]["single_call"]["sqnr_db"] is None  # infinite: no error at all
    assert data["outputs"]["single_call"]["max_abs"] == 0.0


def test_diff_bad_inputs_file(hn_cli, tiny_onnx, tmp_path):
    import numpy as np

    bad = tmp_path / "in.npz"
    np.savez(bad, hidden_states=np.zeros((1, 4, 8, 8), np.float32))
    result = hn_cli("diff", tiny_onnx, tiny_onnx, "--inputs", bad)
    assert result.exit_code == 2 and "lacks arrays" in result.err and len(result.err.strip().splitlines()) == 1

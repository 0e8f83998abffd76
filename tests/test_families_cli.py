"""The family registry from the command line: listing, unknown families, and graphs of no known family."""

from __future__ import annotations

import json
import logging

import numpy as np

from models.families import FAMILIES
from tests.graphs import mlp_model, serialize


def one_error_line(result) -> str:
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.err
    assert len(lines) == 1, result.err
    return lines[0]


def test_families_lists_every_registered_family(hn_cli):
    result = hn_cli("families", "--json")
    assert result.exit_code == 0, result.err
    listed = json.loads(result.out)
    assert [f["name"] for f in listed] == list(FAMILIES)
    for fam in listed:
        assert fam["presets"] and fam["roles"] and fam["class"] and fam["demo_preset"] in fam["presets"]


def test_every_family_site_width_has_a_hadamard_construction():
    """The widths a family's sites have at the real architecture (`hadamard_widths`) must all be rotatable."""
    from graph_passes.hadamard import is_constructible

    for fam in FAMILIES.values():
        assert fam.hadamard_widths, fam.name
        assert [w for w in fam.hadamard_widths if not is_constructible(w)] == [], fam.name
    assert not is_constructible(92)  # the check can fail: 92 = 4 x 23 has no construction here


def test_demo_unknown_family(hn_cli, tmp_path):
    line = one_error_line(hn_cli("demo", "--family", "unet9000", "--out", tmp_path / "demo"))
    assert line.startswith("error: unknown model family 'unet9000'; use one of: pixart-sigma, pixart-alpha, flux")
    assert "models/families/" in line
    assert not (tmp_path / "demo").exists()


def test_config_of_unknown_class(hn_cli, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_class_name": "WanTransformer3DModel", "num_layers": 2}))
    line = one_error_line(hn_cli("export", "--config", config, "-o", tmp_path / "m.onnx"))
    assert "is a WanTransformer3DModel, which no supported family describes; supported: PixArtTransformer2DModel " \
           "(pixart-sigma, pixart-alpha)" in line
    assert not (tmp_path / "m.onnx").exists()


def test_graph_of_no_family_gets_generic_roles_and_a_warning(hn_cli, tmp_path, caplog):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(serialize(mlp_model(72, 144)))
    with caplog.at_level(logging.WARNING):
        layers = hn_cli("layers", path, "--include", "", "--json")
    assert layers.exit_code == 0, layers.err
    listed = json.loads(layers.out)
    assert listed["family"] is None
    assert {s["role"] for s in listed["sites"]} == {"linear"}
    assert len(listed["sites"]) == 2  # x (read by up and side) and the GELU output
    assert any("generic role 'linear'" in r.message for r in caplog.records)
    # quantizing works without calibration (QuaRot needs no statistics) ...
    out = tmp_path / "mlp.w4a4.onnx"
    result = hn_cli(path, "--method", "quarot", "--include", "", "-o", out, "--no-progress")
    assert result.exit_code == 0, result.err
    assert out.exists()
    # ... and a method that needs statistics says how to give them (no denoising loop for an unknown model)
    line = one_error_line(hn_cli(path, "--method", "hadanorm", "--include", "", "-o", tmp_path / "h.onnx"))
    assert "match no supported model family" in line and "--calib FILE.npz" in line
    assert not (tmp_path / "h.onnx").exists()
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4, 16, 72)).astype(np.float32))
    result = hn_cli(path, "--method", "hadanorm", "--include", "", "--calib", calib, "-o", tmp_path / "h.onnx",
                    "--no-progress")
    assert result.exit_code == 0, result.err


def test_with_mask_on_a_family_without_mask(hn_cli, tmp_path):
    line = one_error_line(hn_cli("export", "--preset", "dit-tiny", "--with-mask", "-o", tmp_path / "m.onnx"))
    assert line == ("error: --with-mask: the dit family's export has no encoder_attention_mask input; "
                    "leave out --with-mask")
    assert not list(tmp_path.iterdir())

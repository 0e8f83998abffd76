"""Determinism of every report, inputs never modified, and an interrupted write leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_compare_twice_gives_identical_reports(hn_cli, tiny_onnx, tmp_path):
    before = digest(tiny_onnx)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = hn_cli("compare", tiny_onnx, "--methods", "none,hadanorm", "--bits", "w4a4", "--steps", "2",
                        "--samples", "1", "--calib-samples", "1", "--calib-steps", "2", "--out", out, "--no-progress")
        assert result.exit_code == 0, result.err
    for name in ("table.md", "results.json", "sqnr.png"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert digest(tiny_onnx) == before


def test_diff_json_twice_identical(hn_cli, tiny_onnx, tmp_path):
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        assert hn_cli("diff", tiny_onnx, tiny_onnx, "--steps", "1", "--json", out).exit_code == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_sensitivity_twice_identical(hn_cli, tiny_onnx, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = hn_cli("sensitivity", tiny_onnx, "--methods", "quarot", "--steps", "1", "--out", out, "--no-progress")
        assert result.exit_code == 0, result.err
    for name in ("sensitivity.json", "sensitivity.png"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


@pytest.mark.slow
def test_sigint_during_model_write_leaves_nothing(tmp_path):
    """SIGINT while the model file is being written: exit code 2, one line, no .onnx/.onnx.data, no temp folder."""
    out = tmp_path / "big.onnx"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from hn_export.cli import main; main()", "export", "--preset", "pixart-sigma-256",
         "--layers", "3", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A test run started in the background of a non-interactive shell inherits SIGINT ignored, and Python keeps
        # an ignored SIGINT ignored: give the child the default disposition so that it turns SIGINT into
        # KeyboardInterrupt as it would in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    # The atomic writer creates a .hn-export-* folder beside the target; interrupt once it exists.
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(".hn-export-") for p in tmp_path.iterdir()):
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: interrupted"), err[-2000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []

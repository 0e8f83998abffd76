"""`hn-export export` with bad input: exit code 2, one `error:` line on stderr naming the problem, no traceback, and
no .onnx / .onnx.data left behind.

Tests run as root, so a chmod 0o500 folder is still writable: the unwritable-output cases use a path under a folder
that does not exist and a path under a regular file instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.build import ModelSource, build_transformer
from tests.cli_runner import run_cli


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*")
            if p.name.endswith((".onnx", ".onnx.data")) or p.name.startswith(".hn-export-")]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_transformer(ModelSource(preset="tiny", seed=1)).save_pretrained(folder)
    return folder


def _bad_cases(tmp: Path, ckpt: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments without -o, text the error line must contain)."""
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('{"_class_name": "PixArtTransformer2DModel", "num_layers": ')
    not_pixart = tmp / "unet"
    not_pixart.mkdir()
    (not_pixart / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}))
    (not_pixart / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    no_config = tmp / "empty"
    no_config.mkdir()
    truncated = tmp / "truncated"
    truncated.mkdir()
    shutil.copy(ckpt / "config.json", truncated / "config.json")
    weights = (ckpt / "diffusion_pytorch_model.safetensors").read_bytes()
    (truncated / "diffusion_pytorch_model.safetensors").write_bytes(weights[: len(weights) // 2])
    return {
        "unknown preset": (["--preset", "pixart-sigma-4096"], "unknown preset 'pixart-sigma-4096'; use one of: "),
        "missing checkpoint": (["--checkpoint", str(tmp / "nope")], "does not exist"),
        "corrupt config": (["--checkpoint", str(corrupt)], "is not valid JSON"),
        "corrupt config via --config": (["--config", str(corrupt / "config.json")], "is not valid JSON"),
        "not pixart": (["--checkpoint", str(not_pixart)], "is a UNet2DConditionModel, which no supported family describes"),
        "no config.json": (["--checkpoint", str(no_config)], "has no config.json"),
        "truncated weights": (["--checkpoint", str(truncated)], "cannot load the checkpoint"),
        "layers 0": (["--preset", "tiny", "--layers", "0"], "--layers must be at least 1, got 0"),
        "layers beyond checkpoint": (["--checkpoint", str(ckpt), "--layers", "3"], "more than the 2 blocks"),
        "bad sample size": (["--preset", "tiny", "--sample-size", "7"], "unsupported sample size 7"),
        "no source": ([], "give exactly one model source"),
        "two sources": (["--preset", "tiny", "--checkpoint", str(ckpt)], "--preset and --checkpoint"),
        "bad init": (["--preset", "tiny", "--init", "zeros"], "'zeros' is not one of"),
    }


CASE_NAMES = [
    "unknown preset", "missing checkpoint", "corrupt config", "corrupt config via --config", "not pixart",
    "no config.json", "truncated weights", "layers 0", "layers beyond checkpoint", "bad sample size", "no source",
    "two sources", "bad init",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_one_line_exit_2(case, tmp_path, tiny_checkpoint, capsys):
    args, expected = _bad_cases(tmp_path, tiny_checkpoint)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = run_cli(["export", *args, "-o", str(out_dir / "model.onnx")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert "Traceback" not in err
    assert leftovers(out_dir) == []


@pytest.mark.parametrize("where", ["missing folder", "under a file"])
def test_unwritable_output(where, tmp_path, capsys):
    if where == "missing folder":
        output, expected = tmp_path / "no" / "such" / "model.onnx", "does not exist"
    else:
        blocker = tmp_path / "file.txt"
        blocker.write_text("x")
        output, expected = blocker / "model.onnx", "is a file, not a folder"
    code = run_cli(["export", "--preset", "tiny", "-o", str(output)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: output ") and expected in lines[0], err
    assert leftovers(tmp_path) == []


def test_console_script_bad_input_no_traceback(tmp_path):
    """One real process: the installed `hn-export` script (or the same entry point through python -c)."""
    exe = shutil.which("hn-export")
    cmd = [exe] if exe else [sys.executable, "-c", "from hn_export.cli import main; main()"]
    proc = subprocess.run([*cmd, "export", "--preset", "nope", "-o", str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown preset 'nope'; use one of: pixart-sigma-1024, pixart-sigma-512, "
                               "pixart-sigma-256, tiny, pixart-alpha-1024"), proc.stderr
    assert proc.stdout == ""
    assert leftovers(tmp_path) == []

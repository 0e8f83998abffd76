"""Every command x every kind of bad model file: one line naming the problem, exit code 2, no traceback, nothing
written, the input untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import pytest


def _truncated(tiny: Path, path: Path) -> None:
    data = tiny.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _with_versions(tiny: Path, path: Path, opset: int | None = None, ir_version: int | None = None) -> None:
    model = onnx.load(tiny)
    if opset is not None:
        model.opset_import[0].version = opset
    if ir_version is not None:
        model.ir_version = ir_version
    path.write_bytes(model.SerializeToString())


BAD_FILES = {
    "missing": (lambda tiny, p: None, "does not exist"),
    "empty": (lambda tiny, p: p.write_bytes(b""), "is empty"),
    "truncated": (_truncated, "not a readable ONNX model"),
    "text": (lambda tiny, p: p.write_text("hello, I am not a model\n" * 20), "not a readable ONNX model"),
    "folder": (lambda tiny, p: p.mkdir(), "is a folder"),
    "opset 17": (lambda tiny, p: _with_versions(tiny, p, opset=17), "opset 17"),
    "opset 23": (lambda tiny, p: _with_versions(tiny, p, opset=23), "opset 23"),
    "IR 11": (lambda tiny, p: _with_versions(tiny, p, ir_version=11), "IR version 11"),
}

COMMANDS = {
    "quantize": lambda bad, good, out: [bad, "--w4a4", "-o", out / "q.onnx"],
    "transform-only": lambda bad, good, out: [bad, "--transform-only", "-o", out / "t.onnx"],
    "layers": lambda bad, good, out: ["layers", bad],
    "diff candidate": lambda bad, good, out: ["diff", bad, good, "--json", out / "d.json"],
    "diff reference": lambda bad, good, out: ["diff", good, bad, "--json", out / "d.json"],
    "compare": lambda bad, good, out: ["compare", bad, "--steps", "1", "--samples", "1", "--out", out / "cmp"],
    "sensitivity": lambda bad, good, out: ["sensitivity", bad, "--steps", "1", "--out", out / "sens"],
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_model_file(hn_cli, tiny_onnx, tmp_path, command, kind):
    make, expected = BAD_FILES[kind]
    bad = tmp_path / "bad.onnx"
    make(tiny_onnx, bad)
    out = tmp_path / "out"
    out.mkdir()
    before = digest(tiny_onnx)
    result = hn_cli(*COMMANDS[command](bad, tiny_onnx, out))
    assert result.exit_code == 2, (result.exit_code, result.err, result.out[-500:])
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.err + result.out
    assert list(out.iterdir()) == []
    assert digest(tiny_onnx) == before

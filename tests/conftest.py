"""Shared fixtures: a tiny PixArt-Sigma exported once per test session, and a CLI runner."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hn_export.cli import main


@dataclasses.dataclass
class CliResult:
    exit_code: int
    out: str
    err: str


@pytest.fixture
def hn_cli(capsys):
    """Run `hn-export ARGS` in process; returns exit code, stdout and stderr."""

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """The `tiny` preset (2 blocks, 72 wide, dit-stats init, seed 0) exported to ONNX (FP32)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    try:
        main(["export", "--preset", "tiny", "--seed", "0", "-o", str(path)])
    except SystemExit as exc:
        assert exc.code == 0, f"tiny export failed with exit code {exc.code}"
    return path


@pytest.fixture(scope="session")
def kernel_library() -> Path:
    """The hadanorm kernel library, built once (or reused); the test is skipped with the one-line reason when it
    cannot be built here (no C++ compiler, no apt-get or dpkg, no Debian apt source, no network to Debian's
    archive). CI on the project's machine builds it."""
    from runtime.kernels.build import BuildError, build

    try:
        return build()
    except BuildError as exc:
        pytest.skip(f"hadanorm kernel library cannot be built: {' '.join(str(exc).split())[:300]}")

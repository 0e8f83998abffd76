"""Shared fixtures: a tiny PixArt-Sigma exported once per test session, and a CLI runner.

The suite runs on pytest-xdist's workers (`pyproject.toml`: ``-n 2``, one process a core, whole files to one
worker). What the session fixtures build (exports, pipeline folders, bundles) is built once per run, not once per
worker: in a folder both workers share (`shared_root`), by whichever worker asks first, while the other waits on the
artifact's lock (`built_once`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from hn_export.cli import main
from runtime.bundle_manifest import MANIFEST_NAME
from runtime.file_lock import exclusive
from tests.cli_runner import run_cli


@dataclasses.dataclass
class CliResult:
    exit_code: int
    out: str
    err: str


def run_main(entry, capsys, args) -> CliResult:
    """Run a click entry point (`hn-export`'s or `hn-run`'s main) in process with `args`."""
    capsys.readouterr()
    try:
        entry([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


@pytest.fixture
def hn_cli(capsys):
    """Run `hn-export ARGS` in process; returns exit code, stdout and stderr."""

    def run(*args: str | Path) -> CliResult:
        return run_main(main, capsys, args)

    return run


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    """The folder of what the session fixtures build: the run's base temp folder, or under pytest-xdist the folder
    above the workers' own (``pytest-N/popen-gwK``: ``pytest-N`` is this run's, shared by its workers)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "session-built"
    root.mkdir(exist_ok=True)
    return root


def built_once(shared: Path, name: str, build: Callable[[Path], None], done: Callable[[Path], bool] = Path.exists
               ) -> Path:
    """``shared / name`` (`shared_root`; name may hold a folder), built by ``build(path)`` unless ``done(path)``, under
    the artifact's lock (in ``shared/.locks``, never beside it): a worker asking while another builds it waits and
    reuses it."""
    path = shared / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(shared / ".locks" / (name.replace("/", "--") + ".lock")):
        if not done(path):
            build(path)
    return path


def _export(preset: str, path: Path) -> None:
    try:
        main(["export", "--preset", preset, "--seed", "0", "-o", str(path)])
    except SystemExit as exc:
        assert exc.code == 0, f"{preset} export failed with exit code {exc.code}"


@pytest.fixture(scope="session")
def tiny_onnx(shared_root) -> Path:
    """The `tiny` preset (2 blocks, 72 wide, dit-stats init, seed 0) exported to ONNX (FP32)."""
    return built_once(shared_root, "tiny.onnx", lambda path: _export("tiny", path))


@pytest.fixture(scope="session")
def preset_onnx(shared_root, tiny_onnx):
    """`preset_onnx(P)`: `hn-export export --preset P --seed 0` (FP32), exported once per session and shared by the
    tests that read it (never written to; `tiny` is tiny_onnx's file)."""

    def get(preset: str) -> Path:
        if preset == "tiny":
            return tiny_onnx
        return built_once(shared_root, f"{preset}.onnx", lambda path: _export(preset, path))

    return get


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


# The tiny PixArt-Sigma pipeline folder and its bundles (tests/test_bundle.py, test_runtime_pipeline.py,
# test_runtime_no_torch.py), built once per session.
PROMPT = "A photo of a red cat on a hill"
BUNDLE_QUANT_OPTIONS = ["--calib-samples", "1", "--calib-steps", "8"]
BUNDLES = "bundles"  # their folder in shared_root


def _has_model_index(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _build(shared: Path, name: str, args: list[str]) -> Path:
    """Build bundle `name` into shared_root's bundle folder unless it is there (the session fixtures below call this
    once each)."""

    def build(out: Path) -> None:
        assert run_cli(["bundle", *args, "-o", str(out), "--no-progress"]) == 0

    return built_once(shared, f"{BUNDLES}/{name}", build, lambda out: (out / MANIFEST_NAME).is_file())


@pytest.fixture(scope="session")
def tiny_pipeline(shared_root) -> Path:
    """The `tiny` pipeline preset written as a diffusers folder (tokenizer/spiece.model only, as released)."""

    def build(folder: Path) -> None:
        from models.pipelines import write_pipeline_folder

        write_pipeline_folder("tiny", folder, seed=0)

    return built_once(shared_root, f"{BUNDLES}/pipeline", build, _has_model_index)


FP_BUNDLE_SIZES = [(64, 64), (128, 128), (96, 64)]  # (width, height): own size, 2x, and a non-square one


@pytest.fixture(scope="session")
def fp_bundle(tiny_pipeline, shared_root) -> Path:
    """--no-quantize from the folder, at the transformer's own size (64 px), at 128 px and at 96x64 (width x height:
    a non-square latent, 12 wide and 8 high)."""
    sizes = ",".join(f"{w}x{h}" for w, h in FP_BUNDLE_SIZES)
    return _build(shared_root, "fp", ["--checkpoint", str(tiny_pipeline), "--no-quantize", "--sizes", sizes])


@pytest.fixture(scope="session")
def q_bundle(shared_root) -> Path:
    """The same pipeline from --preset tiny: W4A4 hadanorm `fused` transformer, int8 text encoder."""
    return _build(shared_root, "w4a4", ["--preset", "tiny", *BUNDLE_QUANT_OPTIONS])


# The tiny Stable Diffusion 3 pipeline folder (models.pipelines_sd3) and its bundles (tests/test_bundle_sd3.py,
# test_runtime_no_torch.py).
@pytest.fixture(scope="session")
def sd3_pipeline(shared_root) -> Path:
    """The `sd3-tiny` pipeline preset as a diffusers StableDiffusion3Pipeline folder (two CLIP encoders, T5)."""

    def build(folder: Path) -> None:
        from models.pipeline_presets import write_preset_folder

        write_preset_folder("sd3-tiny", folder, seed=0)

    return built_once(shared_root, f"{BUNDLES}/sd3-pipeline", build, _has_model_index)


@pytest.fixture(scope="session")
def sd3_fp_bundle(sd3_pipeline, shared_root) -> Path:
    """--no-quantize from the SD3 folder (64 px, its own size)."""
    return _build(shared_root, "sd3-fp", ["--checkpoint", str(sd3_pipeline), "--no-quantize"])


@pytest.fixture(scope="session")
def sd3_q_bundle(shared_root) -> Path:
    """From --preset sd3-tiny: W4A4 hadanorm `fused` transformer, int8 text encoders."""
    return _build(shared_root, "sd3-w4a4", ["--preset", "sd3-tiny", *BUNDLE_QUANT_OPTIONS])

"""Shared fixtures: a tiny PixArt-Sigma exported once per test session, and a CLI runner."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hn_export.cli import main
from runtime.bundle_manifest import MANIFEST_NAME
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
def tiny_onnx(tmp_path_factory) -> Path:
    """The `tiny` preset (2 blocks, 72 wide, dit-stats init, seed 0) exported to ONNX (FP32)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    try:
        main(["export", "--preset", "tiny", "--seed", "0", "-o", str(path)])
    except SystemExit as exc:
        assert exc.code == 0, f"tiny export failed with exit code {exc.code}"
    return path


@pytest.fixture(scope="session")
def preset_onnx(tmp_path_factory, tiny_onnx):
    """`preset_onnx(P)`: `hn-export export --preset P --seed 0` (FP32), exported once per session and shared by the
    tests that read it (never written to; `tiny` is tiny_onnx's file)."""
    root = tmp_path_factory.mktemp("preset-exports")
    made: dict[str, Path] = {"tiny": tiny_onnx}

    def get(preset: str) -> Path:
        if preset not in made:
            path = root / f"{preset}.onnx"
            try:
                main(["export", "--preset", preset, "--seed", "0", "-o", str(path)])
            except SystemExit as exc:
                assert exc.code == 0, f"{preset} export failed with exit code {exc.code}"
            made[preset] = path
        return made[preset]

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


def _build(root: Path, name: str, args: list[str]) -> Path:
    """Build a bundle into `root` unless it is there (the session fixtures below call this once each)."""
    out = root / name
    if not (out / MANIFEST_NAME).is_file():
        assert run_cli(["bundle", *args, "-o", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "bundles"
    root.mkdir(parents=True, exist_ok=True)  # q_bundle alone (-m slow) builds no pipeline folder first
    return root


@pytest.fixture(scope="session")
def tiny_pipeline(bundle_root) -> Path:
    """The `tiny` pipeline preset written as a diffusers folder (tokenizer/spiece.model only, as released)."""
    folder = bundle_root / "pipeline"
    if not (folder / "model_index.json").is_file():
        from models.pipelines import write_pipeline_folder

        bundle_root.mkdir(parents=True, exist_ok=True)
        write_pipeline_folder("tiny", folder, seed=0)
    return folder


FP_BUNDLE_SIZES = [(64, 64), (128, 128), (96, 64)]  # (width, height): own size, 2x, and a non-square one


@pytest.fixture(scope="session")
def fp_bundle(tiny_pipeline, bundle_root) -> Path:
    """--no-quantize from the folder, at the transformer's own size (64 px), at 128 px and at 96x64 (width x height:
    a non-square latent, 12 wide and 8 high)."""
    sizes = ",".join(f"{w}x{h}" for w, h in FP_BUNDLE_SIZES)
    return _build(bundle_root, "fp", ["--checkpoint", str(tiny_pipeline), "--no-quantize", "--sizes", sizes])


@pytest.fixture(scope="session")
def q_bundle(bundle_root) -> Path:
    """The same pipeline from --preset tiny: W4A4 hadanorm `fused` transformer, int8 text encoder."""
    return _build(bundle_root, "w4a4", ["--preset", "tiny", *BUNDLE_QUANT_OPTIONS])


# The tiny Stable Diffusion 3 pipeline folder (models.pipelines_sd3) and its bundles (tests/test_bundle_sd3.py,
# test_runtime_no_torch.py).
@pytest.fixture(scope="session")
def sd3_pipeline(bundle_root) -> Path:
    """The `sd3-tiny` pipeline preset as a diffusers StableDiffusion3Pipeline folder (two CLIP encoders, T5)."""
    folder = bundle_root / "sd3-pipeline"
    if not (folder / "model_index.json").is_file():
        from models.pipeline_presets import write_preset_folder

        write_preset_folder("sd3-tiny", folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def sd3_fp_bundle(sd3_pipeline, bundle_root) -> Path:
    """--no-quantize from the SD3 folder (64 px, its own size)."""
    return _build(bundle_root, "sd3-fp", ["--checkpoint", str(sd3_pipeline), "--no-quantize"])


@pytest.fixture(scope="session")
def sd3_q_bundle(bundle_root) -> Path:
    """From --preset sd3-tiny: W4A4 hadanorm `fused` transformer, int8 text encoders."""
    return _build(bundle_root, "sd3-w4a4", ["--preset", "sd3-tiny", *BUNDLE_QUANT_OPTIONS])

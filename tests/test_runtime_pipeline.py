"""`runtime.pipeline.TextToImage` and `hn-run` on the float tiny bundle of tests/test_bundle.py: the PNG and its
metadata, the step callback, and bad input (missing or tampered file, size not in the bundle, over-long prompt,
bad output path): one line, exit 2, nothing written (the over-long prompt: a warning, as diffusers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import RuntimeInputError
from tests.conftest import PROMPT, run_main


def hn_run(capsys, *args) -> tuple[int, str, str]:
    from runtime.cli_run import main

    result = run_main(main, capsys, args)
    return result.exit_code, result.out, result.err


@pytest.fixture
def bundle_copy(fp_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(fp_bundle, copy)
    return copy


def _error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_hn_run_writes_png_with_settings(fp_bundle, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, stdout, err = hn_run(capsys, fp_bundle, PROMPT, "--negative", "blurry", "--steps", "4", "--guidance", "3",
                               "--seed", "5", "--size", "64x64", "-o", out, "--no-progress", "--verbose")
    assert code == 0, err
    assert f"wrote {out} (64x64, 4 steps, guidance 3.0, seed 5)" in stdout
    for stage in ("text encoder", "denoise", "vae decoder"):
        assert f"{stage}: " in err and "peak RSS" in err
    from PIL import Image

    from runtime.pipeline import TextToImage

    with Image.open(out) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
        text = dict(image.text)
        pixels = np.asarray(image)
    assert text["prompt"] == PROMPT and text["negative_prompt"] == "blurry"
    assert (text["steps"], text["guidance_scale"], text["seed"], text["size"]) == ("4", "3.0", "5", "64x64")
    assert text["scheduler"] == "DPMSolverMultistepScheduler" and "Steps: 4, CFG scale: 3.0" in text["parameters"]
    again = TextToImage(fp_bundle, progress=False)(PROMPT, "blurry", steps=4, guidance_scale=3.0, seed=5)
    assert np.array_equal(again.array, pixels)  # the PNG holds exactly the pipeline's image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]  # no temporary file left


def test_callback_stops_the_run(fp_bundle):
    from runtime.pipeline import TextToImage

    seen = []

    def stop_after_two(info):
        seen.append((info.index, info.total, int(info.timestep), info.latents.shape))
        return info.index == 1

    result = TextToImage(fp_bundle, progress=False)(PROMPT, steps=5, seed=0, callback=stop_after_two)
    assert result.stopped and result.image is None and result.array is None
    assert [s[0] for s in seen] == [0, 1] and seen[0][1] == 5 and seen[0][3] == (1, 4, 8, 8)
    assert seen[0][2] == 999  # DPM-Solver++ linspace spacing starts at the last training timestep


def test_missing_file(bundle_copy, tmp_path, capsys):
    (bundle_copy / "vae_decoder.onnx").unlink()
    out = tmp_path / "img.png"
    code, _, err = hn_run(capsys, bundle_copy, PROMPT, "-o", out)
    assert code == 2 and "vae_decoder file vae_decoder.onnx is missing" in _error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("change", ["flip", "truncate"])
def test_tampered_file(bundle_copy, tmp_path, capsys, change):
    path = bundle_copy / "text_encoder.onnx"
    data = bytearray(path.read_bytes())
    if change == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:-10]
    path.write_bytes(bytes(data))
    out = tmp_path / "img.png"
    code, _, err = hn_run(capsys, bundle_copy, PROMPT, "-o", out)
    expected = "does not match its sha256 in bundle.json" if change == "flip" else \
        f"text_encoder.onnx has {len(data)} bytes, bundle.json says {len(data) + 10}"
    assert code == 2 and expected in _error_line(err)
    assert not out.exists()


def test_bad_bundle_folders(tmp_path, bundle_copy, capsys):
    out = tmp_path / "img.png"
    cases = [(tmp_path / "nope", "bundle folder {} does not exist"),
             (tmp_path, "has no bundle.json"),
             (bundle_copy / "tokenizer.json", "is not a folder")]
    (bundle_copy / "bundle.json").write_text("{not json")
    cases.append((bundle_copy, "bundle.json is not valid JSON"))
    for folder, message in cases:
        code, _, err = hn_run(capsys, folder, PROMPT, "-o", out)
        assert code == 2 and message.format(folder) in _error_line(err), (folder, err)
    assert not out.exists()


def test_size_not_in_bundle(fp_bundle, tmp_path, capsys):
    out = tmp_path / "img.png"
    code, _, err = hn_run(capsys, fp_bundle, PROMPT, "--size", "96x96", "-o", out)
    assert code == 2
    assert "size 96x96 is not in the bundle" in _error_line(err) and "(it has 64x64, 128x128)" in err
    code, _, err = hn_run(capsys, fp_bundle, PROMPT, "--size", "big", "-o", out)
    assert code == 2 and "--size 'big' is not WIDTHxHEIGHT" in _error_line(err)
    assert not out.exists()


def test_bad_output_path(fp_bundle, tmp_path, capsys):
    folder = tmp_path / "dir.png"
    folder.mkdir()
    for out, message in ((folder, "exists and is not a regular file"), (tmp_path / "img.jpg", "is not a .png"),
                         (tmp_path / "no" / "img.png", "does not exist"),
                         (fp_bundle / "img.png", "is inside the bundle folder")):
        code, _, err = hn_run(capsys, fp_bundle, PROMPT, "-o", out)
        assert code == 2 and message in _error_line(err), (out, err)
    assert not (fp_bundle / "img.png").exists() and not list(folder.iterdir())


def test_over_long_prompt_truncated_with_warning(fp_bundle, tiny_pipeline, tmp_path, capsys):
    """As diffusers: the first 299 tokens and </s>, and a warning naming the cut text (diffusers' own text)."""
    from transformers import AutoTokenizer

    from runtime.pipeline import TextToImage

    long_prompt = " ".join(["a watercolor of a misty lighthouse by the sea"] * 40)
    out = tmp_path / "long.png"
    code, _, err = hn_run(capsys, fp_bundle, long_prompt, "-o", out, "--steps", "2", "--no-progress")
    assert code == 0 and out.exists()
    warning = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warning) == 1 and "truncated because T5 can only handle sequences up to 300 tokens" in warning[0]
    reference = AutoTokenizer.from_pretrained(tiny_pipeline / "tokenizer", local_files_only=True)
    text = long_prompt.lower().strip()
    kept = reference(text, padding="max_length", max_length=300, truncation=True).input_ids
    full = reference(text).input_ids
    ids, removed = TextToImage(fp_bundle, progress=False).tokenize(long_prompt)
    assert ids.tolist() == kept and len(ids) == 300 and ids[-1] == 1
    assert removed == reference.batch_decode([full[299:-1]])[0] and warning[0].endswith(removed)


def test_bad_call_arguments(fp_bundle):
    from runtime.pipeline import TextToImage

    pipe = TextToImage(fp_bundle, progress=False, verify=False)
    with pytest.raises(RuntimeInputError, match=r"latents have shape \[1, 4, 4, 4\]; 64x64 takes \[1, 4, 8, 8\]"):
        pipe(PROMPT, latents=np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(RuntimeInputError, match="steps 0 must be at least 1"):
        pipe(PROMPT, steps=0)

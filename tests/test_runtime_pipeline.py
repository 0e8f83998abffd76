"""`runtime.pipeline.TextToImage` and `hn-run` on the float tiny bundle of tests/test_bundle.py: the PNG and its
metadata, the step callback, resolution binning against diffusers, and bad input (missing or tampered file, size not
in the bundle without resolution binning, sizes that are not positive WxH, over-long prompt, bad output path): one
line, exit 2, nothing written (the over-long prompt: a warning, as diffusers)."""

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


def test_denoiser_arena_shrinks_from_about_a_megapixel(fp_bundle, monkeypatch):
    """From about 1 M pixels (the 1024 px class) the pipeline's denoiser returns onnxruntime's arena after every call
    (a kept arena grows on the second call: PixArt-Sigma's 28 blocks at 1024 px 1068 -> 1620 MB peak); smaller sizes
    keep it; TextToImage(shrink_arena=...) overrides; the image is the same bits either way."""
    from runtime import denoiser, pipeline

    sizes = ((1024, 1024), (896, 1152), (2048, 2048), (768, 768), (512, 512), (64, 64))
    assert [pipeline.shrinks_arena(w, h) for w, h in sizes] == [True, True, True, False, False, False]
    seen = []
    real = denoiser.Denoiser

    def spy(*args, **kwargs):
        seen.append(kwargs["shrink_arena"])
        return real(*args, **kwargs)

    monkeypatch.setattr(denoiser, "Denoiser", spy)  # TextToImage imports it when it runs
    pipe = pipeline.TextToImage(fp_bundle, progress=False, verify=False)
    default = pipe(PROMPT, steps=1, seed=0)  # 64 x 64
    monkeypatch.setattr(pipeline, "SHRINK_ARENA_MIN_PIXELS", 64 * 64)
    by_size = pipe(PROMPT, steps=1, seed=0)
    pipe.shrink_arena = False
    forced = pipe(PROMPT, steps=1, seed=0)
    assert seen == [False, True, False]
    assert np.array_equal(by_size.array, default.array) and np.array_equal(forced.array, default.array)


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
    """Without resolution binning a size the bundle lacks is today's one-line error; sizes that are not positive
    WxH are errors either way."""
    out = tmp_path / "img.png"
    code, _, err = hn_run(capsys, fp_bundle, PROMPT, "--size", "96x96", "--no-resolution-binning", "-o", out)
    assert code == 2
    assert "size 96x96 is not in the bundle" in _error_line(err) and "(it has 64x64, 128x128, 96x64)" in err
    for size, message in (("big", "--size 'big' is not WIDTHxHEIGHT"), ("0x64", "--size '0x64' is not a positive"),
                          ("64x0", "--size '64x0' is not a positive"), ("64x-8", "--size '64x-8' is not a positive"),
                          ("20000x64", "image width 20000 is not a whole number of pixels from 1 to 16384")):
        code, _, err = hn_run(capsys, fp_bundle, PROMPT, "--size", size, "-o", out)
        assert code == 2 and message in _error_line(err), (size, err)
    assert not out.exists()


def test_closest_size_is_diffusers_bin():
    """`closest_size` over a table's sizes and keys picks diffusers' `classify_height_width_bin` bin: a small table
    written here (with a tie between two keys) and diffusers' 256 px table, over every requested size from 8 to 512
    px in steps of 8."""
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN

    from runtime.pipeline_sizes import closest_size

    small = {"0.5": [64.0, 128.0], "0.75": [96.0, 128.0], "1.0": [96.0, 96.0], "1.5": [96.0, 64.0]}
    for table in (small, ASPECT_RATIO_256_BIN):
        sizes = [(int(w), int(h)) for h, w in table.values()]
        keys = [float(k) for k in table]
        for width in range(8, 513, 8):
            for height in range(8, 513, 8):
                h, w = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=table)
                assert closest_size(width, height, sizes, keys) == (w, h), (width, height)
    assert closest_size(160, 100, [(128, 64), (128, 96)], [0.5, 0.75]) == (128, 64)  # 0.625: a tie, the first
    # same aspect ratio twice (never in diffusers' tables): the closest pixel count
    assert closest_size(96, 96, [(64, 64), (128, 128)]) == (64, 64)
    assert closest_size(120, 120, [(64, 64), (128, 128)]) == (128, 128)


@pytest.mark.parametrize("source, target", [((96, 64), (100, 60)), ((64, 96), (60, 100)), ((96, 64), (30, 50)),
                                            ((128, 128), (96, 64)), ((96, 64), (97, 65)), ((64, 64), (64, 64))])
def test_resize_and_crop_is_diffusers(source, target):
    """`resize_and_crop` (numpy, float32) against diffusers' `resize_and_crop_tensor` (torch's bilinear interpolate and
    center crop) on a random image around [-1, 1]: up and down, each crop direction (the weights are torch's bit for
    bit; measured max difference 2.4e-7, float rounding of the sums), and to uint8 as the pipelines postprocess:
    within 1 level (measured 0 here; 1 at a rounding edge on larger images)."""
    import torch
    from diffusers.image_processor import PixArtImageProcessor

    from runtime.pipeline_decode import to_uint8
    from runtime.pipeline_sizes import resize_and_crop

    (sw, sh), (tw, th) = source, target
    image = np.random.default_rng(sw * th).uniform(-1.1, 1.1, (1, 3, sh, sw)).astype(np.float32)
    ours = resize_and_crop(image, tw, th)
    reference = PixArtImageProcessor.resize_and_crop_tensor(torch.from_numpy(image), tw, th).numpy()
    assert ours.shape == reference.shape == (1, 3, th, tw)
    assert np.abs(ours - reference).max() <= 1e-6
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(reference).astype(int)).max() <= 1


def test_hn_run_resolution_binning_equals_diffusers(fp_bundle, tiny_pipeline, tmp_path, capsys):
    """--size 100x60 (height / width 0.6) is not bundled: generated at 96x64 (ratio 0.67, the closest of 1, 1 and
    0.67) and resized + center-cropped to 100x60, as diffusers' pipeline with use_resolution_binning does it: its
    latents at 96x64 (same seed), its tiled VAE decode, `resize_and_crop_tensor`, `postprocess` (measured: 1 uint8
    level in one value of 18000, latents relative L2 1.4e-6); the PNG and an info line say so."""
    import torch
    from diffusers import PixArtSigmaPipeline
    from PIL import Image

    out = tmp_path / "binned.png"
    code, stdout, err = hn_run(capsys, fp_bundle, PROMPT, "--size", "100x60", "--steps", "4", "--seed", "2", "-o",
                               out, "--no-progress")
    assert code == 0, err
    assert f"wrote {out} (100x60 from 96x64 by resolution binning, 4 steps" in stdout
    info = [ln for ln in err.splitlines() if ln.startswith("info: ")]
    assert info == ["info: resolution binning: 100x60 is not in the bundle; generated at 96x64 (the bundled size of "
                    "the closest aspect ratio), resized bilinearly and center-cropped to 100x60"]
    with Image.open(out) as image:
        assert image.size == (100, 60)
        text, pixels = dict(image.text), np.asarray(image).astype(int)
    assert text["size"] == "100x60" and text["generated_size"] == "96x64"
    assert text["resolution_binning"].startswith("generated at 96x64")

    pipe = PixArtSigmaPipeline.from_pretrained(tiny_pipeline, local_files_only=True)
    with torch.no_grad():
        latents = pipe(PROMPT, negative_prompt="", num_inference_steps=4, guidance_scale=4.5, height=64, width=96,
                       generator=torch.Generator().manual_seed(2), output_type="latent",
                       use_resolution_binning=False).images
        pipe.vae.enable_tiling()
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        resized = pipe.image_processor.resize_and_crop_tensor(decoded, 100, 60)
        reference = pipe.image_processor.postprocess(resized, output_type="np")[0]
    assert np.abs(pixels - (reference * 255).round().astype(int)).max() <= 1

    from runtime.pipeline import TextToImage

    api = TextToImage(fp_bundle, progress=False)(PROMPT, steps=4, seed=2, width=100, height=60,
                                                  output_type="latent")
    assert api.latents.shape == (1, 4, 8, 12) and api.settings["generated_width"] == 96
    with pytest.raises(RuntimeInputError, match="size 100x60 is not in the bundle"):
        TextToImage(fp_bundle, progress=False, verify=False)(PROMPT, width=100, height=60,
                                                             resolution_binning=False)


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


def test_split_transformer_runs_its_prompt_graph_once_per_generation(fp_bundle, monkeypatch):
    """The bundle's transformers are split (`hn-export split-prompt`; the images against diffusers': the tests of
    tests/test_bundle.py): a 4-step generation with guidance (negative and positive prompt: two calls a step here)
    runs the prompt graph once per prompt, twice in all (found by the group's key, the caption not compared: no
    bitwise check ran), and gives the bits of a run whose prompt graph runs at every call (the cache cleared before
    each: 8 runs)."""
    from runtime import denoiser, pipeline

    made = []
    real = denoiser.Denoiser

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(denoiser, "Denoiser", spy)
    compared = []
    same_bits = denoiser._same_bits
    monkeypatch.setattr(denoiser, "_same_bits", lambda a, b: compared.append(1) or same_bits(a, b))
    pipe = pipeline.TextToImage(fp_bundle, progress=False, verify=False)
    cached = pipe(PROMPT, steps=4, seed=0, output_type="latent")
    assert not compared
    assert made[-1].prompt_session is not None and made[-1].prompt_runs == 2
    assert made[-1].prompt_inputs == ["encoder_hidden_states"]
    call = real.__call__
    monkeypatch.setattr(real, "__call__", lambda self, feeds, outputs=None, prompt_key=None: (
        self.clear_prompt_cache(), call(self, feeds, outputs, prompt_key))[1])
    every_step = pipe(PROMPT, steps=4, seed=0, output_type="latent")
    assert made[-1].prompt_runs == 8
    assert np.array_equal(cached.latents, every_step.latents)


def test_no_split_prompt_reaches_the_bundle_job(monkeypatch, capsys, tmp_path):
    """`hn-export bundle --no-split-prompt` asks for whole transformers (`BundleJob.split_prompt`; what a split
    bundle computes against the whole graph: tests/test_prompt_split.py and the bundle tests against diffusers)."""
    from hn_export import cli_bundle
    from hn_export.bundle import BundleReport
    from hn_export.cli import main

    jobs = []

    def capture(job):
        jobs.append(job)
        return BundleReport(tmp_path, [], [], [])

    monkeypatch.setattr(cli_bundle, "run_bundle", capture)
    for flags in ([], ["--no-split-prompt"]):
        assert run_main(main, capsys, ["bundle", "--preset", "tiny", "--no-quantize", *flags,
                                       "-o", tmp_path / "b"]).exit_code == 0
    assert [job.split_prompt for job in jobs] == [True, False]

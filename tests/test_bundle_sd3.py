"""`hn-export bundle` on a Stable Diffusion 3 pipeline (the seeded `sd3-tiny` folder of models.pipelines_sd3: two
CLIP encoders, T5, a 16-channel VAE with a shift factor, flow-matching Euler) and `runtime.pipeline` running it,
against diffusers' StableDiffusion3Pipeline on the same folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from runtime.bundle_manifest import MANIFEST_NAME, load_manifest
from tests.conftest import PROMPT

STEPS = 4
LONG_PROMPT = " ".join(["a watercolor of a red fox on a hill at sunset"] * 12)  # > 77 CLIP tokens, < 256 T5


@pytest.fixture(scope="module")
def sd3_diffusers(sd3_pipeline):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(sd3_pipeline, local_files_only=True)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def test_sd3_bundle_layout(sd3_fp_bundle):
    names = sorted(p.name for p in sd3_fp_bundle.iterdir())
    assert names == sorted([MANIFEST_NAME, "scheduler_config.json", "text_encoder.onnx", "text_encoder_2.onnx",
                            "text_encoder_3.onnx", "tokenizer.json", "tokenizer_2.json", "tokenizer_3.json",
                            "transformer_64x64.onnx", "transformer_64x64.prompt.onnx", "vae_decoder.onnx"])
    manifest = load_manifest(sd3_fp_bundle)
    data = manifest.data
    assert (data["family"], data["pipeline"]) == ("sd3", "StableDiffusion3Pipeline")
    assert data["defaults"]["steps"] == 28 and data["defaults"]["guidance_scale"] == 7.0
    assert data["text"]["max_sequence_length"] == 256 and data["text"]["width"] == 32
    assert [c["max_length"] for c in data["text"]["clip"]] == [77, 77]
    assert [c["pad_token_id"] for c in data["text"]["clip"]] == [641, 0]  # <|endoftext|> and "!"
    assert data["latent"] == {"channels": 16, "vae_scale_factor": 8, "scaling_factor": 1.5305,
                              "shift_factor": 0.0609, "learned_sigma": False}
    scheduler = json.loads((sd3_fp_bundle / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT], ids=["short", "long"])
def test_sd3_conditioning_is_diffusers_encode_prompt(sd3_fp_bundle, sd3_diffusers, prompt):
    """The bundle's three encoders, tokenizers and the concatenation against StableDiffusion3Pipeline.encode_prompt
    (negative prompt "", CFG pair). Measured max abs difference: embeddings 7.5e-6 (of values up to 3.0), pooled
    8.3e-7; the long prompt, truncated by both CLIP tokenizers at 77 tokens: 2.8e-6 / 4.8e-7."""
    import torch

    from runtime.pipeline import TextToImage

    pipe = TextToImage(sd3_fp_bundle, progress=False)
    groups, truncated = pipe.conditioning(["", prompt])
    with torch.no_grad():
        pe, npe, pp, npp = sd3_diffusers.encode_prompt(prompt, prompt, prompt, negative_prompt="",
                                                      do_classifier_free_guidance=True)
    embeds, pooled = torch.cat([npe, pe]).numpy(), torch.cat([npp, pp]).numpy()
    assert len(groups) == 1 and groups[0]["encoder_hidden_states"].shape == embeds.shape == (2, 77 + 256, 32)
    assert np.abs(groups[0]["encoder_hidden_states"] - embeds).max() <= 5e-5
    assert np.abs(groups[0]["pooled_projections"] - pooled).max() <= 5e-6
    if prompt == LONG_PROMPT:
        assert truncated and truncated[0] in LONG_PROMPT and len(truncated[0]) > 100, truncated  # words, no </w>
    else:
        assert truncated == []


def test_sd3_fp_bundle_is_diffusers_pipeline(sd3_fp_bundle, sd3_diffusers):
    """Seeded latents (torch's generator in numpy), 4 flow-matching Euler steps with guidance 7.0, the VAE's scale
    and shift: the float bundle against StableDiffusion3Pipeline with generator=manual_seed(11). Measured: final
    latents relative L2 5.7e-6, image within 1 of 255."""
    import torch

    from runtime.pipeline import TextToImage

    pipe = TextToImage(sd3_fp_bundle, progress=False)
    kwargs = dict(negative_prompt="", num_inference_steps=STEPS, height=64, width=64)
    with torch.no_grad():
        latents = sd3_diffusers(PROMPT, generator=torch.Generator().manual_seed(11), output_type="latent",
                                **kwargs).images.numpy()
        image = sd3_diffusers(PROMPT, generator=torch.Generator().manual_seed(11), output_type="np", **kwargs).images
    ours = pipe(PROMPT, "", steps=STEPS, seed=11, output_type="np")
    assert rel_l2(ours.latents, latents) <= 1e-4
    assert np.abs(ours.array.astype(int) - np.round(image[0] * 255).astype(int)).max() <= 1
    assert ours.settings["scheduler"] == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.slow  # builds the quantized SD3 bundle (export, calibration, quantization): ~20 s
def test_sd3_quantized_bundle_sqnr(sd3_q_bundle, sd3_fp_bundle):
    """W4A4 hadanorm `fused` transformer + int8 encoders against the float bundle, end of denoising at the bundle's
    28 steps. Measured with this calibration (1 sample x 8 steps): 17.9 dB (seed 0) and 16.0 dB (seed 1); seeds 0-5:
    15.9 to 18.0 dB. Bound: 13.5 dB (the lowest less 2.4 dB); below 60 dB says it really is quantized."""
    from runtime.pipeline import TextToImage

    manifest = load_manifest(sd3_q_bundle)
    transformer = manifest.file("transformer")
    assert (transformer.bits, transformer.method, transformer.format) == ("w4a4", "hadanorm", "fused")
    assert [manifest.file(r).bits for r in ("text_encoder", "text_encoder_2", "text_encoder_3")] == [8, 8, 8]
    fp, quant = TextToImage(sd3_fp_bundle, progress=False), TextToImage(sd3_q_bundle, progress=False)
    for seed in (0, 1):
        ref = fp(PROMPT, seed=seed, output_type="latent").latents.astype(np.float64)
        out = quant(PROMPT, seed=seed, output_type="latent").latents
        sqnr = float(10 * np.log10(np.sum(ref ** 2) / np.sum((out - ref) ** 2)))
        assert 13.5 <= sqnr < 60.0, (seed, sqnr)


def test_sd3_bad_folders(sd3_pipeline, tmp_path, hn_cli):
    """An SD3 folder without T5 (diffusers runs it on zeros; the bundle needs all three encoders), a size the SD3
    export does not trace, and inconsistent encoder widths: one line each, exit 2, nothing written."""
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(sd3_pipeline, no_t5, ignore=lambda d, names: ["text_encoder_3"] if d == str(sd3_pipeline) else [])
    wide = tmp_path / "wide_t5"
    shutil.copytree(sd3_pipeline, wide)
    config = json.loads((wide / "text_encoder_3" / "config.json").read_text())
    (wide / "text_encoder_3" / "config.json").write_text(json.dumps({**config, "d_model": 48}))
    cases = [
        ([str(no_t5)], "has no text_encoder_3/ folder (SD3 without T5 is not bundled)"),
        ([str(sd3_pipeline), "--sizes", "128x128"], "is exported at its own size only (64x64)"),
        ([str(wide), "--no-quantize"], "the T5 encoder's width 48 is not the transformer's joint_attention_dim 32"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        result = hn_cli("bundle", "--checkpoint", *args, "-o", out, "--no-progress")
        assert result.exit_code == 2 and message in result.err and "Traceback" not in result.err, result.err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

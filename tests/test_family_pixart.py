"""PixArt-Sigma and PixArt-Alpha through the family mechanism: sites cover every block linear once, our denoising loop
equals the diffusers pipeline's, and PixArt-Alpha's resolution / aspect-ratio conditions export and run."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
import torch

from graph_passes.linears import find_activation_sites, find_linears
from hn_export.denoise import DenoiseConfig, ModelSignature, trajectory
from hn_export.families import selection_for
from models.build import ModelSource, build_transformer, forward, make_inputs
from models.families import FAMILIES
from runtime.denoiser import Denoiser

STEPS = 4


def torch_runner(model):
    """A `RunFn` (numpy feeds -> numpy output) on the torch model."""

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = forward(model, {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()})
        return out.numpy()

    return run


def our_latents(model, sig: ModelSignature, seed: int = 0) -> tuple[np.ndarray, dict]:
    config = DenoiseConfig(steps=STEPS, seed=seed, caption_length=7)
    cond = FAMILIES[sig.family].conditions(sig, config, 0)
    result = None
    for result in trajectory(torch_runner(model), sig, config, 0):
        pass
    return result, cond


def pipeline_latents(pipeline_class, model, cond: dict, height: int) -> np.ndarray:
    from diffusers import DPMSolverMultistepScheduler

    from models.families.pixart import SCHEDULER

    pipe = pipeline_class(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                          scheduler=DPMSolverMultistepScheduler(**SCHEDULER))
    captions = torch.from_numpy(cond["captions"])
    ones = torch.ones(1, captions.shape[1])
    with torch.no_grad():
        out = pipe(prompt=None, negative_prompt=None, prompt_embeds=captions[1:2], prompt_attention_mask=ones,
                   negative_prompt_embeds=captions[0:1], negative_prompt_attention_mask=ones,
                   num_inference_steps=STEPS, height=height, width=height, guidance_scale=4.5,
                   latents=torch.from_numpy(cond["latents"]), output_type="latent", use_resolution_binning=False)
    return out.images.numpy()


def test_sigma_loop_matches_pipeline(tiny_onnx):
    from diffusers import PixArtSigmaPipeline

    model = build_transformer(ModelSource(preset="tiny", seed=0))
    sig = ModelSignature.of(ir.load(tiny_onnx))
    assert sig.family == "pixart-sigma"
    ours, cond = our_latents(model, sig)
    theirs = pipeline_latents(PixArtSigmaPipeline, model, cond, height=8 * 8)
    assert ours.shape == theirs.shape == (1, 4, 8, 8)
    # float64 (ours) vs float32 (the pipeline's) scheduler state: measured max abs 1.0e-4 on latents up to 531
    # (relative 1.9e-7); bound relative 1e-5
    assert np.abs(ours - theirs).max() < 1e-5 * np.abs(theirs).max()


@pytest.fixture(scope="module")
def alpha_1024(tmp_path_factory):
    """PixArt-Alpha tiny at a 128x128 latent: the pipeline passes the resolution conditions only at sample size 128."""
    from hn_export.export import export_transformer

    model = build_transformer(ModelSource(preset="pixart-alpha-tiny", sample_size=128, seed=0))
    path = tmp_path_factory.mktemp("alpha") / "alpha.onnx"
    export_transformer(model, path, progress=False)
    return model, path


def test_alpha_conditions_export_and_match_torch(alpha_1024):
    model, path = alpha_1024
    graph = ir.load(path)
    assert {v.name for v in graph.graph.inputs} == {"hidden_states", "timestep", "encoder_hidden_states",
                                                     "resolution", "aspect_ratio"}
    assert ModelSignature.of(graph).family == "pixart-alpha"
    inputs = make_inputs(model, batch=2, caption_length=5, seed=3)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    feeds["resolution"] = np.array([[1024.0, 1024.0], [512.0, 768.0]], dtype=np.float32)  # the conditions matter
    feeds["aspect_ratio"] = np.array([[1.0], [512 / 768]], dtype=np.float32)
    with torch.no_grad():
        ref = forward(model, {k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    out = Denoiser(path, kernel_library=False)(feeds)
    # measured max abs 6.2e-6 (outputs up to 4.0); bound 1e-4
    assert np.abs(out - ref).max() < 1e-4
    changed = dict(feeds, resolution=np.full_like(feeds["resolution"], 256.0))
    assert np.abs(Denoiser(path, kernel_library=False)(changed) - out).max() > 1e-3  # the inputs are used


def test_alpha_loop_matches_pipeline(alpha_1024):
    from diffusers import PixArtAlphaPipeline

    model, path = alpha_1024
    sig = ModelSignature.of(ir.load(path))
    ours, cond = our_latents(model, sig)
    theirs = pipeline_latents(PixArtAlphaPipeline, model, cond, height=1024)
    # measured max abs 3.0e-4 on latents up to 1099 (relative 2.8e-7); bound relative 1e-5
    assert np.abs(ours - theirs).max() < 1e-5 * np.abs(theirs).max()


def test_every_block_linear_is_in_one_site(tiny_onnx):
    model = ir.load(tiny_onnx)
    family = FAMILIES["pixart-sigma"]
    sites = find_activation_sites(model, selection_for(model))
    covered = collections.Counter(lin.module_path for site in sites for lin in site.linears)
    torch_model = build_transformer(ModelSource(preset="tiny", seed=0))
    expected = {f"transformer.{name}": role for name, role, _ in family.block_linear_roles(torch_model)}
    assert set(covered) == set(expected) and set(covered.values()) == {1}
    assert None not in expected.values()
    role_of_path = {lin.module_path: site.role for site in sites for lin in site.linears}
    assert role_of_path == expected
    in_blocks = [lin for lin in find_linears(model) if ".transformer_blocks." in lin.module_path]
    assert len(in_blocks) == len(expected) == 20

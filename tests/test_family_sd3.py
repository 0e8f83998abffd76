"""SD3 / SD3.5 (SD3Transformer2DModel) through the family mechanism, on the sd3-tiny preset (2 blocks, 72 wide, 8x8
latent; the last block is context_pre_only) and sd35-tiny (attn2 in block 0, RMS q/k norms): sites cover every
block linear once, the export matches torch, transform-only is exact, W4A4 HadaNorm keeps a measured quality, our
denoising loop equals StableDiffusion3Pipeline's, and the ONNX graph drops into that pipeline."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
import torch

from graph_passes.linears import find_activation_sites
from hn_export.denoise import DenoiseConfig, ModelSignature, trajectory
from hn_export.evaluate import GraphRunner, evaluate, reference_outputs
from hn_export.export import export_transformer
from hn_export.families import selection_for
from hn_export.graph_import import load_graph
from models.build import InitKind, ModelSource, build_transformer, forward, make_inputs
from models.errors import ModelInputError
from models.families import FAMILIES, family_of_inputs
from models.families.sd3 import SCHEDULER, SD3
from runtime.denoiser import Denoiser

STEPS = 4
FAST_CALIB = ("--calib-samples", "1", "--calib-steps", "2", "--no-progress")
EVAL = DenoiseConfig(steps=4, samples=1, seed=7)
INPUTS = {"hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"}

# (site group, role) of one block, in graph order; the last block (context_pre_only) lacks the context output sites
FULL_BLOCK = [
    ("norm1", "adaLN in"),
    ("norm1_context", "adaLN in"),
    ("attn.qkv", "image qkv in"),
    ("attn.add_qkv", "context qkv in"),
    ("attn.add_out", "context attn out"),
    ("attn.out", "image attn out"),
    ("ff.in", "image ffn in"),
    ("ff.out", "image ffn out"),
    ("ff_context.in", "context ffn in"),
    ("ff_context.out", "context ffn out"),
]
LAST_BLOCK = [s for s in FULL_BLOCK if s[0] not in ("attn.add_out", "ff_context.in", "ff_context.out")]
ATTN2 = [("attn2.qkv", "image attn2 qkv in"), ("attn2.out", "image attn2 out")]


def export(preset: str, folder):
    model = build_transformer(ModelSource(preset=preset, seed=0))
    path = folder / f"{preset}.onnx"
    export_transformer(model, path, progress=False)
    return model, path


@pytest.fixture(scope="module")
def sd3_tiny(preset_onnx):
    """The sd3-tiny torch model (dit-stats, seed 0) and its FP32 export by the command line."""
    return build_transformer(ModelSource(preset="sd3-tiny", seed=0)), preset_onnx("sd3-tiny")


@pytest.fixture(scope="module")
def reference(sd3_tiny):
    with GraphRunner(sd3_tiny[1]) as runner:
        return reference_outputs(runner, EVAL, with_denoising=False)


def check_sites(model, path, expected_blocks: list[list[tuple[str, str]]]) -> None:
    graph = load_graph(path)  # Gemm linears (the adaLN modulation) as MatMul, as the quantize job sees them
    sites = find_activation_sites(graph, selection_for(graph))
    covered = collections.Counter(lin.module_path for site in sites for lin in site.linears)
    expected = {f"transformer.{name}": role for name, role, _ in SD3.block_linear_roles(model)}
    assert None not in expected.values() and "linear" not in expected.values()
    assert set(covered) == set(expected) and set(covered.values()) == {1}
    assert {lin.module_path: site.role for site in sites for lin in site.linears} == expected
    for index, block in enumerate(expected_blocks):
        got = [(s.name.removeprefix(f"transformer_blocks.{index}."), s.role) for s in sites if s.block == index]
        assert sorted(got) == sorted(block)
    assert len(sites) == sum(len(b) for b in expected_blocks)


def test_every_block_linear_is_in_one_site(sd3_tiny):
    model, path = sd3_tiny
    check_sites(model, path, [FULL_BLOCK, LAST_BLOCK])
    assert len(list(SD3.block_linear_roles(model))) == 14 + 11  # full block: 14 linears; context_pre_only: 11


def test_sd35_sites_and_export(tmp_path):
    model, path = export("sd35-tiny", tmp_path)
    check_sites(model, path, [FULL_BLOCK + ATTN2, LAST_BLOCK])
    inputs = make_inputs(model, batch=3, caption_length=11, seed=3)
    with torch.no_grad():
        ref = forward(model, inputs).numpy()
    out = Denoiser(path, kernel_library=False)({k: v.numpy() for k, v in inputs.items()})
    assert np.abs(out - ref).max() < 1e-4  # measured 1.2e-6 (outputs up to 3.7)


def test_export_inputs_and_onnx_matches_torch(sd3_tiny):
    model, path = sd3_tiny
    graph = ir.load(path)
    names = {v.name for v in graph.graph.inputs}
    assert names == INPUTS and family_of_inputs(names) is SD3 and family_of_inputs(names | {"guidance"}) is None
    sig = ModelSignature.of(graph)
    assert sig.family == "sd3" and sig.latent_shape == (16, 8, 8)
    assert sig.fixed_batch is None and sig.fixed_caption_length is None  # batch and caption length dynamic
    denoiser = Denoiser(path, kernel_library=False)
    for batch, length in ((1, 5), (3, 12), (2, 77)):
        inputs = make_inputs(model, batch=batch, caption_length=length, seed=3)
        with torch.no_grad():
            ref = forward(model, inputs).numpy()
        out = denoiser({k: v.numpy() for k, v in inputs.items()})
        # measured max abs 1.7e-6 / 1.7e-6 / 1.2e-6 (outputs up to 3.4); bound 1e-4
        assert out.shape == (batch, 16, 8, 8) and np.abs(out - ref).max() < 1e-4


def test_transform_only_equals_fp(hn_cli, sd3_tiny, reference, tmp_path):
    out = tmp_path / "t.onnx"
    result = hn_cli(sd3_tiny[1], "--transform-only", "--method", "hadanorm", "-o", out, *FAST_CALIB)
    assert result.exit_code == 0, result.err
    with GraphRunner(out) as runner:
        got = evaluate(runner, reference, EVAL).single_call
    assert got.rel_l2 <= 1e-5  # measured 4.7e-7


# Single-call SQNR (dB) against the FP32 graph (EVAL inputs, FAST_CALIB), measured on the 2-core machine: hadanorm
# 15.64, none 12.31 (the others, same run: smoothquant 16.81, dyncenter 15.75, sdcb 14.83, quarot 11.49). Bounds: 2 dB
# below the measured level, and below 40 dB (quantizers present: W8A8 would be higher).
@pytest.mark.parametrize("method,measured_db", [("hadanorm", 15.64), ("none", 12.31)])
def test_w4a4_quality(hn_cli, sd3_tiny, reference, tmp_path, method, measured_db):
    out = tmp_path / f"{method}.onnx"
    result = hn_cli(sd3_tiny[1], "--w4a4", "--method", method, "-o", out, *FAST_CALIB)
    assert result.exit_code == 0, result.err
    assert "17 activation sites" in result.out
    with GraphRunner(out) as runner:
        sqnr = evaluate(runner, reference, EVAL).single_call.sqnr_db
    assert measured_db - 2.0 <= sqnr <= 40.0, sqnr


def torch_runner(model):
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return forward(model, {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}).numpy()

    return run


def pipeline_latents(transformer, cond: dict[str, np.ndarray], pixels: int) -> np.ndarray:
    """StableDiffusion3Pipeline with no text encoders, tokenizers or VAE: the embeddings are passed directly."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    captions, pooled = torch.from_numpy(cond["captions"]), torch.from_numpy(cond["pooled"])
    with torch.no_grad():
        out = pipe(prompt=None, prompt_embeds=captions[1:2], negative_prompt_embeds=captions[0:1],
                   pooled_prompt_embeds=pooled[1:2], negative_pooled_prompt_embeds=pooled[0:1],
                   latents=torch.from_numpy(cond["latents"]), height=pixels, width=pixels, num_inference_steps=STEPS,
                   guidance_scale=SD3.guidance_scale, output_type="latent")
    return out.images.numpy()


def test_loop_matches_pipeline_and_onnx_drops_in(sd3_tiny):
    from hn_export.diffusers_transformer import OnnxTransformer

    model, path = sd3_tiny
    sig = ModelSignature.of(ir.load(path))
    config = DenoiseConfig(steps=STEPS, seed=0, caption_length=7)
    cond = SD3.conditions(sig, config, 0)
    assert cond["captions"].shape == (2, 7, 32) and cond["pooled"].shape == (2, 16)
    ours = None
    for ours in trajectory(torch_runner(model), sig, config, 0):
        pass
    pixels = 8 * SD3.latent_size(model)
    theirs = pipeline_latents(model, cond, pixels)
    assert ours.shape == theirs.shape == (1, 16, 8, 8)
    assert np.abs(theirs - cond["latents"]).max() > 0.5  # the loop moved the latents (measured 4.5)
    # float64 (ours) vs float32 scheduler state: measured max abs 7.8e-6 on latents up to 5.7; bound relative 1e-5
    assert np.abs(ours - theirs).max() < 1e-5 * np.abs(theirs).max()
    onnx = pipeline_latents(OnnxTransformer(path, config=model.config, kernels=False), cond, pixels)
    # measured max abs 8.3e-6; bound relative 1e-5
    assert np.abs(onnx - theirs).max() < 1e-5 * np.abs(theirs).max()


def test_plant_stats_chunk_order_and_outliers_init():
    """Gate rows (1 + N(0, 0.25)) sit where each norm's chunk order puts them; --init outliers zeroes every planted
    mean offset (patch-embedding and caption-projection biases, shift rows, FFN up biases), dit-stats plants them."""
    models = {init: build_transformer(ModelSource(preset="sd35-tiny", seed=0, init=init))
              for init in (InitKind.DIT_STATS, InitKind.OUTLIERS)}

    def norms(model):
        first, last = model.transformer_blocks
        # SD35AdaLayerNormZeroX: shift, scale, gate of attention, FFN, attn2; AdaLayerNormZero: attention, FFN
        return [(first.norm1.linear, 9), (first.norm1_context.linear, 6), (last.norm1.linear, 6)]

    for init, model in models.items():
        for linear, n in norms(model):
            rows = linear.bias.detach().reshape(n, -1)
            gates, shifts = list(range(2, n, 3)), list(range(0, n, 3))
            assert torch.all((rows[gates].mean(1) - 1).abs() < 0.2), rows.mean(1)  # gates of order 1
            if init == InitKind.OUTLIERS:
                assert torch.all(rows[shifts] == 0)
            else:
                assert torch.all(rows[shifts].abs().mean(1) > 0.1)
        # AdaLayerNormContinuous (last block's context norm, norm_out): scale, shift; scale has outlier channels
        for linear in (model.transformer_blocks[1].norm1_context.linear, model.norm_out.linear):
            scale, shift = linear.bias.detach().reshape(2, -1)
            assert scale.abs().max() > 5 and (shift.abs().max() == 0) == (init == InitKind.OUTLIERS)
        blocks = model.transformer_blocks
        biases = [model.pos_embed.proj.bias, model.context_embedder.bias, blocks[0].ff.net[0].proj.bias,
                  blocks[0].ff_context.net[0].proj.bias, blocks[1].ff.net[0].proj.bias]
        if init == InitKind.OUTLIERS:
            assert all(torch.all(b == 0) for b in biases)
        else:
            assert all(b.abs().mean() > 0.1 for b in biases)
    dit, out = models.values()
    assert torch.equal(dit.transformer_blocks[0].ff.net[0].proj.weight, out.transformer_blocks[0].ff.net[0].proj.weight)


def test_sample_size_beyond_the_positional_embedding(hn_cli, tmp_path):
    with pytest.raises(ModelInputError, match="positional embedding"):
        build_transformer(ModelSource(preset="sd3-tiny", sample_size=40))
    out = tmp_path / "big.onnx"
    result = hn_cli("export", "--preset", "sd3-tiny", "--sample-size", "40", "-o", out)
    assert result.exit_code == 2 and not out.exists()
    assert result.err.strip().count("\n") == 0 and "pass --sample-size 32 or less" in result.err
    model = build_transformer(ModelSource(preset="sd3-tiny", sample_size=32, layers=1))
    assert SD3.latent_size(model) == 32 and len(model.transformer_blocks) == 1
    assert model.transformer_blocks[0].context_pre_only  # a preset's last block, at any depth
    assert FAMILIES["sd3"] is SD3


def test_checkpoint_folder(tmp_path):
    """save_pretrained of a preset model loads back through --checkpoint (dual_attention_layers comes back as a JSON
    list) and gives the same outputs; --layers keeps the first blocks."""
    model = build_transformer(ModelSource(preset="sd35-tiny", seed=0))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = build_transformer(ModelSource(checkpoint=tmp_path / "ckpt"))
    inputs = make_inputs(model, batch=2, caption_length=5, seed=4)
    with torch.no_grad():
        assert torch.equal(forward(loaded, inputs), forward(model, inputs))
    one = build_transformer(ModelSource(checkpoint=tmp_path / "ckpt", layers=1))
    assert len(one.transformer_blocks) == 1 and one.config.num_layers == 1
    with torch.no_grad():
        assert forward(one, inputs).shape == (2, 16, 8, 8)

"""Sana (`SanaTransformer2DModel`) through the family mechanism, on the sana-tiny preset (2 blocks, 72 wide, 8x8
latent of 32 channels = 64 tokens) exported once with `hn-export export`: the linear attention exports and matches
torch (with and without the caption mask), every block linear and ungrouped conv has one role and one site, the
preset widths are the real architectures' (built on the meta device), transform-only is exact, W4A4 on the
attention sites keeps a measured quality, `hn-export diff` runs the denoising loop, our loop equals `SanaPipeline`'s
and the ONNX graph drops into that pipeline, and the dit-stats recipe plants what it says."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

from graph_passes.hadamard import full_factor_orders
from graph_passes.linears import find_activation_sites
from hn_export.denoise import DenoiseConfig, ModelSignature, trajectory
from hn_export.evaluate import GraphRunner, evaluate, reference_outputs
from hn_export.export import export_transformer
from hn_export.families import selection_for
from hn_export.graph_import import load_graph
from models.build import InitKind, ModelSource, build_transformer, forward, make_inputs
from models.errors import ModelInputError
from models.families import FAMILIES
from models.families.sana import SANA, SCHEDULER
from runtime.denoiser import Denoiser

STEPS = 4
FAST_CALIB = ("--calib-samples", "1", "--calib-steps", "2", "--no-progress")
EVAL = DenoiseConfig(steps=4, samples=1, seed=7)
INPUTS = {"hidden_states", "timestep", "encoder_hidden_states"}
# (site group, role) of one block; the same in every block
BLOCK_SITES = [
    ("attn1.qkv", "self-attn in"),
    ("attn1.out", "self-attn out"),
    ("attn2.q", "cross-attn q"),
    ("attn2.kv", "cross-attn kv"),
    ("attn2.out", "cross-attn out"),
    ("ff.in", "ffn in"),
    ("ff.out", "ffn out"),
]
ATTENTION_SITES = 5  # per block: the sites `--include attn` selects


def run_main(*args) -> None:
    from hn_export.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code == 0, f"hn-export {' '.join(map(str, args))} exited with {exc.code}"


@pytest.fixture(scope="module")
def sana(preset_onnx):
    """The sana-tiny torch model (dit-stats, seed 0) and its FP32 export by the command line."""
    return build_transformer(ModelSource(preset="sana-tiny", seed=0)), preset_onnx("sana-tiny")


@pytest.fixture(scope="module")
def reference(sana):
    with GraphRunner(sana[1]) as runner:
        return reference_outputs(runner, EVAL, with_denoising=False)


@pytest.fixture(scope="module")
def w4a4_attn(sana, tmp_path_factory):
    """W4A4 HadaNorm of the attention linears only (the FFN sites are 1x1 convs)."""
    out = tmp_path_factory.mktemp("sana-w4") / "w4.onnx"
    run_main(sana[1], "--w4a4", "--method", "hadanorm", "--include", "attn", "-o", out, *FAST_CALIB)
    return out


def torch_runner(model):
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return forward(model, {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}).numpy()

    return run


def test_export_inputs_and_onnx_matches_torch(sana):
    model, path = sana
    graph = ir.load(path)
    shapes = {v.name: tuple(d if isinstance(d, int) else str(d) for d in v.shape) for v in graph.graph.inputs}
    assert shapes == {"hidden_states": ("batch", 32, 8, 8), "timestep": ("batch",),
                      "encoder_hidden_states": ("batch", "caption_length", 32)}
    assert [v.name for v in graph.graph.outputs] == ["sample"]
    sig = ModelSignature.of(graph)
    assert sig.family == "sana" and sig.latent_shape == (32, 8, 8) and not sig.has_mask
    assert FAMILIES["sana"] is SANA and SANA.matches_inputs(INPUTS)
    assert {n.op_type for n in graph.graph} >= {"Relu", "Conv", "Softmax"}  # linear attention, GLUMBConv, cross
    denoiser = Denoiser(path, kernel_library=False)
    for batch, length in ((1, 5), (3, 12), (2, 300)):
        inputs = make_inputs(model, batch=batch, caption_length=length, seed=3)
        with torch.no_grad():
            ref = forward(model, inputs).numpy()
        out = denoiser({k: v.numpy() for k, v in inputs.items()})
        # measured max abs 1.2e-6 / 2.6e-6 / 1.9e-6 (outputs up to 2.5); bound 1e-4
        assert out.shape == (batch, 32, 8, 8) and np.abs(out - ref).max() < 1e-4


def test_masked_export_is_dynamic_and_uses_the_mask(tmp_path):
    model = build_transformer(ModelSource(preset="sana-tiny", layers=1, seed=0))  # one block: a faster export
    path = tmp_path / "masked.onnx"
    export_transformer(model, path, with_mask=True, progress=False)
    graph = ir.load(path)
    mask = next(v for v in graph.graph.inputs if v.name == "encoder_attention_mask")
    assert [str(d) for d in mask.shape] == ["batch", "caption_length"]  # unlike PixArt's static masked export
    assert ModelSignature.of(graph).has_mask
    denoiser = Denoiser(path, kernel_library=False)
    for batch, length in ((1, 5), (3, 300)):  # SanaPipeline's captions are 300 tokens
        inputs = make_inputs(model, batch=batch, caption_length=length, seed=4, with_mask=True)
        assert not inputs["encoder_attention_mask"].all()
        with torch.no_grad():
            ref = forward(model, inputs).numpy()
        feeds = {k: v.numpy() for k, v in inputs.items()}
        out = denoiser(feeds)
        # measured max abs 1.9e-6 / 2.2e-6 (outputs up to 2.9); bound 1e-4
        assert np.abs(out - ref).max() < 1e-4
    unmasked = denoiser(dict(feeds, encoder_attention_mask=np.ones_like(feeds["encoder_attention_mask"])))
    assert np.abs(unmasked - out).max() > 1e-2  # the padded tokens are dropped (measured 0.16)


def test_every_block_linear_and_conv_is_in_one_site(sana):
    model, path = sana
    layers = list(SANA.block_linear_roles(model, convs=True))
    expected = {f"transformer.{name}": role for name, role, _ in layers}
    assert len(layers) == 2 * 10 and None not in expected.values()
    assert not any("conv_depth" in name for name in expected)  # depthwise: grouped, never a site
    assert sum(isinstance(m, torch.nn.Conv2d) for _, _, m in layers) == 2 * 2
    graph = load_graph(path)
    sites = find_activation_sites(graph, selection_for(graph))
    covered = collections.Counter(lin.module_path for site in sites for lin in site.linears)
    assert set(covered) == set(expected) and set(covered.values()) == {1}
    assert {lin.module_path: site.role for site in sites for lin in site.linears} == expected
    for block in (0, 1):
        prefix = f"transformer_blocks.{block}."
        assert sorted((s.name.removeprefix(prefix), s.role) for s in sites if s.block == block) == sorted(BLOCK_SITES)
    widths = {s.role: s.width for s in sites}
    assert widths == {role: 72 for _, role in BLOCK_SITES} | {"ffn out": 180}


@pytest.mark.parametrize("preset,widths,parameters", [
    ("sana-600m-1024", (1152, 2880), 591_747_872),
    ("sana-1600m-1024", (2240, 5600), 1_604_462_752),
])
def test_real_architectures(preset, widths, parameters):
    """The presets' site widths (built on the meta device: no weights) are the family's Hadamard widths."""
    from models.families import all_presets

    family, config = all_presets()[preset]
    assert family is SANA
    with torch.device("meta"):
        model = SANA.model_class()(**config.kwargs())
    assert sum(p.numel() for p in model.parameters()) == parameters
    d, hidden = widths
    expected = {role: d for _, role in BLOCK_SITES} | {"ffn out": hidden}
    got = collections.defaultdict(set)
    for _, role, module in SANA.block_linear_roles(model, convs=True):
        got[role].add(module.in_features if isinstance(module, torch.nn.Linear) else module.in_channels)
    assert got == {role: {w} for role, w in expected.items()}
    assert set(widths) <= set(SANA.hadamard_widths)
    assert all(full_factor_orders(w) is not None for w in widths)
    assert model.patch_embed.pos_embed is None  # no positional embedding at 512 / 1024 px


def test_transform_only_equals_fp(hn_cli, sana, reference, tmp_path):
    out = tmp_path / "t.onnx"
    result = hn_cli(sana[1], "--transform-only", "--method", "hadanorm", "--include", "attn", "-o", out,
                    *FAST_CALIB)
    assert result.exit_code == 0, result.err
    with GraphRunner(out) as runner:
        got = evaluate(runner, reference, EVAL).single_call
    assert got.rel_l2 <= 1e-5  # measured 4.1e-7


# Single-call SQNR (dB) of W4A4 on the attention sites (--include attn: 10 sites, 16 linears) against the FP32 graph
# (EVAL inputs, FAST_CALIB, default --seed), measured on the 2-core machine: hadanorm 20.05, none 20.17 (same run:
# dyncenter 24.43, sdcb 18.06, quarot 17.62, smoothquant 17.45; hadanorm with --seed 1 / 2: 15.38 / 15.73: this
# 72-wide model with one calibration sample is noisy). Bounds: 3 dB below the measured level, and below 40 dB
# (quantizers present).
@pytest.mark.parametrize("method,measured_db", [("hadanorm", 20.05), ("none", 20.17)])
def test_w4a4_attention_quality(hn_cli, sana, reference, w4a4_attn, tmp_path, method, measured_db):
    out = w4a4_attn
    if method != "hadanorm":
        out = tmp_path / f"{method}.onnx"
        result = hn_cli(sana[1], "--w4a4", "--method", method, "--include", "attn", "-o", out, *FAST_CALIB)
        assert result.exit_code == 0, result.err
        assert f"{2 * ATTENTION_SITES} activation sites, 16 linears" in result.out
    with GraphRunner(out) as runner:
        sqnr = evaluate(runner, reference, EVAL).single_call.sqnr_db
    assert measured_db - 3.0 <= sqnr <= 40.0, sqnr


def test_diff_runs_the_denoising_loop(hn_cli, sana, w4a4_attn, tmp_path):
    out = tmp_path / "d.json"
    result = hn_cli("diff", w4a4_attn, sana[1], "--steps", "2", "--json", out)
    assert result.exit_code == 0, result.err
    data = json.loads(out.read_text())
    single, end = data["outputs"]["single_call"], data["outputs"]["end_of_denoising"]
    # measured single call 19.9 dB (cosine 0.995), latents after 2 steps 17.2 dB
    assert 15.0 < single["sqnr_db"] < 40.0 and 0.98 < single["cosine"] < 1.0
    assert end["sqnr_db"] is not None and end["rel_l2"] > 0
    assert "latents after 2 steps" in result.out


def pipeline_latents(transformer, cond: dict[str, np.ndarray], pixels: int) -> np.ndarray:
    """SanaPipeline with no tokenizer, text encoder or VAE: the caption embeddings and masks are passed directly."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler(**SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    captions = torch.from_numpy(cond["captions"])
    ones = torch.ones(1, captions.shape[1])
    with torch.no_grad():
        out = pipe(prompt=None, negative_prompt=None, prompt_embeds=captions[1:2], prompt_attention_mask=ones,
                   negative_prompt_embeds=captions[0:1], negative_prompt_attention_mask=ones,
                   latents=torch.from_numpy(cond["latents"]), height=pixels, width=pixels,
                   num_inference_steps=STEPS, guidance_scale=SANA.guidance_scale, output_type="latent",
                   use_resolution_binning=False)
    return out.images.numpy()


def test_loop_matches_pipeline_and_onnx_drops_in(sana):
    from hn_export.diffusers_transformer import OnnxTransformer

    model, path = sana
    sig = ModelSignature.of(ir.load(path))
    config = DenoiseConfig(steps=STEPS, seed=0, caption_length=7)
    cond = SANA.conditions(sig, config, 0)
    assert cond["captions"].shape == (2, 7, 32) and cond["latents"].shape == (1, 32, 8, 8)
    ours = None
    for ours in trajectory(torch_runner(model), sig, config, 0):
        pass
    pixels = 32 * SANA.latent_size(model)
    theirs = pipeline_latents(model, cond, pixels)
    assert ours.shape == theirs.shape == (1, 32, 8, 8)
    assert np.abs(theirs - cond["latents"]).max() > 0.5  # the loop moved the latents (measured 2.8)
    # float64 (ours) vs float32 scheduler state: measured max abs 2.9e-6 on latents up to 4.7; bound relative 1e-5
    assert np.abs(ours - theirs).max() < 1e-5 * np.abs(theirs).max()
    onnx = pipeline_latents(OnnxTransformer(path, config=model.config, kernels=False), cond, pixels)
    # measured max abs 3.8e-6; bound relative 1e-5
    assert np.abs(onnx - theirs).max() < 1e-5 * np.abs(theirs).max()


def test_plant_stats_offsets_and_outliers():
    """dit-stats plants offsets and outliers into the residual stream, the text tokens, the modulation tables and the
    value half of ``ff.conv_inverted``; --init outliers makes the same draws with every planted offset zero."""
    models = {init: build_transformer(ModelSource(preset="sana-tiny", seed=0, init=init)) for init in InitKind}
    plain, dit, out = models[InitKind.PLAIN], models[InitKind.DIT_STATS], models[InitKind.OUTLIERS]
    hidden = 180
    for model in (dit, out):
        offset = model is dit
        biases = [model.patch_embed.proj.bias, model.caption_projection.linear_2.bias]
        for block in model.transformer_blocks:
            table = block.scale_shift_table  # shift, scale, gate of the self-attention, then of the FFN
            assert torch.all((table[[2, 5]].mean(1) - 1).abs() < 0.2)  # gates of order 1
            assert table[[1, 4]].abs().max() > 5  # outlier scale channels
            biases += [table[0], table[3], block.ff.conv_inverted.bias[:hidden]]
        biases += [model.scale_shift_table[0]]
        assert all(bool(b.abs().mean() > 0.05) == offset for b in biases)
    for p_block, d_block, o_block in zip(plain.transformer_blocks, dit.transformer_blocks, out.transformer_blocks):
        p_conv, d_conv, o_conv = (b.ff.conv_inverted for b in (p_block, d_block, o_block))
        assert torch.equal(d_conv.weight, o_conv.weight)  # the same draws
        rows = (d_conv.weight[:hidden] / p_conv.weight[:hidden]).flatten(1).mean(1)
        assert int((rows - 8).abs().lt(1e-4).sum()) == 2  # max(2, 0.005 x 180) value rows x 8
        assert torch.equal(d_conv.weight[hidden:], p_conv.weight[hidden:])  # the gate half is not planted
        assert torch.equal(d_conv.bias[hidden:], p_conv.bias[hidden:])


def test_sprint_is_refused_and_checkpoint_layers(tmp_path):
    from models.families.sana import SANA_TINY

    config = tmp_path / "sprint"
    config.mkdir()
    (config / "config.json").write_text(json.dumps(dict(SANA_TINY, guidance_embeds=True,
                                                        _class_name="SanaTransformer2DModel")))
    with pytest.raises(ModelInputError, match="Sana-Sprint"):
        build_transformer(ModelSource(config=config / "config.json"))
    model = build_transformer(ModelSource(preset="sana-tiny", seed=0))
    model.save_pretrained(tmp_path / "ckpt")
    one = build_transformer(ModelSource(checkpoint=tmp_path / "ckpt", layers=1))
    assert len(one.transformer_blocks) == 1 and one.config.num_layers == 1
    assert len(build_transformer(ModelSource(preset="sana-600m-512", layers=1, sample_size=4)).transformer_blocks) == 1


def test_graph_without_metadata_is_sana_not_pixart(sana):
    """Sana has PixArt-Sigma's input names: without the family metadata its module paths decide."""
    import onnx_ir as ir

    from hn_export.denoise import graph_family

    model = ir.load(sana[1])
    model.metadata_props.pop("hn_export.family")
    assert graph_family(model).name == "sana"

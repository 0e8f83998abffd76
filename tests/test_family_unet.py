"""The LDM-4 class-conditional UNet (`UNet2DModel` + class embedding) through the family mechanism, on the unet-tiny
preset exported once with `hn-export export`: graph interface, sites and roles of every block linear and
convolution (down blocks, the index-free mid block, up blocks), ONNX vs torch, transform-only exactness and W4A4 of
the attention linears, `--layers` and checkpoint truncation, and the denoising loop against LDM's DDIM sampler
written out here (torch and ONNX)."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
import torch

from graph_passes.linears import SiteSelection, find_activation_sites, find_linears
from hn_export.denoise import DenoiseConfig, ModelSignature, first_call_feeds, trajectory
from hn_export.families import selection_for
from hn_export.graph_import import load_graph
from hn_export.metrics import sqnr_db
from models.build import InitKind, ModelSource, build_transformer, forward, make_inputs
from models.errors import ModelInputError
from models.families import FAMILIES
from models.families.unet import (
    LDM4_CIN256,
    MAX_LAYERS,
    NULL_CLASS,
    SCHEDULER,
    TINY,
    UNET,
)
from runtime.denoiser import Denoiser

STEPS = 4
SIZE = TINY["sample_size"]
# The sites of unet-tiny's mid block, in graph order (path inside the block, role).
MID_SITES = [
    ("resnets.0.conv1", "resnet conv1"),
    ("resnets.0.time_emb_proj", "resnet time-embed"),
    ("resnets.0.conv2", "resnet conv2"),
    ("attentions.0.qkv", "self-attn in"),
    ("attentions.0.out", "self-attn out"),
    ("resnets.1.conv1", "resnet conv1"),
    ("resnets.1.time_emb_proj", "resnet time-embed"),
    ("resnets.1.conv2", "resnet conv2"),
]
IN_BLOCKS = SiteSelection(include=(r"(^|[./])(down_blocks|mid_block|up_blocks)[./]",))  # no default exclusions


@pytest.fixture(scope="module")
def unet(preset_onnx):
    """The unet-tiny torch model (dit-stats, seed 0) and its FP32 export by the command line."""
    return build_transformer(ModelSource(preset="unet-tiny", seed=0)), preset_onnx("unet-tiny")


def quantize(hn_cli, path, out, *args: str):
    result = hn_cli(path, "-o", out, "--no-progress", *args)
    assert result.exit_code == 0, result.err
    return out


def torch_runner(model):
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return forward(model, {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}).numpy()

    return run


def meta_model(config: dict):
    """A UNet2DModel of `config` without weights (module structure only)."""
    from diffusers import UNet2DModel

    with torch.device("meta"):
        return UNet2DModel(**config)


def test_graph_interface_and_family(unet):
    _, path = unet
    graph = ir.load(path)
    inputs = {v.name: (v.dtype, tuple(d if isinstance(d, int) else str(d) for d in v.shape))
              for v in graph.graph.inputs}
    assert inputs == {"hidden_states": (ir.DataType.FLOAT, ("batch", 3, SIZE, SIZE)),
                      "timestep": (ir.DataType.INT64, ("batch",)),
                      "class_labels": (ir.DataType.INT64, ("batch",))}
    assert [v.name for v in graph.graph.outputs] == ["sample"]
    assert ModelSignature.of(graph).family == "unet" and FAMILIES["unet"] is UNET
    assert UNET.accepts_config("UNet2DModel", {"num_class_embeds": 1001})
    assert not UNET.accepts_config("UNet2DModel", {})  # unconditional UNets (DDPM, LDM celebahq) have no labels
    assert not UNET.accepts_config("UNet2DModel", {"num_class_embeds": 10, "class_embed_type": "timestep"})


def test_every_block_layer_is_in_one_site(unet):
    torch_model, path = unet
    model = load_graph(path)
    expected = {f"transformer.{name}": role for name, role, _ in UNET.block_linear_roles(torch_model, convs=True)}
    assert None not in expected.values() and "linear" not in expected.values()
    sites = find_activation_sites(model, selection_for(model, IN_BLOCKS))
    covered = collections.Counter(lin.module_path for site in sites for lin in site.linears)
    assert set(covered) == set(expected) and set(covered.values()) == {1}
    assert {lin.module_path: site.role for site in sites for lin in site.linears} == expected
    in_blocks = [lin for lin in find_linears(model) if "_block" in lin.module_path]
    # unet-tiny: 8 res blocks (down 1 + 1, mid 2, up 2 + 2) x (conv1, time_emb_proj, conv2), 5 skip convs, 4
    # attentions (down 1, mid 1, up 2) x (q, k, v, out), one downsampler, one upsampler
    assert len(in_blocks) == len(expected) == 8 * 3 + 5 + 4 * 4 + 2
    listed = [(s.name.removeprefix("mid_block."), s.role) for s in sites if s.name.startswith("mid_block.")]
    assert listed == MID_SITES and {s.block for s in sites if s.name.startswith("mid_block.")} == {None}
    # the default selection leaves the 1x1 skip convs and the downsampling convs in float (HQ-DM)
    default = find_activation_sites(model, selection_for(model))
    kept = {lin.module_path for site in default for lin in site.linears}
    assert kept == {p for p, role in expected.items() if role not in ("skip conv", "downsample conv")}


@pytest.mark.parametrize("config, layers", [(LDM4_CIN256, layers) for layers in range(1, MAX_LAYERS + 1)]
                         + [(FAMILIES["unet"].presets["ldm4-cin256-reduced"].config, 2)])
def test_roles_name_every_layer_of_the_presets(config, layers):
    """At the real architecture and every --layers: every block linear and convolution has a role; the site input
    widths are `hadamard_widths`."""
    model = meta_model(dict(config, layers_per_block=layers))
    roles = list(UNET.block_linear_roles(model, convs=True))
    assert [name for name, role, _ in roles if role is None] == []
    widths = {getattr(module, "in_features", None) or module.in_channels for _, _, module in roles}
    assert widths <= set(UNET.hadamard_widths)
    if config is LDM4_CIN256 and layers == LDM4_CIN256["layers_per_block"]:
        assert widths == set(UNET.hadamard_widths)
        assert sum(1 for name, _, _ in roles if name.startswith("up_blocks.0.resnets.")) == 4 * (layers + 1)


def test_onnx_matches_torch(unet):
    model, path = unet
    denoiser = Denoiser(path, kernel_library=False)
    for batch, seed in ((1, 3), (3, 4)):
        inputs = make_inputs(model, batch=batch, seed=seed)
        inputs["class_labels"][0] = NULL_CLASS
        with torch.no_grad():
            ref = forward(model, inputs).numpy()
            # the family's forward (upsamplers without their batch-size branches) is diffusers' forward exactly
            plain = model(inputs["hidden_states"], inputs["timestep"], class_labels=inputs["class_labels"]).sample
        assert torch.equal(torch.from_numpy(ref), plain)
        out = denoiser({k: v.numpy() for k, v in inputs.items()})
        assert out.shape == (batch, 3, SIZE, SIZE)
        # measured max abs 2.4e-6 / 2.8e-6 (outputs up to 1.3); bound 1e-4
        assert np.abs(out - ref).max() < 1e-4


def test_outliers_init_zeroes_every_planted_offset(unet):
    stats_model, _ = unet
    model = build_transformer(ModelSource(preset="unet-tiny", seed=0, init=InitKind.OUTLIERS))
    assert not model.conv_in.bias.any() and not model.time_embedding.linear_2.bias.any()
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)
             and "_block" in name]
    planted = dict(stats_model.named_modules())
    assert len(norms) == 8 * 2 + 4  # res blocks' norm1 and norm2, attentions' group_norm
    for name, norm in norms:
        assert not norm.bias.any() and planted[name].bias.abs().mean() > 0.1
        # the same draws otherwise: outlier channels (weights up to +-12) stay
        assert torch.equal(norm.weight, planted[name].weight) and norm.weight.abs().max() > 5.0


def test_transform_only_and_w4a4_attention(unet, hn_cli, tmp_path):
    _, path = unet
    sig = ModelSignature.of(ir.load(path))
    feeds = first_call_feeds(sig, DenoiseConfig(seed=5), 0)
    reference = Denoiser(path, kernel_library=False)(feeds)
    args = ("--include", "attentions", "--calib-samples", "1", "--calib-steps", "2")
    exact = quantize(hn_cli, path, tmp_path / "t.onnx", "--transform-only", *args)
    # measured 120 dB (feeds of seeds 0 / 1: 121 / 123 dB); bound 90 dB
    assert sqnr_db(reference, Denoiser(exact, kernel_library=False)(feeds)) > 90.0
    w4 = quantize(hn_cli, path, tmp_path / "w4.onnx", "--w4a4", *args)
    # measured 13.7 dB (8 sites: q/k/v and out of the 4 attentions; feeds of seeds 0 / 1: 17.6 / 17.4 dB;
    # --method none 13.0 / 15.0 dB; plain init 26-29 dB: the planted GroupNorm outlier channels and sharper
    # attention); bound 11 dB
    assert sqnr_db(reference, Denoiser(w4, kernel_library=False)(feeds)) > 11.0
    result = hn_cli("diff", w4, path, "--steps", "2")
    assert result.exit_code == 0, result.err


def test_layers_and_checkpoint_truncation(tmp_path):
    model = build_transformer(ModelSource(preset="unet-tiny", layers=2, seed=0, init=InitKind.PLAIN))
    assert model.config.layers_per_block == 2
    assert [len(b.resnets) for b in model.down_blocks] == [2, 2] and [len(b.resnets) for b in model.up_blocks] == [3, 3]
    with pytest.raises(ModelInputError, match=f"pass --layers {MAX_LAYERS} or fewer"):
        build_transformer(ModelSource(preset="unet-tiny", layers=MAX_LAYERS + 1))
    model.save_pretrained(tmp_path / "ckpt")
    cut = build_transformer(ModelSource(checkpoint=tmp_path / "ckpt", layers=1))
    assert cut.config.layers_per_block == 1
    assert [len(b.resnets) for b in cut.down_blocks] == [1, 1] and [len(b.resnets) for b in cut.up_blocks] == [2, 2]
    # up blocks keep their first res block and the last one (it reads the previous level's downsampler output)
    assert torch.equal(cut.up_blocks[1].resnets[1].conv1.weight, model.up_blocks[1].resnets[2].conv1.weight)
    inputs = make_inputs(cut, batch=2, seed=0)
    with torch.no_grad():
        assert forward(cut, inputs).shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize("arrays, message", [
    ({"class_labels": np.array([NULL_CLASS + 1, 3])}, "class_labels holds 1001, outside 0..1000"),
    ({"timestep": np.array([1000])}, "timestep holds 1000, outside 0..999"),
])
def test_input_file_values_are_checked(arrays, message):
    with pytest.raises(ModelInputError, match=message):
        UNET.check_input_arrays(None, arrays)
    UNET.check_input_arrays(None, {"timestep": np.array([0, 999]), "class_labels": np.array([0, NULL_CLASS])})


# ---------------------------------------------------------------- the denoising loop


def test_scheduler_is_ldm_ddim():
    """LDM's betas (linspace of the square roots, squared), DDIM timesteps (uniform + 1) and last alpha."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SCHEDULER)
    scheduler.set_timesteps(STEPS)
    betas = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=np.float64) ** 2
    assert np.allclose(scheduler.betas.numpy(), betas, rtol=1e-5)
    assert scheduler.timesteps.tolist() == [t + 1 for t in range(0, 1000, 1000 // STEPS)][::-1]  # 751 ... 1
    assert float(scheduler.final_alpha_cumprod) == float(scheduler.alphas_cumprod[0])


def ldm_ddim(model, cond: dict) -> np.ndarray:
    """LDM's DDIM sampler with classifier-free guidance (eta 0), written out on the torch model."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SCHEDULER)
    scheduler.set_timesteps(STEPS)
    latents = torch.from_numpy(cond["latents"])
    labels = torch.from_numpy(cond["class_labels"])
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(latents.repeat(2, 1, 1, 1), t, class_labels=labels).sample
            uncond, cls = eps.chunk(2)
            latents = scheduler.step(uncond + UNET.guidance_scale * (cls - uncond), t, latents).prev_sample
    return latents.numpy()


def test_loop_matches_ldm_ddim_torch_and_onnx(unet):
    model, path = unet
    sig = ModelSignature.of(ir.load(path))
    config = DenoiseConfig(steps=STEPS, seed=2)
    cond = UNET.conditions(sig, config, 0)
    assert cond["class_labels"][0] == NULL_CLASS and 0 <= cond["class_labels"][1] < NULL_CLASS
    theirs = ldm_ddim(model, cond)
    ours = list(trajectory(torch_runner(model), sig, config, 0))[-1]
    onnx = list(trajectory(Denoiser(path, kernel_library=False), sig, config, 0))[-1]
    assert ours.shape == onnx.shape == theirs.shape == (1, 3, SIZE, SIZE)
    # float64 (ours) vs float32 scheduler state: measured relative 2.8e-7 on latents up to 36.5 (seeds 0 / 1: 1.9e-7
    # / 2.2e-7); ONNX vs torch 1.5e-6 (1.1e-6 / 1.5e-6); bound relative 1e-5
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() < 1e-5 * scale
    assert np.abs(onnx - ours).max() < 1e-5 * scale


def test_graph_without_metadata_is_unet_not_dit(unet):
    """The UNet has DiT's input names: without the family metadata its module paths decide."""
    import onnx_ir as ir

    from hn_export.denoise import graph_family

    model = ir.load(unet[1])
    model.metadata_props.pop("hn_export.family")
    assert graph_family(model).name == "unet"


def test_default_sites_are_convs_and_linears_less_skip_and_downsampling(hn_cli, unet):
    """Default sites: every linear and ungrouped conv in the blocks except 1x1 skip convs and downsampling convs
    (HQ-DM keeps those in float); padded 3x3 convs are not centered, 1x1 convs are."""
    import json

    data = json.loads(hn_cli("layers", unet[1], "--json").out)
    roles = {s["role"] for s in data["sites"]}
    assert {"resnet conv1", "resnet conv2", "self-attn in", "upsample conv"} <= roles
    assert not roles & {"skip conv", "downsample conv"}
    convs = [s for s in data["sites"] if "conv" in s["role"]]
    assert convs and not any(s["centered"] for s in convs)  # all 3x3 with padding


@pytest.mark.parametrize("method", ["hadanorm", "hqdm"])
def test_conv_sites_transform_only_exact_and_w4a4_runs(hn_cli, unet, tmp_path, method):
    from hn_export.evaluate import GraphRunner

    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal((2, 3, 16, 16)).astype(np.float32),
             "timestep": np.array([500, 500], np.int64), "class_labels": np.array([1000, 3], np.int64)}
    outs = {}
    for mode in ("--transform-only", "--w4a4"):
        outs[mode] = quantize(hn_cli, unet[1], tmp_path / f"{mode[2:]}.onnx", "--method", method, mode,
                              "--calib-samples", "1", "--calib-steps", "2")
    with GraphRunner(unet[1]) as ref, GraphRunner(outs["--transform-only"]) as same, \
            GraphRunner(outs["--w4a4"]) as w4a4:
        want = ref(feeds)
        assert np.linalg.norm(same(feeds) - want) / np.linalg.norm(want) <= 1e-5
        err = np.linalg.norm(w4a4(feeds) - want) / np.linalg.norm(want)
    assert 1e-3 < err < 0.6  # quantized, still roughly the same function (diff on seeded inputs: rel L2 0.29-0.32)


def test_compare_and_sensitivity_cover_conv_sites(hn_cli, unet, tmp_path):
    """compare (HQ-DM per token and per timestep) and sensitivity run on the UNet; conv roles are in the study."""
    import json

    fast = ("--steps", "2", "--samples", "1", "--calib-samples", "1", "--calib-steps", "2", "--no-progress")
    result = hn_cli("compare", unet[1], "--methods", "none,hqdm", "--bits", "w4a4", "--act-granularities", "all",
                    "--out", tmp_path / "cmp", *fast)
    assert result.exit_code == 0, result.err
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())["results"]
    assert [(r["method"], r["act_granularity"]) for r in rows] == [
        ("none", "token"), ("none", "timestep"), ("hqdm", "token"), ("hqdm", "timestep")]
    assert all(np.isfinite(r["end_of_denoising"]["sqnr_db"]) and r["end_of_denoising"]["sqnr_db"] > 0 for r in rows)
    result = hn_cli("sensitivity", unet[1], "--methods", "hqdm", "--out", tmp_path / "sens", *fast)
    assert result.exit_code == 0, result.err
    data = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())
    assert {"resnet conv1", "resnet conv2", "upsample conv"} <= {r["role"] for r in data["sites"]}

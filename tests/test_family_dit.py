"""DiT-XL/2 (`DiTTransformer2DModel`) through the family mechanism, on the dit-tiny preset exported once: sites and
roles of every block linear, ONNX vs torch, transform-only exactness, W4A4 HadaNorm, a --calib file with int64
class labels, and the denoising loop against `DiTPipeline` (torch transformer and `OnnxTransformer`)."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
import torch

from graph_passes.linears import find_activation_sites, find_linears
from hn_export.denoise import DenoiseConfig, ModelSignature, first_call_feeds, trajectory
from hn_export.families import selection_for
from hn_export.graph_import import load_graph
from hn_export.metrics import sqnr_db
from models.build import InitKind, ModelSource, build_transformer, forward, make_inputs
from models.errors import ModelInputError
from models.families import FAMILIES, family_of_inputs
from models.families.dit import DIT, NULL_CLASS, SCHEDULER
from runtime.denoiser import Denoiser

STEPS = 4
# The sites of one block, in graph order (path inside the block, role); the same in every block.
BLOCK_SITES = [
    ("norm1.emb.timestep_embedder.linear_1", "time-embed in"),
    ("norm1.emb.timestep_embedder.linear_2", "time-embed hidden"),
    ("norm1", "adaLN in"),
    ("attn1.qkv", "self-attn in"),
    ("attn1.out", "self-attn out"),
    ("ff.in", "ffn in"),
    ("ff.out", "ffn out"),
]


@pytest.fixture(scope="module")
def dit(preset_onnx):
    """The dit-tiny torch model (dit-stats, seed 0) and its FP32 export by the command line."""
    return build_transformer(ModelSource(preset="dit-tiny", seed=0)), preset_onnx("dit-tiny")


def quantize(hn_cli, path, out, *args: str):
    result = hn_cli(path, "-o", out, "--no-progress", *args)
    assert result.exit_code == 0, result.err
    return out


def torch_runner(model):
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return forward(model, {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}).numpy()

    return run


def test_graph_interface_and_family(dit):
    _, path = dit
    graph = ir.load(path)
    inputs = {v.name: (v.dtype, tuple(d if isinstance(d, int) else str(d) for d in v.shape))
              for v in graph.graph.inputs}
    assert inputs == {"hidden_states": (ir.DataType.FLOAT, ("batch", 4, 8, 8)),
                      "timestep": (ir.DataType.INT64, ("batch",)),
                      "class_labels": (ir.DataType.INT64, ("batch",))}
    assert ModelSignature.of(graph).family == "dit"
    assert family_of_inputs(set(inputs)) is DIT
    assert DIT.accepts_config("Transformer2DModel", {"norm_type": "ada_norm_zero", "num_embeds_ada_norm": 1000,
                                                     "patch_size": 2})
    assert not DIT.accepts_config("Transformer2DModel", {"norm_type": "ada_norm_single", "patch_size": 2})


def test_every_block_linear_is_in_one_site(dit):
    torch_model, path = dit
    model = load_graph(path)  # as `layers` and `quantize` read it: the Gemm linears (2-D inputs) as MatMul + Add
    sites = find_activation_sites(model, selection_for(model))
    covered = collections.Counter(lin.module_path for site in sites for lin in site.linears)
    expected = {f"transformer.{name}": role for name, role, _ in DIT.block_linear_roles(torch_model)}
    assert None not in expected.values() and "linear" not in expected.values()
    assert set(covered) == set(expected) and set(covered.values()) == {1}
    assert {lin.module_path: site.role for site in sites for lin in site.linears} == expected
    in_blocks = [lin for lin in find_linears(model) if ".transformer_blocks." in lin.module_path]
    assert len(in_blocks) == len(expected) == 2 * 9
    for block in (0, 1):
        prefix = f"transformer_blocks.{block}."
        listed = [(s.name.removeprefix(prefix), s.role) for s in sites if s.name.startswith(prefix)]
        assert listed == BLOCK_SITES


def test_outliers_init_zeroes_every_planted_offset(dit):
    stats_model, _ = dit
    model = build_transformer(ModelSource(preset="dit-tiny", seed=0, init=InitKind.OUTLIERS))
    d = 72
    assert not model.pos_embed.proj.bias.any() and not model.proj_out_1.bias.view(2, d)[0].any()
    for block, planted in zip(model.transformer_blocks, stats_model.transformer_blocks):
        rows = block.norm1.linear.bias.view(6, d)  # shift, scale, gate of the attention, then of the FFN
        assert not rows[0].any() and not rows[3].any() and not block.ff.net[0].proj.bias.any()
        # the same draws otherwise: outlier scale channels (1 + scale up to +-12) and gates of order 1 stay
        assert torch.equal(rows[[1, 2, 4, 5]], planted.norm1.linear.bias.view(6, d)[[1, 2, 4, 5]])
        assert rows[1].abs().max() > 5.0 and abs(float(rows[2].mean()) - 1.0) < 0.2
        # the released checkpoint's tied embedders
        assert torch.equal(block.norm1.emb.timestep_embedder.linear_1.weight,
                           model.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1.weight)


def test_onnx_matches_torch(dit):
    model, path = dit
    denoiser = Denoiser(path, kernel_library=False)
    for batch, seed in ((1, 3), (3, 4)):
        inputs = make_inputs(model, batch=batch, seed=seed)
        inputs["class_labels"][0] = NULL_CLASS
        with torch.no_grad():
            ref = forward(model, inputs).numpy()
        out = denoiser({k: v.numpy() for k, v in inputs.items()})
        assert out.shape == (batch, 8, 8, 8)
        # measured max abs 1.9e-6 (outputs up to 3.4); bound 1e-4
        assert np.abs(out - ref).max() < 1e-4


def test_transform_only_and_w4a4_hadanorm(dit, hn_cli, tmp_path):
    _, path = dit
    sig = ModelSignature.of(ir.load(path))
    feeds = first_call_feeds(sig, DenoiseConfig(seed=5), 0)
    reference = Denoiser(path, kernel_library=False)(feeds)
    calib = ("--calib-samples", "1", "--calib-steps", "2")
    exact = quantize(hn_cli, path, tmp_path / "t.onnx", "--transform-only", *calib)
    # measured 129 dB (float32 rounding of the rotations; feeds of seeds 0 / 1: 125 / 129 dB); bound 90 dB
    assert sqnr_db(reference, Denoiser(exact, kernel_library=False)(feeds)) > 90.0
    w4 = quantize(hn_cli, path, tmp_path / "w4.onnx", "--w4a4", *calib)
    # measured 23.9 dB (feeds of seeds 0 / 1: 22.5 / 20.7 dB; W4A4 without transforms, --method none: 12.7 dB);
    # bound 19 dB
    assert sqnr_db(reference, Denoiser(w4, kernel_library=False)(feeds)) > 19.0


def test_calibration_file_with_int64_class_labels(dit, hn_cli, tmp_path):
    _, path = dit
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, hidden_states=rng.standard_normal((4, 4, 8, 8)).astype(np.float32),
             timestep=np.array([999, 999, 500, 500]), class_labels=np.array([NULL_CLASS, 3, NULL_CLASS, 7]))
    out = quantize(hn_cli, path, tmp_path / "sq.onnx", "--method", "smoothquant", "--calib", calib)
    assert out.exists()


@pytest.mark.parametrize("arrays, message", [
    ({"class_labels": np.array([NULL_CLASS + 1, 3])}, "class_labels holds 1001, outside 0..1000"),
    ({"class_labels": np.array([2.5, 3.0])}, "class_labels holds values that are not whole numbers"),
    ({"timestep": np.array([1000])}, "timestep holds 1000, outside 0..999"),
])
def test_input_file_values_are_checked(arrays, message):
    with pytest.raises(ModelInputError, match=message):
        DIT.check_input_arrays(None, arrays)
    DIT.check_input_arrays(None, {"timestep": np.array([0, 999]), "class_labels": np.array([0, NULL_CLASS])})


# ---------------------------------------------------------------- the diffusers pipeline


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, sample_size=16).eval()


def pipeline_latents(transformer, cond: dict, monkeypatch) -> np.ndarray:
    """`DiTPipeline`'s final latents (the input of the VAE decoder, times the scaling factor) from our starting
    latents (the pipeline draws its own: `randn_tensor` is replaced) and our class label."""
    from diffusers import DDIMScheduler, DiTPipeline

    monkeypatch.setattr("diffusers.pipelines.dit.pipeline_dit.randn_tensor",
                        lambda *args, **kwargs: torch.from_numpy(cond["latents"]))
    vae = tiny_vae()
    captured = {}
    decode = vae.decode

    def capture(z, *args, **kwargs):
        captured["latents"] = (z * vae.config.scaling_factor).numpy()
        return decode(z, *args, **kwargs)

    vae.decode = capture
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(**SCHEDULER), id2label=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe(class_labels=[int(cond["class_labels"][1])], guidance_scale=DIT.guidance_scale,
             num_inference_steps=STEPS, output_type="pt")
    return captured["latents"]


@pytest.fixture(scope="module")
def ours_and_cond(dit):
    model, path = dit
    sig = ModelSignature.of(ir.load(path))
    config = DenoiseConfig(steps=STEPS, seed=2)
    cond = FAMILIES["dit"].conditions(sig, config, 0)
    result = None
    for result in trajectory(torch_runner(model), sig, config, 0):
        pass
    return result, cond


def test_loop_matches_dit_pipeline(dit, ours_and_cond, monkeypatch):
    model, _ = dit
    ours, cond = ours_and_cond
    assert cond["class_labels"][0] == NULL_CLASS and 0 <= cond["class_labels"][1] < NULL_CLASS
    theirs = pipeline_latents(model, cond, monkeypatch)
    assert ours.shape == theirs.shape == (1, 4, 8, 8)
    # float64 (ours) vs float32 (the pipeline's) scheduler state, (null, class) vs (class, null) batch order:
    # measured max abs 3.3e-5 on latents up to 81.6 (relative 4.1e-7; seeds 0 / 1: 7.3e-7 / 5.2e-7); bound
    # relative 1e-5
    assert np.abs(ours - theirs).max() < 1e-5 * np.abs(theirs).max()


def test_onnx_transformer_in_dit_pipeline(dit, ours_and_cond, monkeypatch):
    from hn_export.diffusers_transformer import OnnxTransformer

    model, path = dit
    ours, cond = ours_and_cond
    torch_latents = pipeline_latents(model, cond, monkeypatch)
    onnx_latents = pipeline_latents(OnnxTransformer(path, config=model.config, kernels=False), cond, monkeypatch)
    # measured max abs 9.9e-5 on latents up to 81.6 (relative 1.2e-6; seeds 0 / 1: 2.6e-6 / 9.5e-7); bound
    # relative 3e-5
    assert np.abs(onnx_latents - torch_latents).max() < 3e-5 * np.abs(torch_latents).max()


def test_calibration_file_label_out_of_range_is_one_line(dit, hn_cli, tmp_path):
    _, path = dit
    calib = tmp_path / "calib.npz"
    np.savez(calib, hidden_states=np.zeros((2, 4, 8, 8), np.float32), timestep=np.array([999, 999]),
             class_labels=np.array([NULL_CLASS + 1, 3]))
    result = hn_cli(path, "--method", "smoothquant", "--calib", calib, "-o", tmp_path / "sq.onnx", "--no-progress")
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.err
    assert "class_labels holds 1001, outside 0..1000" in lines[0]
    assert not (tmp_path / "sq.onnx").exists()


def test_legacy_transformer2d_config_is_a_dit(hn_cli, tmp_path):
    """The released facebook/DiT-XL-2-* configs name the legacy class Transformer2DModel."""
    import json

    from models.families.dit import TINY

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_class_name": "Transformer2DModel", **TINY}))
    out = tmp_path / "legacy.onnx"
    result = hn_cli("export", "--config", config, "-o", out)
    assert result.exit_code == 0, result.err
    import onnx_ir as ir

    assert ir.load(out).metadata_props["hn_export.family"] == "dit"

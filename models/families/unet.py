"""LDM-4 class-conditional UNet (diffusers `UNet2DModel` with ``num_class_embeds``): latent diffusion, ImageNet 256.

- Architecture (LDM-4 "cin256", Rombach et al. 2022, table 13; CompVis ``configs/latent-diffusion/cin256-v2.yaml``):
  latent [3, 64, 64] (the VQ-f4 autoencoder), model channels 192 with multipliers (1, 2, 3, 5) ->
  ``block_out_channels`` (192, 384, 576, 960), 2 res blocks per level (``layers_per_block``; the up path has 3 per
  level, as LDM's output blocks), self-attention at the three lower resolutions (32, 16, 8: ``AttnDownBlock2D`` /
  ``AttnUpBlock2D`` there, plain ``DownBlock2D`` / ``UpBlock2D`` at 64) and in the mid block, 32 channels per head,
  GroupNorm 32, SiLU, time embedding 768 (4 x 192), convolutional down/upsampling (LDM's ``conv_resample``), 1x1
  ``conv_shortcut`` where a res block changes width, no scale-shift norm (LDM's ``use_scale_shift_norm`` False).
- `UNet2DModel`, not `UNet2DConditionModel`: `UNet2DModel` is class-conditional as it is (``num_class_embeds`` 1001
  = 1000 ImageNet classes + the null class 1000 of classifier-free guidance: ``class_embedding`` [1001, 768] is added
  to the timestep embedding, and every res block reads SiLU(t_emb + y_emb) through its ``time_emb_proj``; the
  class-conditional ADM UNet does the same). What differs from LDM-4: LDM-4 embeds the class into a 512-wide
  single-token context (``ClassEmbedder``) and reads it by cross-attention in a ``SpatialTransformer`` at each
  attention resolution (``proj_in`` 1x1, self-attention, cross-attention on the class token, GEGLU FFN,
  ``proj_out``). Here each attention is diffusers' plain UNet self-attention (GroupNorm, q/k/v, out, residual):
  no cross-attention (over one context token its softmax is 1: it only adds a per-sample vector, which the class
  embedding in the time embedding provides too), no FFN, no ``proj_in``/``proj_out``. `UNet2DConditionModel` with
  ``CrossAttnDownBlock2D`` would keep those layers but needs an ``encoder_hidden_states`` input (the class
  embedder outside the graph); the graph here takes the class labels directly, as DiT's does. So ldm4-cin256 has
  264 M parameters where LDM-4 has ~400 M.
- Blocks (role table block lists ``down_blocks.i``, ``mid_block`` (one module: its paths have no index),
  ``up_blocks.i``). Sites (every ``nn.Linear`` and every ungrouped ``nn.Conv2d`` inside the blocks; convolutions
  are sites on their input channels, found from the Conv node's module path like the linears); widths at
  ldm4-cin256:

  | path inside a block | site group | role | input widths |
  |---|---|---|---|
  | resnets.j.conv1 (3x3) | resnets.j.conv1 | resnet conv1 | 192-960; up path concat 384-1920 |
  | resnets.j.time_emb_proj | resnets.j.time_emb_proj | resnet time-embed | 768 |
  | resnets.j.conv2 (3x3) | resnets.j.conv2 | resnet conv2 | 192, 384, 576, 960 |
  | resnets.j.conv_shortcut (1x1) | resnets.j.conv_shortcut | skip conv | 192-576; up path 384-1920 |
  | attentions.j.to_q, to_k, to_v | attentions.j.qkv | self-attn in | 384, 576, 960 |
  | attentions.j.to_out.0 | attentions.j.out | self-attn out | 384, 576, 960 |
  | downsamplers.0.conv (3x3, stride 2) | downsamplers.0.conv | downsample conv | 192, 384, 576 |
  | upsamplers.0.conv (3x3) | upsamplers.0.conv | upsample conv | 960, 576, 384 |

  j = 0..`MAX_LAYERS` (down blocks have ``layers_per_block`` res blocks and attentions, up blocks one more, the mid
  block resnets.0, attentions.0, resnets.1). The ``time_emb_proj`` linears read SiLU(t_emb + y_emb) [B, 768] (one
  token per sample). HQ-DM keeps the 1x1 skip convolutions and the downsampling convolutions in float:
  `default_exclude` leaves ``conv_shortcut`` and ``downsamplers`` out of the default selection (``--include``
  names them back).
- ``--layers N``: ``layers_per_block`` = N (N res blocks, and attentions where the level has them, per down level,
  N + 1 per up level; the mid block and the number of levels stay), at most `MAX_LAYERS` (what the role rules
  name). A checkpoint is cut to N by keeping the first N res blocks/attentions of each down block and, of each up
  block, the first N and the last (the one that reads the previous level's downsampler output), so the skip
  connections keep their widths (`UNetFamily.truncate`).
- ``--sample-size S``: the latent size, a multiple of 2^(levels - 1) (8 at ldm4-cin256), at most 128; the network
  is convolutional, but the export fixes H and W (one file per resolution, as for every family).
- Graph inputs: ``hidden_states`` [B, 3, S, S] float (`UNet2DModel`'s ``sample`` argument, named as every family's
  latent input), ``timestep`` [B] int64 (the DDIM timesteps are integers; the model casts them to float for the
  sinusoid), ``class_labels`` [B] int64 (0..999, 1000 = null class). Output ``sample`` [B, 3, S, S] (epsilon). B is
  dynamic; S is fixed at export.
- Denoising (LDM's DDIM sampler, ``ldm/models/diffusion/ddim.py``, with classifier-free guidance as in LDM's cin256
  sampling notebook): `DDIMScheduler` with 1000 training steps and LDM's ``linear_start`` 0.0015 /
  ``linear_end`` 0.0195 (betas = linspace(sqrt(start), sqrt(end))^2: diffusers' ``scaled_linear``), epsilon
  prediction, ``clip_sample=False``, ``set_alpha_to_one=False`` (the last step's previous alpha is alphas_cumprod[0],
  as LDM's ``alphas_prev``), "leading" spacing with ``steps_offset=1`` (LDM's ``make_ddim_timesteps`` adds 1), eta 0
  (`DDIMScheduler.step`'s default); guidance 3.0 with the null class 1000; the pair is (null, class), unconditional
  first. Conditions: seeded latents (DDIM's ``init_noise_sigma`` is 1) and a seeded class in 0..999 per sample.
  No diffusers pipeline takes class labels for a `UNet2DModel` (`DDIMPipeline`, `LDMPipeline` are unconditional):
  `pipeline_class` is a note.
- Graphs without ``hn_export.family`` metadata that have exactly these inputs are taken as DiT graphs (DiT's inputs
  have the same names and DiT comes first in the registry); `hn-export export` always writes the metadata.

``--init dit-stats`` (`UNetFamily.plant_stats`, draws from `models.planting.planting_generator`): the pieces of
`models.planting` on a UNet's modules. Every GroupNorm in front of a site (res blocks' ``norm1`` -> SiLU -> conv1,
``norm2`` -> SiLU -> conv2, attentions' ``group_norm`` -> q/k/v) gets adaLN-like affine parameters from
`modulation_rows`: weight 1 + N(0, 0.15) with n = max(2, 1 %) outlier channels at +-U(6, 12), bias +-lognormal(0.25,
1.0) per channel (mean offsets, which the SiLU turns into skewed channels); ``conv_in``'s bias gets the residual
offsets with massive channels (`plant_residual_offsets`): they reach the level-0 skip connections (so the up
path's concatenations join tensors of different ranges, as in trained UNets) and the down path's shortcuts and
downsamplers; the time embedding's ``linear_2`` gets projection offsets and outlier rows
(`plant_projection_outliers`; the ``time_emb_proj`` input SiLU(t_emb + y_emb) hardly changes: the class embedding,
N(0, 1) per entry, dominates it); attention q and k x `ATTENTION_SHARPENING` = 1.5 (DiT's recipe takes 3, but the
planted outlier channels already sharpen the logits: unet-tiny's attention logit std per query is 0.2-0.3 plain,
1.2-2.5 with 1.5, 5-10 with 3, where the softmax is nearly one-hot). ``--init outliers`` zeroes every planted
offset (GroupNorm biases, ``conv_in`` bias with its massive channels, ``linear_2`` bias); outlier channels and
sharpening stay.

Measured (input statistics of each site's layer, channels of [B, C, H, W] inputs over B x H x W, as
`models.dit_stats.tensor_stats`, mean over the layers of a role; `make_inputs` batch 4, seed 1; model seed 0;
``time_emb_proj`` inputs are one token per sample: 4 tokens), plain / dit-stats / outliers:

unet-tiny (16x16 latent):

| role | mean spread | kurtosis | max/median absmax |
|---|---|---|---|
| resnet conv1 | 0.52 / 2.12 / 1.40 | 6.22 / 84.80 / 117.41 | 1.76 / 15.07 / 13.59 |
| resnet time-embed | 0.65 / 0.70 / 0.65 | 4.65 / 4.94 / 4.64 | 3.70 / 3.67 / 3.36 |
| resnet conv2 | 0.60 / 1.99 / 1.33 | 5.28 / 66.72 / 94.27 | 1.78 / 14.86 / 13.38 |
| downsample conv | 0.29 / 2.29 / 0.55 | 3.16 / 8.87 / 3.68 | 1.20 / 3.39 / 1.33 |
| skip conv | 0.56 / 1.78 / 0.69 | 3.98 / 8.92 / 4.34 | 2.06 / 3.44 / 2.01 |
| self-attn in | 0.65 / 1.66 / 1.04 | 3.03 / 50.14 / 47.75 | 1.46 / 12.29 / 9.96 |
| self-attn out | 1.41 / 1.88 / 0.97 | 2.76 / 3.01 / 3.75 | 2.15 / 2.01 / 2.13 |
| upsample conv | 0.94 / 1.45 / 0.84 | 3.50 / 3.05 / 3.35 | 1.89 / 2.19 / 1.75 |
| overall | 0.67 / 1.67 / 1.03 | 4.32 / 40.89 / 49.94 | 2.07 / 9.51 / 8.17 |

ldm4-cin256-reduced (192 / 384 / 576 wide, 32x32 latent):

| role | mean spread | kurtosis | max/median absmax |
|---|---|---|---|
| resnet conv1 | 0.61 / 2.34 / 1.16 | 6.03 / 118.05 / 195.20 | 2.07 / 19.81 / 15.23 |
| resnet time-embed | 0.73 / 0.78 / 0.73 | 5.58 / 5.57 / 5.57 | 4.07 / 4.55 / 3.97 |
| resnet conv2 | 0.67 / 1.95 / 1.16 | 5.46 / 97.61 / 170.16 | 2.08 / 16.41 / 14.41 |
| downsample conv | 0.58 / 1.54 / 0.74 | 3.06 / 9.24 / 3.30 | 1.50 / 2.96 / 1.97 |
| skip conv | 0.68 / 1.60 / 0.80 | 3.67 / 10.97 / 3.84 | 2.29 / 3.77 / 2.51 |
| self-attn in | 0.72 / 1.93 / 1.02 | 2.96 / 39.17 / 67.16 | 1.69 / 12.18 / 12.47 |
| self-attn out | 1.12 / 3.03 / 1.39 | 2.96 / 2.93 / 3.04 | 2.53 / 2.97 / 2.74 |
| upsample conv | 0.85 / 1.57 / 0.89 | 3.08 / 3.13 / 3.08 | 1.81 / 2.14 / 2.09 |
| overall | 0.73 / 1.88 / 1.03 | 4.30 / 47.56 / 78.28 | 2.32 / 10.72 / 9.53 |

The overall outlier ratio and mean spread are those of the DiT / PixArt recipes (`models.dit_stats`: PixArt 1152
wide 2.48 mean spread, 10.51 outlier ratio); the kurtosis of the res blocks' conv inputs is higher (SiLU after a
GroupNorm with outlier channels). Float16 stays finite: the largest site input is 47 (dit-stats) / 63 (outliers);
fp16 vs fp32 torch outputs differ by relative L2 2e-3 (tiny) / 1e-3 (reduced).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Any

from models.errors import ModelInputError
from models.families.base import BATCH, InputSpec, ModelFamily, Preset
from models.families.dit import NULL_CLASS, NUM_CLASSES, DiTFamily  # noqa: F401  (NULL_CLASS: LDM's 1001st row)

ATTENTION_SHARPENING = 1.5  # q and k x 1.5: logits x 2.25 (DiT's recipe: x 3; see the module docstring)
MAX_LAYERS = 3  # the largest layers_per_block the role rules name (up blocks then have resnets.0..3)

# LDM's DDIM sampler as a diffusers DDIMScheduler (see the module docstring)
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0015,
    beta_end=0.0195,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _levels(widths: tuple[int, ...], attention: tuple[bool, ...]) -> dict[str, Any]:
    """``block_out_channels`` and the down/up block types of levels with or without self-attention."""
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return dict(block_out_channels=widths, down_block_types=down, up_block_types=up)


LDM4_CIN256 = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    **_levels((192, 384, 576, 960), (False, True, True, True)),
    attention_head_dim=32,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    time_embedding_type="positional",
    flip_sin_to_cos=True,  # LDM's timestep_embedding is [cos, sin]
    freq_shift=0,
    downsample_type="conv",
    upsample_type="conv",
    resnet_time_scale_shift="default",
    num_class_embeds=NUM_CLASSES + 1,
)
# LDM-4's first three levels at their widths, attention at 32 and 16 as there; 32x32 latent (128 px)
REDUCED = dict(LDM4_CIN256, sample_size=32, **_levels((192, 384, 576), (False, True, True)))
TINY = dict(LDM4_CIN256, sample_size=16, layers_per_block=1, attention_head_dim=16, norm_num_groups=8,
            **_levels((32, 64), (False, True)))


def _role_rules() -> tuple[tuple[str, str, str], ...]:
    rules: list[tuple[str, str, str]] = []
    for j in range(MAX_LAYERS + 1):
        r = f"resnets.{j}"
        rules += [(f"{r}.conv1", f"{r}.conv1", "resnet conv1"),
                  (f"{r}.time_emb_proj", f"{r}.time_emb_proj", "resnet time-embed"),
                  (f"{r}.conv2", f"{r}.conv2", "resnet conv2"),
                  (f"{r}.conv_shortcut", f"{r}.conv_shortcut", "skip conv")]
    for j in range(MAX_LAYERS + 1):
        a = f"attentions.{j}"
        rules += [(f"{a}.to_q", f"{a}.qkv", "self-attn in"),
                  (f"{a}.to_k", f"{a}.qkv", "self-attn in"),
                  (f"{a}.to_v", f"{a}.qkv", "self-attn in"),
                  (f"{a}.to_out.0", f"{a}.out", "self-attn out")]
    rules += [("downsamplers.0.conv", "downsamplers.0.conv", "downsample conv"),
              ("upsamplers.0.conv", "upsamplers.0.conv", "upsample conv")]
    return tuple(rules)


ROLE_RULES = _role_rules()
INPUTS = ("hidden_states", "timestep", "class_labels")


def _upsample(module, hidden_states, output_size=None, *args, **kwargs):
    """`Upsample2D.forward` (nearest x 2, then the 3x3 conv) without its ``.contiguous()`` branches on the batch
    size and element count: they are memory-layout workarounds (same values), but torch.export turns them into a
    guard ``batch <= 63`` that fails the dynamic batch axis (`Constraints violated (batch)`)."""
    import torch.nn.functional as F

    if output_size is None:
        hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
    else:
        hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
    return module.conv(hidden_states)


@contextlib.contextmanager
def _plain_upsampling(model):
    """Run the model's convolutional nearest-neighbour upsamplers through `_upsample` (instance attribute,
    removed on exit); other upsampler kinds keep diffusers' forward."""
    from diffusers.models.upsampling import Upsample2D

    patched = [m for m in model.modules()
               if type(m) is Upsample2D and m.interpolate and m.use_conv and not m.use_conv_transpose
               and m.norm is None and m.name == "conv"]
    for module in patched:
        module.forward = functools.partial(_upsample, module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


class UNetFamily(ModelFamily):
    name = "unet"
    class_name = "UNet2DModel"
    pipeline_class = "none (no diffusers pipeline takes class labels for a UNet2DModel)"
    description = "LDM-4 class-conditional UNet (UNet2DModel + class embedding, ImageNet 256, DDIM)"
    demo_preset = "ldm4-cin256-reduced"
    presets = {
        "ldm4-cin256": Preset(LDM4_CIN256, "LDM-4 cin256 UNet: 64x64x3 latent, 192 x (1, 2, 3, 5), 2 res blocks, "
                                           "attention at 32/16/8, 32 per head"),
        "ldm4-cin256-reduced": Preset(REDUCED, "LDM-4's first three levels (192, 384, 576; attention at the two "
                                               "lower), 32x32x3 latent"),
        "unet-tiny": Preset(TINY, "test model: 2 levels (32, 64), 1 res block, 16x16 latent"),
    }
    block_lists = ("down_blocks", "mid_block", "up_blocks")
    role_rules = ROLE_RULES
    hadamard_widths = (192, 384, 576, 768, 960, 1152, 1536, 1920)
    layers_key = "layers_per_block"
    max_sample_size = 128
    guidance_scale = 3.0  # LDM's cin256 classifier-free-guidance sampling
    scheduler_class = "DDIMScheduler"
    scheduler_settings = SCHEDULER
    graph_inputs = frozenset(INPUTS)
    default_exclude = (r"[./]conv_shortcut$", r"[./]downsamplers[./]")
    timestep_input = "timestep"

    # ---------------------------------------------------------------- building
    def accepts_config(self, class_name: str | None, cfg: Mapping[str, Any]) -> bool:
        """A class-conditional `UNet2DModel` (a learned class embedding table; unconditional UNets have no
        ``class_labels`` input)."""
        return (class_name == self.class_name and cfg.get("num_class_embeds") is not None
                and cfg.get("class_embed_type") is None)

    def set_layers(self, kwargs: dict[str, Any], layers: int) -> None:
        self._check_layers(layers)
        kwargs[self.layers_key] = layers

    def _check_layers(self, layers: int) -> None:
        if layers > MAX_LAYERS:
            raise ModelInputError(f"layers_per_block {layers} is more than the {MAX_LAYERS} the unet role rules name",
                                  f"pass --layers {MAX_LAYERS} or fewer")

    def truncate(self, model, layers: int) -> None:
        """Keep `layers` res blocks per down level (and attentions), `layers` + 1 per up level: the first ones and
        the last, which reads the previous level's downsampler output (so every skip keeps its width)."""
        from torch import nn

        if layers >= model.config.layers_per_block:
            return
        for block in model.down_blocks:
            for name in ("resnets", "attentions"):
                if hasattr(block, name):
                    setattr(block, name, nn.ModuleList(list(getattr(block, name))[:layers]))
        for block in model.up_blocks:
            for name in ("resnets", "attentions"):
                if hasattr(block, name):
                    modules = list(getattr(block, name))
                    setattr(block, name, nn.ModuleList(modules[:layers] + modules[-1:]))
        model.register_to_config(layers_per_block=layers)

    def patch_size(self, cfg: Mapping[str, Any]) -> int:
        """The multiple the latent size must be: one halving per level below the first."""
        return 2 ** (len(cfg.get("block_out_channels", (0,) * 4)) - 1)

    def latent_size(self, model) -> int:
        size = model.config.sample_size
        if isinstance(size, (list, tuple)):
            size = size[0]
        return int(size)

    def check_model(self, model) -> None:
        cfg = model.config
        if model.class_embedding is None or cfg.class_embed_type is not None:
            raise ModelInputError("the UNet2DModel has no class embedding table (num_class_embeds)",
                                  "pass a class-conditional UNet2DModel config (num_class_embeds 1001)")
        size = cfg.sample_size
        if size is None or (isinstance(size, (list, tuple)) and len(set(size)) != 1):
            raise ModelInputError(f"the UNet2DModel's sample_size is {size}; the export needs a square latent size",
                                  "pass --sample-size S")
        self._check_layers(int(cfg.layers_per_block))

    def plant_stats(self, model, seed: int, offsets: bool) -> None:
        """UNet activation statistics from the `models.planting` pieces (see the module docstring); deterministic
        for `seed`, global RNG untouched."""
        import torch

        from models.planting import (
            modulation_rows,
            plant_projection_outliers,
            plant_residual_offsets,
            planting_generator,
            sharpen_attention,
        )

        gen = planting_generator(seed)
        keep = 1.0 if offsets else 0.0  # multiplies every planted offset (draws unchanged: the same outliers)

        def plant_norm(norm) -> None:
            if norm is None or norm.weight is None:
                return
            shift, scale, _gate = modulation_rows(gen, norm.num_channels, keep, pairs=1)
            norm.weight.copy_((1.0 + scale).to(norm.weight.dtype))
            norm.bias.copy_(shift.to(norm.bias.dtype))

        blocks = [*model.down_blocks, *([model.mid_block] if model.mid_block is not None else []), *model.up_blocks]
        with torch.no_grad():
            plant_residual_offsets(gen, model.conv_in.bias, keep)
            plant_projection_outliers(gen, model.time_embedding.linear_2, keep)
            for block in blocks:
                for resnet in block.resnets:
                    plant_norm(resnet.norm1)
                    plant_norm(resnet.norm2)
                for attn in getattr(block, "attentions", None) or []:
                    if attn is None:
                        continue
                    plant_norm(attn.group_norm)
                    sharpen_attention([attn.to_q, attn.to_k], ATTENTION_SHARPENING)

    # ---------------------------------------------------------------- export
    def input_specs(self, model, with_mask: bool) -> tuple[InputSpec, ...]:
        return tuple(InputSpec(name, {0: BATCH}) for name in INPUTS)

    def example_inputs(self, model, batch: int, caption_length: int, seed: int, dtype, with_mask: bool) -> dict:
        import torch

        gen = torch.Generator().manual_seed(seed)
        s = self.latent_size(model)
        return {
            "hidden_states": torch.randn(batch, model.config.in_channels, s, s, generator=gen).to(dtype),
            "timestep": torch.randint(0, 1000, (batch,), generator=gen, dtype=torch.int64),
            "class_labels": torch.randint(0, NUM_CLASSES, (batch,), generator=gen, dtype=torch.int64),
        }

    def forward(self, model, inputs: Mapping[str, Any]):
        """`UNet2DModel.forward(sample, timestep, class_labels)`: the latent input is its ``sample``. The upsamplers
        run without their batch-size branches (`_plain_upsampling`), so that torch.export keeps the batch dynamic."""
        with _plain_upsampling(model):
            return model(inputs["hidden_states"], inputs["timestep"], class_labels=inputs["class_labels"],
                         return_dict=False)[0]

    # ---------------------------------------------------------------- denoising
    # DiT's class-conditional pair: seeded latents (DDIM's init_noise_sigma is 1), labels (null class, class), whole
    # timesteps; input files checked the same way (timesteps 0..999, labels 0..1000)
    conditions = DiTFamily.conditions
    feeds = DiTFamily.feeds
    check_input_arrays = DiTFamily.check_input_arrays


UNET = UNetFamily()

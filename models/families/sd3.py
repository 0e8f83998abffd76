"""Stable Diffusion 3 / 3.5 medium (diffusers `SD3Transformer2DModel` in `StableDiffusion3Pipeline`).

- Architecture (MMDiT): 24 blocks, 24 heads x 64 = 1536 wide (12 x 128), FFN 6144, latent [16, S, S] (S = pixels /
  8), patch 2; captions ``encoder_hidden_states`` [B, L, 4096] (CLIP-L/G + T5-XXL features) go through
  ``context_embedder`` to 1536 wide text tokens; ``pooled_projections`` [B, 2048] (the pooled CLIP features) and the
  timestep make the conditioning embedding ``temb``. Positional embedding: a sin-cos table of pos_embed_max_size^2
  patches (SD3: 192, SD3.5: 384), centre-cropped to the latent (a persistent buffer: checkpoints load their own;
  presets compute it with base size S / 2).
- Blocks (``transformer_blocks.i``, `JointTransformerBlock`): two streams, image and context (text), each with its
  own adaLN-Zero modulation (``norm1``, ``norm1_context``), q/k/v projections (``attn.to_q/k/v`` and
  ``attn.add_q/k/v_proj``), attention output (``attn.to_out.0``, ``attn.to_add_out``) and FFN (``ff``,
  ``ff_context``); one joint attention over the concatenated tokens. The last block is ``context_pre_only``: no
  ``to_add_out`` or ``ff_context``, and its ``norm1_context`` is `AdaLayerNormContinuous` (scale, shift). SD3.5
  medium: blocks 0-12 also have ``attn2`` (a second, image-only self-attention; ``norm1`` is `SD35AdaLayerNormZeroX`
  with 9 modulation rows) and every attention has RMS q/k norms.
- Sites per block (roles as `hn-export layers` prints them): adaLN in twice (``norm1.linear`` and
  ``norm1_context.linear`` read silu(temb) [B, 1536], one token per sample; two sites, because the dynamo exporter
  computes that silu once and the TorchScript exporter twice in the last block, and each exporter must give the
  same sites; both write them as ``Gemm``), image qkv in, context qkv in, image attn out, context attn out, image
  ffn in, image ffn out, context ffn in, context ffn out (10 sites; the last block, ``context_pre_only``, has 7),
  and with dual attention image attn2 qkv in and image attn2 out. Widths: 1536 (12 x 128) and 6144 (12 x 512).
- Graph inputs: ``hidden_states`` [B, 16, S, S], ``timestep`` [B] (the scheduler's timestep, sigma x 1000, as the
  pipeline passes it), ``encoder_hidden_states`` [B, L, 4096], ``pooled_projections`` [B, 2048]; B and L dynamic.
- Denoising (`StableDiffusion3Pipeline`): `FlowMatchEulerDiscreteScheduler` with the released scheduler_config.json
  of SD3 and SD3.5 medium (1000 train timesteps, shift 3.0), classifier-free guidance 7.0 (pair: unconditional
  first), no learned sigma. Conditions: seeded latents, random caption features (std 0.2, like T5 outputs) and
  pooled features (std 0.5).

``--init dit-stats`` (`SD3Family.plant_stats`), measured with `models.dit_stats.summary` (model seed 0, inputs
seed 1: batch 4, caption length 16; stats of the input of every linear in ``transformer_blocks``, averaged over a
role) by ``python -m models.dit_stats --preset P [--layers N --sample-size S]``.

sd3-medium-256 with 2 layers (1536 wide, 256 image tokens; the three inits in 78 s on 2 cores), plain / dit-stats /
outliers:

| role | mean spread | kurtosis | max/median absmax |
|---|---|---|---|
| image qkv in | 0.95 / 2.49 / 1.13 | 2.90 / 24.38 / 52.17 | 1.59 / 12.98 / 12.52 |
| context qkv in | 0.16 / 4.00 / 0.75 | 3.03 / 169.90 / 53.73 | 1.71 / 29.86 / 14.13 |
| image attn out | 12.12 / 3.72 / 1.45 | 3.11 / 3.12 / 3.29 | 4.47 / 3.20 / 2.37 |
| context attn out | 11.59 / 3.23 / 1.19 | 3.17 / 3.27 / 3.45 | 4.73 / 3.61 / 3.00 |
| image ffn in | 0.96 / 2.73 / 1.36 | 2.90 / 29.71 / 76.41 | 1.60 / 14.39 / 13.81 |
| image ffn out | 0.93 / 3.72 / 1.34 | 6.11 / 54.28 / 177.53 | 2.31 / 23.53 / 16.07 |
| context ffn in | 0.17 / 3.48 / 1.45 | 3.02 / 37.23 / 77.68 | 1.76 / 15.49 / 19.32 |
| context ffn out | 0.17 / 4.45 / 1.32 | 6.13 / 38.68 / 101.11 | 2.10 / 33.02 / 16.95 |
| adaLN in | 1.09 / 1.09 / 1.09 | 3.35 / 3.35 / 3.35 | 4.20 / 4.20 / 4.20 |
| overall | 2.04 / 2.99 / 1.12 | 3.42 / 57.30 / 53.82 | 2.48 / 16.33 / 11.22 |
| block contribution | 0.016 / 0.416 / 0.512 | | |

Overall (mean spread, kurtosis, outlier ratio) and block contribution, plain / dit-stats / outliers:

- sd35-medium-512 with 2 layers at sample size 32 (both blocks with attn2; 166 s): 1.80 / 3.16 / 1.18, 3.31 / 34.51
  / 67.83, 2.44 / 14.10 / 12.50; block contribution 0.022 / 0.522 / 0.757 (image attn2 qkv in: mean spread 0.96 /
  2.57 / 1.28, kurtosis 2.91 / 25.12 / 78.38);
- sd3-tiny: 1.28 / 2.98 / 0.94, 3.28 / 14.49 / 34.95, 1.96 / 8.34 / 7.91; block contribution 0.031 / 0.345 / 0.747;
- sd35-tiny: 1.17 / 2.90 / 0.95, 3.16 / 22.42 / 41.67, 1.85 / 9.91 / 9.09; block contribution 0.041 / 0.418 / 0.698.

The adaLN inputs (silu(temb): one token per sample) are not planted: the same under every init. Attention
sharpness (mean over query rows of the std of the attention logits, inputs as above, batch 2), plain -> dit-stats:
sd3-medium-256 (2 layers) 0.25 -> 2.1-2.25; sd35-medium-512 (2 layers) 0.72 -> 1.6-2.0; sd3-tiny 0.3 -> 2.9-3.6.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.errors import ModelInputError
from models.families.base import (
    BATCH,
    CAPTION_LENGTH,
    DenoiseSettings,
    InputSpec,
    ModelFamily,
    Preset,
    Signature,
)

# scheduler_config.json of stabilityai/stable-diffusion-3-medium-diffusers and stable-diffusion-3.5-medium
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

SD3_MEDIUM = dict(
    num_layers=24,
    num_attention_heads=24,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    patch_size=2,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
SD35_MEDIUM = dict(SD3_MEDIUM, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# 2 heads x 36 = 72 wide (36 x 2), FFN 288 (36 x 8); 8x8 latent (16 tokens)
SD3_TINY = dict(SD3_MEDIUM, num_layers=2, num_attention_heads=2, attention_head_dim=36, joint_attention_dim=32,
                caption_projection_dim=72, pooled_projection_dim=16, pos_embed_max_size=16, sample_size=8)
SD35_TINY = dict(SD3_TINY, dual_attention_layers=(0,), qk_norm="rms_norm")

ROLE_RULES = (
    ("attn.to_q", "attn.qkv", "image qkv in"),
    ("attn.to_k", "attn.qkv", "image qkv in"),
    ("attn.to_v", "attn.qkv", "image qkv in"),
    ("attn.add_q_proj", "attn.add_qkv", "context qkv in"),
    ("attn.add_k_proj", "attn.add_qkv", "context qkv in"),
    ("attn.add_v_proj", "attn.add_qkv", "context qkv in"),
    ("attn.to_out.0", "attn.out", "image attn out"),
    ("attn.to_add_out", "attn.add_out", "context attn out"),
    ("attn2.to_q", "attn2.qkv", "image attn2 qkv in"),
    ("attn2.to_k", "attn2.qkv", "image attn2 qkv in"),
    ("attn2.to_v", "attn2.qkv", "image attn2 qkv in"),
    ("attn2.to_out.0", "attn2.out", "image attn2 out"),
    ("ff.net.0.proj", "ff.in", "image ffn in"),
    ("ff.net.2", "ff.out", "image ffn out"),
    ("ff_context.net.0.proj", "ff_context.in", "context ffn in"),
    ("ff_context.net.2", "ff_context.out", "context ffn out"),
    ("norm1.linear", "norm1", "adaLN in"),
    ("norm1_context.linear", "norm1_context", "adaLN in"),
)
INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")
CAPTION_SCALE = 0.2  # random caption features: T5 outputs are small (as the PixArt and Flux loops use)
POOLED_SCALE = 0.5  # random pooled CLIP features
SHARPEN_QK = 2.5  # q/k projection factor without q/k norm (see the logit std measurements above)
SHARPEN_QK_NORM = 2.0  # RMS q/k norm weight factor with q/k norm


def _preset(base: dict[str, Any], sample_size: int, what: str) -> Preset:
    return Preset(dict(base, sample_size=sample_size), f"{what}, {8 * sample_size} px ({sample_size}x{sample_size} "
                                                       "latent)")


class SD3Family(ModelFamily):
    name = "sd3"
    class_name = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    description = "Stable Diffusion 3 / 3.5 medium (SD3Transformer2DModel, MMDiT joint attention, flow matching)"
    demo_preset = "sd3-medium-256"
    presets = {
        "sd3-medium-256": _preset(SD3_MEDIUM, 32, "SD3-medium (24 blocks, 1536 wide)"),
        "sd3-medium-512": _preset(SD3_MEDIUM, 64, "SD3-medium (24 blocks, 1536 wide)"),
        "sd3-medium-1024": _preset(SD3_MEDIUM, 128, "SD3-medium (24 blocks, 1536 wide)"),
        "sd35-medium-512": _preset(SD35_MEDIUM, 64, "SD3.5-medium (24 blocks, 1536 wide, attn2 in blocks 0-12)"),
        "sd35-medium-1024": _preset(SD35_MEDIUM, 128, "SD3.5-medium (24 blocks, 1536 wide, attn2 in blocks 0-12)"),
        "sd3-tiny": Preset(SD3_TINY, "test model: 2 blocks, 72 wide, 8x8 latent"),
        "sd35-tiny": Preset(SD35_TINY, "test model: 2 blocks, 72 wide, 8x8 latent, attn2 in block 0, RMS q/k norm"),
    }
    role_rules = ROLE_RULES
    hadamard_widths = (1536, 6144)
    guidance_scale = 7.0  # StableDiffusion3Pipeline's default
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    scheduler_settings = SCHEDULER
    graph_inputs = frozenset(INPUTS)
    max_sample_size = 768  # SD3.5: pos_embed_max_size 384 x patch 2 (check_model checks the model's own limit)

    # ---------------------------------------------------------------- building
    def prepare_config(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if "dual_attention_layers" in kwargs:
            kwargs["dual_attention_layers"] = tuple(kwargs["dual_attention_layers"])
        return kwargs

    def check_model(self, model) -> None:
        cfg = model.config
        limit = cfg.pos_embed_max_size * cfg.patch_size
        if self.latent_size(model) > limit:
            raise ModelInputError(
                f"sample size {self.latent_size(model)} is larger than this model's positional embedding allows "
                f"({cfg.pos_embed_max_size} patches of {cfg.patch_size} = {limit})",
                f"pass --sample-size {limit} or less")

    def plant_stats(self, model, seed: int, offsets: bool) -> None:
        """The DiT-like recipe of `models.planting` on SD3's modules:

        - residual streams: ``pos_embed.proj`` bias (image tokens) gets the planted per-channel offsets and massive
          channels; ``context_embedder`` (text tokens) the projection offsets and outlier rows;
        - attention: without q/k norms, q and k projections of both streams (and ``attn2``) x SHARPEN_QK; with RMS
          q/k norms (SD3.5) scaling the projections does nothing, so the norm weights x SHARPEN_QK_NORM;
        - adaLN: every modulation linear gets planted rows as its bias and 0.1 x its weight (`plant_adaln_linear`)
          in its chunk order: ``norm1`` (`AdaLayerNormZero`: shift, scale, gate of attention, then of the FFN;
          `SD35AdaLayerNormZeroX` adds shift, scale, gate of ``attn2``), ``norm1_context`` (the same 6 rows, or
          `AdaLayerNormContinuous` scale, shift in the last block), ``norm_out`` (scale, shift);
        - FFN up-projections of both streams: `plant_ffn_up`.

        ``offsets=False`` (``--init outliers``): the same draws with every planted mean offset zero.
        """
        import torch

        from models.planting import (
            modulation_rows,
            plant_adaln_linear,
            plant_ffn_up,
            plant_projection_outliers,
            plant_residual_offsets,
            planting_generator,
            sharpen_attention,
        )

        gen = planting_generator(seed)
        keep = 1.0 if offsets else 0.0
        d = model.config.num_attention_heads * model.config.attention_head_dim
        with torch.no_grad():
            plant_residual_offsets(gen, model.pos_embed.proj.bias, keep)
            plant_projection_outliers(gen, model.context_embedder, keep)
            for block in model.transformer_blocks:
                attns = [a for a in (block.attn, block.attn2) if a is not None]
                for attn in attns:
                    if attn.norm_q is not None:
                        for norm in (attn.norm_q, attn.norm_k, getattr(attn, "norm_added_q", None),
                                     getattr(attn, "norm_added_k", None)):
                            if norm is not None and getattr(norm, "weight", None) is not None:
                                norm.weight.mul_(SHARPEN_QK_NORM)
                    else:
                        projections = [attn.to_q, attn.to_k, getattr(attn, "add_q_proj", None),
                                       getattr(attn, "add_k_proj", None)]
                        sharpen_attention([p for p in projections if p is not None], SHARPEN_QK)
                if block.attn2 is not None:  # SD35AdaLayerNormZeroX: attention, FFN, attn2
                    s1, c1, s2, c2, s3, c3, g1, g2, g3 = modulation_rows(gen, d, keep, pairs=3)
                    plant_adaln_linear(block.norm1.linear, [s1, c1, g1, s2, c2, g2, s3, c3, g3])
                else:
                    shift_msa, scale_msa, shift_mlp, scale_mlp, gate_msa, gate_mlp = modulation_rows(gen, d, keep)
                    plant_adaln_linear(block.norm1.linear,
                                       [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp])
                if block.context_pre_only:  # AdaLayerNormContinuous: scale, shift
                    shift, scale, _gate = modulation_rows(gen, d, keep, pairs=1)
                    plant_adaln_linear(block.norm1_context.linear, [scale, shift])
                else:
                    shift_msa, scale_msa, shift_mlp, scale_mlp, gate_msa, gate_mlp = modulation_rows(gen, d, keep)
                    plant_adaln_linear(block.norm1_context.linear,
                                       [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp])
                plant_ffn_up(gen, block.ff.net[0].proj, keep)
                if block.ff_context is not None:
                    plant_ffn_up(gen, block.ff_context.net[0].proj, keep)
            shift, scale, _gate = modulation_rows(gen, d, keep, pairs=1)
            plant_adaln_linear(model.norm_out.linear, [scale, shift])

    # ---------------------------------------------------------------- export
    def input_specs(self, model, with_mask: bool) -> tuple[InputSpec, ...]:
        return (
            InputSpec("hidden_states", {0: BATCH}),
            InputSpec("timestep", {0: BATCH}),
            InputSpec("encoder_hidden_states", {0: BATCH, 1: CAPTION_LENGTH}),
            InputSpec("pooled_projections", {0: BATCH}),
        )

    def example_inputs(self, model, batch: int, caption_length: int, seed: int, dtype, with_mask: bool) -> dict:
        import torch

        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        s = self.latent_size(model)
        return {
            "hidden_states": torch.randn(batch, cfg.in_channels, s, s, generator=gen).to(dtype),
            "timestep": (torch.rand(batch, generator=gen) * 1000.0).to(dtype),
            "encoder_hidden_states": (CAPTION_SCALE * torch.randn(batch, caption_length, cfg.joint_attention_dim,
                                                                  generator=gen)).to(dtype),
            "pooled_projections": (POOLED_SCALE * torch.randn(batch, cfg.pooled_projection_dim,
                                                              generator=gen)).to(dtype),
        }

    # ---------------------------------------------------------------- denoising
    def conditions(self, sig: Signature, settings: DenoiseSettings, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([settings.seed, index])
        length = sig.fixed_caption_length or settings.caption_length
        pooled = sig.dim("pooled_projections", 1)
        return {
            "latents": rng.standard_normal((1, *sig.latent_shape)).astype(np.float32),
            "captions": (CAPTION_SCALE * rng.standard_normal((2, length, sig.caption_channels))).astype(np.float32),
            "pooled": (POOLED_SCALE * rng.standard_normal((2, pooled))).astype(np.float32),
        }

    def feeds(self, sig: Signature, latents: np.ndarray, timestep: float, cond: Mapping[str, np.ndarray]) -> dict:
        captions = cond["captions"]
        batch = captions.shape[0]
        dtype = lambda name: sig.dtypes.get(name, sig.dtype)
        return {
            "hidden_states": np.repeat(latents, batch, axis=0).astype(dtype("hidden_states")),
            "timestep": np.full((batch,), timestep, dtype=dtype("timestep")),
            "encoder_hidden_states": captions.astype(dtype("encoder_hidden_states")),
            "pooled_projections": cond["pooled"].astype(dtype("pooled_projections")),
        }


SD3 = SD3Family()

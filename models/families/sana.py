"""Sana (diffusers `SanaTransformer2DModel` in `SanaPipeline`): linear attention and a convolutional FFN.

- Architecture (Efficient-Large-Model/Sana_600M_*_diffusers and Sana_1600M_*_diffusers, as diffusers'
  ``scripts/convert_sana_to_diffusers.py`` writes them): latent [32, S, S] of the DC-AE f32c32 autoencoder (S =
  pixels / 32: 16 at 512 px, 32 at 1024 px), patch 1 (one token per latent pixel), no positional embedding at 512 and
  1024 px (``interpolation_scale`` None), 32 output channels (no learned sigma). Sana 600M: 28 blocks, 36 heads x 32
  = 1152 wide, cross-attention 16 heads x 72 (591,747,872 parameters); Sana 1.6B: 20 blocks, 70 heads x 32 = 2240
  wide, cross-attention 20 heads x 112 (1,604,462,752 parameters). Captions: Gemma-2 2B features
  ``encoder_hidden_states`` [B, L, 2304] -> ``caption_projection`` (linear, GELU tanh, linear) -> ``caption_norm``
  (RMSNorm) -> the text tokens every block's cross-attention reads.
  Timestep: ``time_embed`` (`AdaLayerNormSingle`: sinusoid -> ``emb.timestep_embedder.linear_1/2`` -> SiLU ->
  ``time_embed.linear``, the 6 x D modulation shared by all blocks); each block adds its own ``scale_shift_table``
  [6, D] (rows shift, scale, gate of the self-attention, then of the FFN); the output norm uses the model's
  ``scale_shift_table`` [2, D] (shift, scale) and ``proj_out``. These layers outside the blocks are not default sites.
- Blocks (``transformer_blocks.i``, `SanaTransformerBlock`): LayerNorm + modulation -> self-attention ``attn1``
  (ReLU linear attention, `SanaLinearAttnProcessor2_0`: no softmax, O(N) in the tokens; q/k/v without bias) ->
  gated residual; cross-attention ``attn2`` (softmax, `SanaAttnProcessor2_0`) reads the residual stream itself (no
  norm in front of it) and the text tokens, ungated residual; LayerNorm + modulation -> `GLUMBConv` FFN on the token
  grid [B, D, S, S]: ``ff.conv_inverted`` (1x1 conv D -> 2 x hidden, SiLU), ``ff.conv_depth`` (3x3 depthwise conv
  over the 2 x hidden channels), split into value and gate (value x SiLU(gate), hidden channels), ``ff.conv_point``
  (1x1 conv hidden -> D, no bias) -> gated residual; hidden = 2.5 x D. 7 activation sites per block (widths = the
  site's input channels, Sana 600M / 1.6B):

  | site | layers | role | width |
  |---|---|---|---|
  | attn1.qkv | attn1.to_q, to_k, to_v | self-attn in | 1152 / 2240 |
  | attn1.out | attn1.to_out.0 | self-attn out | 1152 / 2240 |
  | attn2.q | attn2.to_q | cross-attn q | 1152 / 2240 |
  | attn2.kv | attn2.to_k, to_v (the normalised text tokens) | cross-attn kv | 1152 / 2240 |
  | attn2.out | attn2.to_out.0 (16 x 72 / 20 x 112) | cross-attn out | 1152 / 2240 |
  | ff.in | ff.conv_inverted (1x1 conv) | ffn in | 1152 / 2240 |
  | ff.out | ff.conv_point (1x1 conv) | ffn out | 2880 / 5600 |

  ``ff.conv_depth`` is a grouped (depthwise) conv: not a site. The two FFN sites are 1x1 convolutions (channels on
  axis 1 of an NCHW tensor; `graph_passes.linears` finds them from the Conv node's module path, as linears). The
  linear self-attention needs no site of its own (no softmax; its q/k/v and output are linears). Hadamard
  constructions of the
  widths (`graph_passes.hadamard`): 1152 = 36 (Paley II, q = 17) x 32, 2240 = 140 (Paley I, q = 139) x 16, 2880 = 180
  (Paley I, q = 179) x 16, 5600 = 700 (Paley II, q = 349) x 8.
- Graph inputs: ``hidden_states`` [B, 32, S, S], ``timestep`` [B] float (the scheduler's timestep, sigma x 1000,
  as `SanaPipeline` passes it with ``timestep_scale`` 1), ``encoder_hidden_states`` [B, L, 2304]; B and L dynamic.
  ``--with-mask`` adds ``encoder_attention_mask`` [B, L] (1 keep, 0 drop; only the cross-attention uses it, the
  linear self-attention has no mask); unlike PixArt's, this export keeps B and L dynamic (torch.export traces
  Sana's mask path with dynamic shapes). `SanaPipeline` passes the Gemma tokenizer's mask (captions padded to 300
  tokens), so ``--with-mask`` is what a drop-in for the pipeline wants; without the input every caption token is
  attended, which equals a mask of ones (what hn-export's own denoising loop feeds).
- Denoising (`SanaPipeline`): `DPMSolverMultistepScheduler` with the released scheduler_config.json (flow matching:
  ``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``, ``flow_shift`` 3.0 at 512 and 1024 px,
  DPM-Solver++ 2M, final sigma zero), classifier-free guidance 4.5 (pair: unconditional first), no learned sigma.
  Conditions: seeded latents and random caption features (std `CAPTION_SCALE`: ``caption_norm`` RMS-normalises the
  projected captions, so their scale matters little). `SanaPipeline`'s captions are 300 tokens
  (``max_sequence_length``); hn-export's loop uses the run's caption length (`DenoiseSettings.caption_length`).
- Not covered: Sana-Sprint (``guidance_embeds``: a guidance input and the SCM scheduler) is refused by
  `SanaFamily.check_model`; Sana 1.5 (``qk_norm="rms_norm_across_heads"``) has no preset: from a config or
  checkpoint it builds and runs (the RMS q/k norms are not linears: same sites; checked on the tiny config, not
  exported here). Graphs without hn-export's metadata have PixArt-Sigma's input names,
  so name matching takes them for PixArt-Sigma (registered first).

``--init dit-stats`` (`SanaFamily.plant_stats`): see its docstring and the measurements there.
"""

from __future__ import annotations

import types
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
from models.families.pixart import PixArtFamily

# scheduler/scheduler_config.json of the released Efficient-Large-Model/Sana_*_diffusers pipelines (seen for
# Sana_1600M_512px, Sana_1600M_1024px_MultiLing, Sana_1600M_2Kpx_BF16; diffusers' conversion script writes flow_shift
# 3.0 below 4096 px, 6.0 at 4096 px); the beta settings it also holds are unused with flow sigmas
SCHEDULER = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    final_sigmas_type="zero",
)

COMMON = dict(
    in_channels=32,
    out_channels=32,
    attention_head_dim=32,
    caption_channels=2304,
    mlp_ratio=2.5,
    attention_bias=False,
    patch_size=1,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=None,
)
SANA_600M = dict(COMMON, num_layers=28, num_attention_heads=36, num_cross_attention_heads=16,
                 cross_attention_head_dim=72, cross_attention_dim=1152)
SANA_1600M = dict(COMMON, num_layers=20, num_attention_heads=70, num_cross_attention_heads=20,
                  cross_attention_head_dim=112, cross_attention_dim=2240)
# 2 heads x 36 = 72 wide, cross-attention 2 x 36, FFN hidden 180 (2.5 x 72); 8x8 latent (64 tokens)
SANA_TINY = dict(COMMON, num_layers=2, num_attention_heads=2, attention_head_dim=36, num_cross_attention_heads=2,
                 cross_attention_head_dim=36, cross_attention_dim=72, caption_channels=32, sample_size=8)

ROLE_RULES = (
    ("attn1.to_q", "attn1.qkv", "self-attn in"),
    ("attn1.to_k", "attn1.qkv", "self-attn in"),
    ("attn1.to_v", "attn1.qkv", "self-attn in"),
    ("attn1.to_out.0", "attn1.out", "self-attn out"),
    ("attn2.to_q", "attn2.q", "cross-attn q"),
    ("attn2.to_k", "attn2.kv", "cross-attn kv"),
    ("attn2.to_v", "attn2.kv", "cross-attn kv"),
    ("attn2.to_out.0", "attn2.out", "cross-attn out"),
    ("ff.conv_inverted", "ff.in", "ffn in"),
    ("ff.conv_point", "ff.out", "ffn out"),
)
INPUTS = ("hidden_states", "timestep", "encoder_hidden_states")
CAPTION_SCALE = 1.0  # random Gemma-2 features (caption_norm RMS-normalises them after the projection)
SHARPEN_CROSS_QK = 3.0  # cross-attention q/k factor of --init dit-stats (logit std ~2-3, see plant_stats)


def _preset(base: dict[str, Any], sample_size: int, what: str) -> Preset:
    return Preset(dict(base, sample_size=sample_size),
                  f"{what}, {32 * sample_size} px ({sample_size}x{sample_size} latent)")


class SanaFamily(ModelFamily):
    name = "sana"
    class_name = "SanaTransformer2DModel"
    pipeline_class = "SanaPipeline"
    description = "Sana (SanaTransformer2DModel, linear attention, GLUMBConv FFN, flow-matching DPM-Solver++)"
    attention_note = ("self-attention is ReLU linear attention (no softmax, already O(N) in the tokens): kept as it "
                      "is; the cross-attention is softmax attention")
    demo_preset = "sana-600m-512"
    presets = {
        "sana-600m-512": _preset(SANA_600M, 16, "Sana 600M (28 blocks, 1152 wide)"),
        "sana-600m-1024": _preset(SANA_600M, 32, "Sana 600M (28 blocks, 1152 wide)"),
        "sana-1600m-512": _preset(SANA_1600M, 16, "Sana 1.6B (20 blocks, 2240 wide)"),
        "sana-1600m-1024": _preset(SANA_1600M, 32, "Sana 1.6B (20 blocks, 2240 wide)"),
        "sana-tiny": Preset(SANA_TINY, "test model: 2 blocks, 72 wide, 8x8 latent"),
    }
    role_rules = ROLE_RULES
    hadamard_widths = (1152, 2240, 2880, 5600)
    guidance_scale = 4.5  # SanaPipeline's default
    scheduler_class = "DPMSolverMultistepScheduler"
    scheduler_settings = SCHEDULER
    supports_mask = True
    max_sample_size = 128  # Sana 4K: 4096 px / 32

    # ---------------------------------------------------------------- building
    def patch_size(self, cfg: Mapping[str, Any]) -> int:
        return int(cfg.get("patch_size", 1) or 1)

    def check_model(self, model) -> None:
        if model.config.get("guidance_embeds"):
            raise ModelInputError("Sana-Sprint models (guidance_embeds) are not supported: they take a guidance "
                                  "input and use the SCM scheduler", "export a Sana model without guidance_embeds")

    def plant_stats(self, model, seed: int, offsets: bool) -> None:
        """The DiT-like recipe of `models.planting` on Sana's modules:

        - residual stream: ``patch_embed.proj`` bias (Sana has no positional embedding) gets the planted per-channel
          offsets and massive channels (`plant_residual_offsets`); they reach the self-attention and FFN inputs
          through the modulated LayerNorms and the cross-attention query directly (it reads the residual stream);
        - text tokens: ``caption_projection.linear_2`` gets bias offsets and outlier rows
          (`plant_projection_outliers`), kept through ``caption_norm`` (an RMSNorm per token);
        - attention: the cross-attention q/k x `SHARPEN_CROSS_QK` (softmax); the ReLU linear self-attention is
          invariant to scaling q or k, so it is left alone;
        - modulation: every block's ``scale_shift_table`` gets planted rows (`modulation_rows`: shift, scale with
          outlier channels, gates of order 1; rows shift, scale, gate of the self-attention, then of the FFN), the
          output ``scale_shift_table`` (shift, scale) too;
        - FFN: the value half of ``ff.conv_inverted`` (a 1x1 conv, D -> 2 x hidden: value channels, then gate
          channels) gets the `plant_ffn_up` bias and x 8 outlier output channels; the gate half keeps its
          initialisation (planting both halves multiplies outliers in value x SiLU(gate): ``ffn out`` kurtosis ~500
          (dit-stats) and ~8000 (outliers) at 1152 wide).

        ``offsets=False`` (``--init outliers``): the same draws with every planted mean offset zero.

        Measured as `models.dit_stats` measures (model seed 0, inputs seed 1: batch 4, caption length 16; statistics
        of the input of every site layer in the blocks, convs with their channels last, averaged over a role;
        `models.dit_stats.tensor_stats`, `block_contribution`), plain / dit-stats / outliers. sana-600m-512 with 2
        layers (1152 wide, 256 tokens; 43 s on 2 cores):

        | role | mean spread | kurtosis | max/median absmax |
        |---|---|---|---|
        | self-attn in | 0.24 / 2.25 / 0.14 | 2.92 / 20.59 / 60.21 | 1.57 / 10.51 / 11.70 |
        | self-attn out | 2.27 / 17.80 / 1.08 | 3.00 / 2.95 / 3.16 | 2.54 / 4.14 / 2.46 |
        | cross-attn q | 0.23 / 1.93 / 0.16 | 3.06 / 22.39 / 3.07 | 1.45 / 5.02 / 1.53 |
        | cross-attn kv | 0.40 / 1.56 / 0.46 | 2.96 / 19.70 / 40.27 | 1.71 / 9.75 / 9.39 |
        | cross-attn out | 1.91 / 2.45 / 0.79 | 2.95 / 3.03 / 3.36 | 2.78 / 2.43 / 1.83 |
        | ffn in | 0.33 / 2.55 / 0.33 | 2.93 / 29.02 / 74.67 | 1.54 / 13.60 / 12.73 |
        | ffn out | 0.84 / 2.34 / 0.58 | 14.73 / 74.87 / 197.05 | 7.20 / 28.84 / 20.56 |
        | overall | 0.71 / 3.69 / 0.43 | 4.13 / 23.34 / 54.25 | 2.36 / 10.51 / 9.30 |
        | block contribution | 0.240 / 0.367 / 0.341 | | |

        Overall (mean spread, kurtosis, outlier ratio) and block contribution, plain / dit-stats / outliers:

        - sana-1600m-1024 with 2 layers at sample size 16 (2240 wide, 256 tokens; 99 s): 0.69 / 3.89 / 0.41, 3.94 /
          71.52 / 54.46, 2.48 / 15.22 / 10.25; block contribution 0.230 / 0.332 / 0.358 (ffn out kurtosis 12.6 / 404
          / 162);
        - sana-tiny: 0.84 / 3.57 / 0.43, 3.88 / 19.93 / 96.19, 1.99 / 8.65 / 6.91; block contribution 0.314 / 0.650
          / 0.493;
        - the full 28-block sana-600m-512 at sample size 8 (64 tokens; 14 min): 0.94 / 3.29 / 0.86, 4.81 / 79.61 /
          68.09, 2.97 / 20.36 / 11.33; block contribution 0.135 / 0.232 / 0.425 (ffn in kurtosis 3.0 / 56 / 66, ffn
          out 21 / 549 / 320: outliers accumulate along the residual stream; largest site input 64).

        The self-attention output (linear attention: every token's output is an average of all tokens' values with
        smooth ReLU-kernel weights, so it varies little from token to token) has a large mean spread (plain 2.3,
        dit-stats 6-19), the effect centering removes; the plain init's ``ffn out`` is already heavy-tailed
        (kurtosis 12-21: the GLU product). Cross-attention sharpness (mean over query rows of the std of the softmax
        logits, block 0): plain 0.18, dit-stats 2.2-3.0, outliers 1.6. Largest site input: 28 / 42 (600M, 2 layers,
        dit-stats / outliers), 40 / 46 (1.6B, 2 layers), 64 / 45 (600M, 28 layers): float16 stays safe.
        """
        import torch

        from models.planting import (
            modulation_rows,
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
            plant_residual_offsets(gen, model.patch_embed.proj.bias, keep)
            plant_projection_outliers(gen, model.caption_projection.linear_2, keep)
            for block in model.transformer_blocks:
                sharpen_attention([block.attn2.to_q, block.attn2.to_k], SHARPEN_CROSS_QK)
                shift_msa, scale_msa, shift_mlp, scale_mlp, gate_msa, gate_mlp = modulation_rows(gen, d, keep)
                table = torch.stack([shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp])
                block.scale_shift_table.copy_(table.to(block.scale_shift_table.dtype))
                conv = block.ff.conv_inverted  # output channels: the value half, then the gate half
                hidden = conv.out_channels // 2
                # plant_ffn_up reads out_features, bias and weight rows: views of the value half (written in place)
                plant_ffn_up(gen, types.SimpleNamespace(out_features=hidden, bias=conv.bias[:hidden],
                                                        weight=conv.weight[:hidden]), keep)
            shift, scale, _gate = modulation_rows(gen, d, keep, pairs=1)
            model.scale_shift_table.copy_(torch.stack([shift, scale]).to(model.scale_shift_table.dtype))

    # ---------------------------------------------------------------- export
    def input_specs(self, model, with_mask: bool) -> tuple[InputSpec, ...]:
        # Unlike PixArt's, Sana's masked export traces with dynamic batch and caption length (torch 2.13)
        specs = [
            InputSpec("hidden_states", {0: BATCH}),
            InputSpec("timestep", {0: BATCH}),
            InputSpec("encoder_hidden_states", {0: BATCH, 1: CAPTION_LENGTH}),
        ]
        if with_mask:
            specs.append(InputSpec("encoder_attention_mask", {0: BATCH, 1: CAPTION_LENGTH}))
        return tuple(specs)

    def example_inputs(self, model, batch: int, caption_length: int, seed: int, dtype, with_mask: bool) -> dict:
        import torch

        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        s = self.latent_size(model)
        inputs = {
            "hidden_states": torch.randn(batch, cfg.in_channels, s, s, generator=gen).to(dtype),
            "timestep": (torch.rand(batch, generator=gen) * 1000.0).to(dtype),
            "encoder_hidden_states": (CAPTION_SCALE * torch.randn(batch, caption_length, cfg.caption_channels,
                                                                  generator=gen)).to(dtype),
        }
        if with_mask:
            mask = torch.ones(batch, caption_length, dtype=dtype)
            for b in range(batch):  # keep a prefix of varying length (at least one token), like padded captions
                keep = max(1, caption_length * (b + 1) // (batch + 1))
                mask[b, keep:] = 0
            inputs["encoder_attention_mask"] = mask
        return inputs

    def matches_inputs(self, names: set[str]) -> bool:
        return set(INPUTS) <= names and not names - set(INPUTS) - {"encoder_attention_mask"}

    # ---------------------------------------------------------------- denoising
    def conditions(self, sig: Signature, settings: DenoiseSettings, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([settings.seed, index])
        length = sig.fixed_caption_length or settings.caption_length
        latents = rng.standard_normal((1, *sig.latent_shape))
        captions = CAPTION_SCALE * rng.standard_normal((2, length, sig.caption_channels))
        return {"latents": latents.astype(np.float32), "captions": captions.astype(np.float32)}

    # PixArt's guidance pair: the latents twice, the timestep, both caption embeddings (and an all-ones mask)
    feeds = PixArtFamily.feeds


SANA = SanaFamily()

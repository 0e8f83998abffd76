"""Flux.1 (diffusers `FluxTransformer2DModel` in `FluxPipeline`), at reduced depth.

- Architecture: 24 heads x 128 = 3072 wide, FFN 12288, T5-XXL caption width 4096 (``joint_attention_dim``), CLIP
  pooled width 768, rotary position embedding over (text/index, row, column) axes of 16 + 56 + 56 = 128 dims;
  19 double-stream blocks (``transformer_blocks``: separate image and text weights, joint attention) and 38
  single-stream blocks (``single_transformer_blocks``: one sequence of text + image tokens, attention and MLP in
  parallel). Flux.1-dev embeds the guidance scale (``guidance_embeds``); Flux.1-schnell does not.
- Latents: the pipeline packs the [16, S, S] VAE latent into 2x2 patches: ``hidden_states`` [B, (S/2)^2, 64].
  S (the latent size, pixels / 8) is not a diffusers config value of this class: it is stored as the private config
  key ``_sample_size`` (diffusers registers private constructor arguments in the config and does not pass them to
  ``__init__``; it survives save_pretrained / from_pretrained; ``sample_size`` in a config.json is read too), default
  128 (1024 px, `FluxPipeline`'s default). ``--sample-size`` must be even; it is refused for ``--checkpoint``
  (``from_pretrained`` drops unknown keyword arguments; put the key in the checkpoint's config.json).
- Depth: ``--layers N`` keeps N double-stream and 2N single-stream blocks (Flux's 19 : 38 ratio), so ``--layers 1``
  is the reduced presets' default; a checkpoint allows N up to min(double, single / 2).
- Graph inputs (the diffusers forward arguments): ``hidden_states`` [B, N, C], ``encoder_hidden_states`` [B, L,
  4096], ``pooled_projections`` [B, 768], ``timestep`` [B] (sigma = t / 1000, as the pipeline passes it; the model
  multiplies by 1000), ``img_ids`` [N, 3] and ``txt_ids`` [L, 3] (position ids, 2-D: not batched), and for dev
  ``guidance`` [B] (the guidance scale, 3.5). B and L are dynamic; N is fixed at export.
- Sites per block: double-stream: image q/k/v, text q/k/v (``add_*_proj``), image and text attention outputs, image
  and text FFN in/out, the image and text adaLN modulation linears; single-stream: q/k/v and ``proj_mlp`` (one
  site: they read the same modulated input), ``proj_out`` (reads concat(attention, GELU(MLP)): 3072 + 12288 = 15360
  = 60 x 256 wide), the adaLN modulation linear. The modulation linears read silu(temb) [B, 3072] (one token per
  sample); the dynamo exporter writes them as ``Gemm``, which hn-export's graph import rewrites to ``MatMul``, so
  they are sites too (16 sites at 1 double + 2 single blocks: 10 + 3 + 3). Site widths 3072, 12288 = 12 x 1024 and
  15360 all have Hadamard constructions.
- Denoising (`FluxPipeline`): `FlowMatchEulerDiscreteScheduler` with the released scheduler configs (dev: dynamic
  shifting, mu from the image sequence length between base 0.5 at 256 tokens and max 1.15 at 4096; schnell: shift 1),
  sigmas linspace(1, 1/steps, steps); dev uses the embedded guidance only (no classifier-free pair: one call of
  batch 1 per step). Which config applies is read from the graph: a ``guidance`` input means dev.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.errors import ModelInputError
from models.families.base import BATCH, CAPTION_LENGTH, DenoiseSettings, InputSpec, ModelFamily, Preset, Signature

SAMPLE_SIZE_KEY = "_sample_size"
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (1024 px)
SINGLE_PER_DOUBLE = 2  # --layers N keeps N double-stream and 2N single-stream blocks

# scheduler_config.json of black-forest-labs/FLUX.1-dev and FLUX.1-schnell
SCHEDULER_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHEDULER_SCHNELL = dict(SCHEDULER_DEV, shift=1.0, use_dynamic_shifting=False)

FLUX1 = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
REDUCED = dict(num_layers=1, num_single_layers=SINGLE_PER_DOUBLE)
# 2 heads x 32 = 64 wide (rope axes 8 + 12 + 12 = 32), FFN 256, proj_out input 320 = 20 x 16; 8x8 latent (16 tokens)
TINY = dict(FLUX1, **REDUCED, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=16, in_channels=16, axes_dims_rope=(8, 12, 12))

DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"
ROLE_RULES = (
    ("attn.to_q", "attn.qkv", "image qkv in", DOUBLE),
    ("attn.to_k", "attn.qkv", "image qkv in", DOUBLE),
    ("attn.to_v", "attn.qkv", "image qkv in", DOUBLE),
    ("attn.add_q_proj", "attn.add_qkv", "text qkv in", DOUBLE),
    ("attn.add_k_proj", "attn.add_qkv", "text qkv in", DOUBLE),
    ("attn.add_v_proj", "attn.add_qkv", "text qkv in", DOUBLE),
    ("attn.to_out.0", "attn.out", "image attn out", DOUBLE),
    ("attn.to_add_out", "attn.add_out", "text attn out", DOUBLE),
    ("ff.net.0.proj", "ff.in", "image ffn in", DOUBLE),
    ("ff.net.2", "ff.out", "image ffn out", DOUBLE),
    ("ff_context.net.0.proj", "ff_context.in", "text ffn in", DOUBLE),
    ("ff_context.net.2", "ff_context.out", "text ffn out", DOUBLE),
    ("norm1.linear", "norm1", "image modulation", DOUBLE),
    ("norm1_context.linear", "norm1_context", "text modulation", DOUBLE),
    ("attn.to_q", "qkv_mlp", "single qkv+mlp in", SINGLE),
    ("attn.to_k", "qkv_mlp", "single qkv+mlp in", SINGLE),
    ("attn.to_v", "qkv_mlp", "single qkv+mlp in", SINGLE),
    ("proj_mlp", "qkv_mlp", "single qkv+mlp in", SINGLE),
    ("proj_out", "proj_out", "single attn+mlp out", SINGLE),
    ("norm.linear", "norm", "single modulation", SINGLE),
)
BASE_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")
GUIDANCE = "guidance"
CAPTION_SCALE = 0.2  # random T5-sized caption features (T5 outputs are small), as the PixArt loop uses
POOLED_SCALE = 0.5  # random CLIP-sized pooled features


def image_ids(sample_size: int) -> np.ndarray:
    """`FluxPipeline._prepare_latent_image_ids`: [(S/2)^2, 3] = (0, row, column) of every packed latent token."""
    side = sample_size // 2
    ids = np.zeros((side, side, 3))
    ids[..., 1] = np.arange(side)[:, None]
    ids[..., 2] = np.arange(side)[None, :]
    return ids.reshape(side * side, 3)


def calculate_shift(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """`diffusers.pipelines.flux.pipeline_flux.calculate_shift` with the scheduler config's values."""
    base_len, max_len = config["base_image_seq_len"], config["max_image_seq_len"]
    slope = (config["max_shift"] - config["base_shift"]) / (max_len - base_len)
    return image_seq_len * slope + config["base_shift"] - slope * base_len


def _rms_scale(norms, factor: float) -> None:
    for norm in norms:
        if norm is not None and getattr(norm, "weight", None) is not None:
            norm.weight.mul_(factor)


class FluxFamily(ModelFamily):
    name = "flux"
    class_name = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    description = "Flux.1 dev / schnell (FluxTransformer2DModel, double- and single-stream blocks, flow matching)"
    demo_preset = "flux-dev-256-reduced"
    presets = {
        "flux-dev-256-reduced": Preset(
            dict(FLUX1, **REDUCED, _sample_size=32),
            "Flux.1-dev width (3072), 1 double + 2 single blocks, 256 px (32x32 latent, 256 tokens)"),
        "flux-schnell-256-reduced": Preset(
            dict(FLUX1, **REDUCED, guidance_embeds=False, _sample_size=32),
            "Flux.1-schnell width (3072, no guidance embedding), 1 double + 2 single blocks, 256 px"),
        "flux-tiny": Preset(dict(TINY, _sample_size=8),
                            "test model: 64 wide, 1 double + 2 single blocks, 8x8 latent (16 tokens)"),
    }
    block_lists = (DOUBLE, SINGLE)
    role_rules = ROLE_RULES
    hadamard_widths = (3072, 12288, 15360)
    guidance_scale = 3.5  # the embedded guidance of Flux.1-dev (FluxPipeline's default)
    max_sample_size = 256

    # ---------------------------------------------------------------- building
    def config_kwargs(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = super().config_kwargs(cfg)
        kwargs[SAMPLE_SIZE_KEY] = int(cfg.get(SAMPLE_SIZE_KEY, cfg.get("sample_size")) or DEFAULT_SAMPLE_SIZE)
        return kwargs

    def num_layers(self, cfg: Mapping[str, Any]) -> int:
        """The largest ``--layers N``: N double-stream and 2N single-stream blocks must exist."""
        return min(int(cfg.get("num_layers", 19)), int(cfg.get("num_single_layers", 38)) // SINGLE_PER_DOUBLE)

    def set_layers(self, kwargs: dict[str, Any], layers: int) -> None:
        kwargs["num_layers"] = layers
        kwargs["num_single_layers"] = SINGLE_PER_DOUBLE * layers

    def truncate(self, model, layers: int) -> None:
        import torch

        for list_name, keep, key in ((DOUBLE, layers, "num_layers"),
                                     (SINGLE, SINGLE_PER_DOUBLE * layers, "num_single_layers")):
            blocks = getattr(model, list_name)
            if keep < len(blocks):
                setattr(model, list_name, torch.nn.ModuleList(list(blocks)[:keep]))
                model.register_to_config(**{key: keep})

    def patch_size(self, cfg: Mapping[str, Any]) -> int:
        return 2  # the pipeline packs 2x2 latent patches (the model's own patch_size is 1)

    def set_sample_size(self, kwargs: dict[str, Any], sample_size: int) -> None:
        if SAMPLE_SIZE_KEY not in kwargs:
            # Constructor arguments of a preset or config always carry it; `from_pretrained` overrides (a checkpoint)
            # cannot: diffusers drops keyword arguments that are not constructor parameters.
            raise ModelInputError("--sample-size cannot be applied to a Flux checkpoint (its latent size is not a "
                                  "diffusers config value of FluxTransformer2DModel)",
                                  f"add \"{SAMPLE_SIZE_KEY}\": N to the checkpoint's config.json, or leave out "
                                  f"--sample-size (default {DEFAULT_SAMPLE_SIZE})")
        kwargs[SAMPLE_SIZE_KEY] = sample_size

    def set_model_sample_size(self, model, sample_size: int) -> None:
        """Set the latent size of a built model (a loaded checkpoint: `from_pretrained` drops private keys)."""
        model.register_to_config(**{SAMPLE_SIZE_KEY: int(sample_size)})

    def latent_size(self, model) -> int:
        cfg = model.config
        size = cfg.get(SAMPLE_SIZE_KEY, cfg.get("sample_size"))
        return int(size) if size is not None else DEFAULT_SAMPLE_SIZE

    @staticmethod
    def tokens(sample_size: int) -> int:
        """Packed latent tokens at latent size S: (S/2)^2."""
        return (sample_size // 2) ** 2

    def plant_stats(self, model, seed: int, offsets: bool) -> None:
        """The DiT-like recipe of `models.planting` on Flux's modules:

        - residual streams: ``x_embedder`` bias (image tokens) gets the planted per-channel offsets and massive
          channels; ``context_embedder`` (text tokens) the projection offsets and outlier rows;
        - attention: q and k pass through RMSNorm per head, so scaling the projections does nothing; the RMSNorm
          weights of q and k (image, text, single) are multiplied by 1.5 instead (logit std ~1 -> ~2.3);
        - adaLN: every modulation linear (``norm1``, ``norm1_context``: shift, scale, gate of attention then of the
          FFN; single ``norm``: shift, scale, gate; ``norm_out``: scale, shift) gets planted rows as its bias and
          0.1 x its weight (`plant_adaln_linear`);
        - FFN up-projections (``ff``, ``ff_context``, single ``proj_mlp``): `plant_ffn_up`.

        Measured on flux-tiny (batch 2, caption length 16, seed 1; overall means over the block linears' inputs),
        plain / dit-stats / outliers: kurtosis 3.42 / 14.01 / 48.86, max/median absmax 2.06 / 8.02 / 8.84, mean
        spread 1.00 / 2.56 / 0.92; block contribution (one block bypassed) 0.044 / 0.26 / 0.60.
        """
        import torch

        from models.planting import (
            modulation_rows,
            plant_adaln_linear,
            plant_ffn_up,
            plant_projection_outliers,
            plant_residual_offsets,
            planting_generator,
        )

        gen = planting_generator(seed)
        keep = 1.0 if offsets else 0.0
        d = model.config.num_attention_heads * model.config.attention_head_dim
        with torch.no_grad():
            plant_residual_offsets(gen, model.x_embedder.bias, keep)
            plant_projection_outliers(gen, model.context_embedder, keep)
            for block in getattr(model, DOUBLE):
                attn = block.attn
                _rms_scale([attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k], 1.5)
                for norm in (block.norm1, block.norm1_context):
                    shift_msa, scale_msa, shift_mlp, scale_mlp, gate_msa, gate_mlp = modulation_rows(gen, d, keep)
                    plant_adaln_linear(norm.linear, [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp])
                plant_ffn_up(gen, block.ff.net[0].proj, keep)
                plant_ffn_up(gen, block.ff_context.net[0].proj, keep)
            for block in getattr(model, SINGLE):
                _rms_scale([block.attn.norm_q, block.attn.norm_k], 1.5)
                shift, scale, gate = modulation_rows(gen, d, keep, pairs=1)
                plant_adaln_linear(block.norm.linear, [shift, scale, gate])
                plant_ffn_up(gen, block.proj_mlp, keep)
            shift, scale, _gate = modulation_rows(gen, d, keep, pairs=1)
            plant_adaln_linear(model.norm_out.linear, [scale, shift])

    # ---------------------------------------------------------------- export
    def input_specs(self, model, with_mask: bool) -> tuple[InputSpec, ...]:
        specs = [
            InputSpec("hidden_states", {0: BATCH}),
            InputSpec("encoder_hidden_states", {0: BATCH, 1: CAPTION_LENGTH}),
            InputSpec("pooled_projections", {0: BATCH}),
            InputSpec("timestep", {0: BATCH}),
            InputSpec("img_ids", {}),  # not batched: axis 0 is not the batch symbol
            InputSpec("txt_ids", {0: CAPTION_LENGTH}),
        ]
        if model.config.guidance_embeds:
            specs.append(InputSpec(GUIDANCE, {0: BATCH}))
        return tuple(specs)

    def example_inputs(self, model, batch: int, caption_length: int, seed: int, dtype, with_mask: bool) -> dict:
        import torch

        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        size = self.latent_size(model)
        inputs = {
            "hidden_states": torch.randn(batch, self.tokens(size), cfg.in_channels, generator=gen).to(dtype),
            "encoder_hidden_states": (CAPTION_SCALE * torch.randn(batch, caption_length, cfg.joint_attention_dim,
                                                                  generator=gen)).to(dtype),
            "pooled_projections": (POOLED_SCALE * torch.randn(batch, cfg.pooled_projection_dim,
                                                              generator=gen)).to(dtype),
            "timestep": torch.rand(batch, generator=gen).to(dtype),
            "img_ids": torch.from_numpy(image_ids(size)).to(dtype),
            "txt_ids": torch.zeros(caption_length, 3, dtype=dtype),
        }
        if cfg.guidance_embeds:
            inputs[GUIDANCE] = torch.full((batch,), self.guidance_scale, dtype=dtype)
        return inputs

    def matches_inputs(self, names: set[str]) -> bool:
        return set(BASE_INPUTS) <= names and not names - set(BASE_INPUTS) - {GUIDANCE}

    # ---------------------------------------------------------------- denoising
    @staticmethod
    def scheduler_config(sig: Signature) -> dict[str, Any]:
        return SCHEDULER_DEV if GUIDANCE in sig.shapes else SCHEDULER_SCHNELL

    def scheduler(self, steps: int, sig: Signature):
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = self.scheduler_config(sig)
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        sigmas = np.linspace(1.0, 1.0 / steps, steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=calculate_shift(sig.latent_shape[0], config))
        return scheduler

    def conditions(self, sig: Signature, settings: DenoiseSettings, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([settings.seed, index])
        length = sig.fixed_caption_length or settings.caption_length
        pooled = sig.dim("pooled_projections", 1)
        scale = settings.guidance_scale if settings.guidance_scale is not None else self.guidance_scale
        return {
            "latents": rng.standard_normal((1, *sig.latent_shape)).astype(np.float32),
            "captions": (CAPTION_SCALE * rng.standard_normal((1, length, sig.caption_channels))).astype(np.float32),
            "pooled": (POOLED_SCALE * rng.standard_normal((1, pooled))).astype(np.float32),
            "guidance": np.array([scale], dtype=np.float32),
        }

    def feeds(self, sig: Signature, latents: np.ndarray, timestep: float, cond: Mapping[str, np.ndarray]) -> dict:
        """One call of batch 1 (no classifier-free pair): the embedded guidance carries the guidance scale."""
        captions = cond["captions"]
        side = round(sig.latent_shape[0] ** 0.5)

        def dtype(name: str) -> np.dtype:
            return sig.dtypes.get(name, sig.dtype)

        feeds = {
            "hidden_states": np.asarray(latents).astype(dtype("hidden_states")),
            "encoder_hidden_states": captions.astype(dtype("encoder_hidden_states")),
            "pooled_projections": cond["pooled"].astype(dtype("pooled_projections")),
            "timestep": np.full((1,), timestep / 1000.0, dtype=dtype("timestep")),
            "img_ids": image_ids(2 * side).astype(dtype("img_ids")),
            "txt_ids": np.zeros((captions.shape[1], 3), dtype=dtype("txt_ids")),
        }
        if GUIDANCE in sig.shapes:
            feeds[GUIDANCE] = cond["guidance"].astype(dtype(GUIDANCE))
        return feeds

    def guide(self, out: np.ndarray, scale: float, sig: Signature) -> np.ndarray:
        """The output as is: the guidance is embedded (dev) or absent (schnell)."""
        return np.asarray(out, dtype=np.float64)[0:1]


FLUX = FluxFamily()

"""PixArt-Sigma and PixArt-Alpha (diffusers `PixArtTransformer2DModel`, both the same class).

- Architecture: XL-2, 28 blocks, 16 heads x 72 = 1152 wide, FFN 4608, T5-XXL caption width 4096; latent [4, S, S]
  (S = pixels / 8), learned sigma (8 output channels: the second half is dropped).
- Blocks (``transformer_blocks.i``, `BasicTransformerBlock` with ``ada_norm_single``): 7 activation sites.
- Conditioning: ``encoder_hidden_states`` [B, L, 4096] (T5 features), optional ``encoder_attention_mask`` [B, L].
  PixArt-Alpha at 1024 px (``use_additional_conditions``) also takes ``resolution`` [B, 2] (height, width in
  pixels) and ``aspect_ratio`` [B, 1] (height / width), as `PixArtAlphaPipeline` passes them.
- Sizes: any latent height and width (multiples of the patch size) can be traced (`any_latent_hw`): diffusers'
  `PatchEmbed` computes the 2-D sin-cos positional embedding from the input's patch grid (h, w) =
  (H / patch, W / patch) with the model's own base size b = sample_size / patch and interpolation scale s (grid
  coordinates ``arange(h) / (h / b) / s`` and ``arange(w) / (w / b) / s``), so the traced graph holds exactly the
  embedding diffusers computes when it runs that model at that size (one graph per size).
- Scheduler: `DPMSolverMultistepScheduler` with the released scheduler_config.json (DPM-Solver++ 2M, linear betas),
  classifier-free guidance 4.5, as `PixArtSigmaPipeline` / `PixArtAlphaPipeline`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.families.base import BATCH, CAPTION_LENGTH, DenoiseSettings, InputSpec, ModelFamily, Preset, Signature

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    solver_order=2,
    algorithm_type="dpmsolver++",
    lower_order_final=True,
)

XL2 = dict(
    num_layers=28,
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    patch_size=2,
    cross_attention_dim=1152,
    caption_channels=4096,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    use_additional_conditions=False,
)
TINY = dict(XL2, num_layers=2, num_attention_heads=2, attention_head_dim=36, sample_size=8, cross_attention_dim=72,
            caption_channels=32)

ROLE_RULES = (
    ("attn1.to_q", "attn1.qkv", "self-attn in"),
    ("attn1.to_k", "attn1.qkv", "self-attn in"),
    ("attn1.to_v", "attn1.qkv", "self-attn in"),
    ("attn1.to_out.0", "attn1.out", "self-attn out"),
    ("attn2.to_q", "attn2.q", "cross-attn query in"),
    ("attn2.to_k", "attn2.kv", "text in"),
    ("attn2.to_v", "attn2.kv", "text in"),
    ("attn2.to_out.0", "attn2.out", "cross-attn out"),
    ("ff.net.0.proj", "ff.in", "ffn in"),
    ("ff.net.2", "ff.out", "ffn out"),
)
CONDITION_INPUTS = ("resolution", "aspect_ratio")


def default_interpolation_scale(sample_size: int) -> int:
    """What diffusers uses when `interpolation_scale` is None."""
    return max(sample_size // 64, 1)


def xl2(sample_size: int, **changes: Any) -> dict[str, Any]:
    return dict(XL2, sample_size=sample_size, interpolation_scale=default_interpolation_scale(sample_size), **changes)


class PixArtFamily(ModelFamily):
    class_name = "PixArtTransformer2DModel"
    role_rules = ROLE_RULES
    hadamard_widths = (1152, 4608)
    guidance_scale = 4.5
    scheduler_class = "DPMSolverMultistepScheduler"
    scheduler_settings = SCHEDULER
    supports_mask = True
    any_latent_hw = True
    max_latent_side = 512  # diffusers' largest aspect-ratio bin: 4096 px (PixArt-Sigma 2K's ASPECT_RATIO_2048_BIN)

    def __init__(self, name: str, description: str, presets: Mapping[str, Preset], pipeline_class: str,
                 demo_preset: str):
        self.name = name
        self.description = description
        self.presets = presets
        self.pipeline_class = pipeline_class
        self.demo_preset = demo_preset

    # ---------------------------------------------------------------- building
    def accepts_config(self, class_name: str | None, cfg: Mapping[str, Any]) -> bool:
        """The shared class; PixArt-Alpha is the one with the resolution / aspect-ratio conditions switched on."""
        conditions = bool(cfg.get("use_additional_conditions"))
        return class_name == self.class_name and conditions == (self.name == "pixart-alpha")

    def prepare_config(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("use_additional_conditions") is None:
            # diffusers switches it on for sample_size 128; PixArt-Sigma does not use it. PixArt-Alpha's 1024 px
            # config says true explicitly.
            kwargs["use_additional_conditions"] = False
        return kwargs

    def checkpoint_overrides(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        if cfg.get("use_additional_conditions") is None and cfg.get("sample_size") == 128:
            return {"use_additional_conditions": False}
        return {}

    def set_sample_size(self, kwargs: dict[str, Any], sample_size: int) -> None:
        kwargs["sample_size"] = sample_size
        kwargs["interpolation_scale"] = default_interpolation_scale(sample_size)

    def plant_stats(self, model, seed: int, offsets: bool) -> None:
        from models.planting import plant_dit_stats

        plant_dit_stats(model, seed, offsets=offsets)

    # ---------------------------------------------------------------- export
    @staticmethod
    def _conditions(model) -> bool:
        return bool(getattr(model, "use_additional_conditions", False))

    def input_specs(self, model, with_mask: bool) -> tuple[InputSpec, ...]:
        dynamic = not with_mask  # torch.export with the mask and dynamic shapes fails: the masked export is static
        specs = [
            InputSpec("hidden_states", {0: BATCH} if dynamic else {}),
            InputSpec("timestep", {0: BATCH} if dynamic else {}),
            InputSpec("encoder_hidden_states", {0: BATCH, 1: CAPTION_LENGTH} if dynamic else {}),
        ]
        if with_mask:
            specs.append(InputSpec("encoder_attention_mask"))
        if self._conditions(model):
            specs += [InputSpec(name, {0: BATCH} if dynamic else {}) for name in CONDITION_INPUTS]
        return tuple(specs)

    def example_inputs(self, model, batch: int, caption_length: int, seed: int, dtype, with_mask: bool,
                       latent_hw: tuple[int, int] | None = None) -> dict:
        """Seeded inputs at latent (height, width) `latent_hw` (default: the model's own square size). PixArt-Alpha's
        conditions are ``resolution`` = (8 h, 8 w) pixels and ``aspect_ratio`` = h / w, as its pipeline passes."""
        import torch

        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        h, w = self.check_latent_hw(model, latent_hw)
        width = int(cfg.caption_channels if cfg.caption_channels is not None else cfg.cross_attention_dim)
        inputs = {
            "hidden_states": torch.randn(batch, cfg.in_channels, h, w, generator=gen).to(dtype),
            "timestep": (torch.rand(batch, generator=gen) * 999.0).round().to(dtype),
            "encoder_hidden_states": torch.randn(batch, caption_length, width, generator=gen).to(dtype),
        }
        if with_mask:
            mask = torch.ones(batch, caption_length, dtype=dtype)
            for b in range(batch):  # keep a prefix of varying length (at least one token), like padded T5 captions
                keep = max(1, caption_length * (b + 1) // (batch + 1))
                mask[b, keep:] = 0
            inputs["encoder_attention_mask"] = mask
        if self._conditions(model):
            inputs["resolution"] = torch.tensor([[8.0 * h, 8.0 * w]] * batch, dtype=dtype)
            inputs["aspect_ratio"] = torch.full((batch, 1), h / w, dtype=dtype)
        return inputs

    def forward(self, model, inputs: Mapping[str, Any]):
        kwargs = {k: v for k, v in inputs.items() if k not in CONDITION_INPUTS}
        added = {k: inputs[k] for k in CONDITION_INPUTS if k in inputs}
        if self._conditions(model):
            kwargs["added_cond_kwargs"] = added
        return model(**kwargs, return_dict=False)[0]

    def matches_inputs(self, names: set[str]) -> bool:
        base = {"hidden_states", "timestep", "encoder_hidden_states"}
        extra = names - base - {"encoder_attention_mask"}
        if self.name == "pixart-alpha":
            return base <= names and extra == set(CONDITION_INPUTS)
        return base <= names and not extra

    # ---------------------------------------------------------------- denoising
    def conditions(self, sig: Signature, settings: DenoiseSettings, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([settings.seed, index])
        length = sig.fixed_caption_length or settings.caption_length
        latents = rng.standard_normal((1, *sig.latent_shape))
        captions = rng.standard_normal((2, length, sig.caption_channels)) * 0.2  # T5 outputs are small
        return {"latents": latents.astype(np.float32), "captions": captions.astype(np.float32)}

    def feeds(self, sig: Signature, latents: np.ndarray, timestep: float, cond: Mapping[str, np.ndarray]) -> dict:
        captions = cond["captions"]
        batch = captions.shape[0]
        feeds = {
            "hidden_states": np.repeat(latents, batch, axis=0).astype(sig.dtype),
            "timestep": np.full((batch,), timestep, dtype=sig.dtype),
            "encoder_hidden_states": captions.astype(sig.dtype),
        }
        if sig.has_mask:
            feeds["encoder_attention_mask"] = np.ones(captions.shape[:2], dtype=sig.dtype)
        if "resolution" in sig.shapes:
            _, height, width = sig.latent_shape
            feeds["resolution"] = np.tile(np.array([[8.0 * height, 8.0 * width]]), (batch, 1)).astype(sig.dtype)
            feeds["aspect_ratio"] = np.full((batch, 1), height / width, dtype=sig.dtype)
        return feeds


PIXART_SIGMA = PixArtFamily(
    "pixart-sigma",
    "PixArt-Sigma (PixArtTransformer2DModel, DPM-Solver++)",
    {
        "pixart-sigma-1024": Preset(xl2(128), "PixArt-Sigma XL-2, 1024 px (128x128 latent)"),
        "pixart-sigma-512": Preset(xl2(64), "PixArt-Sigma XL-2, 512 px (64x64 latent)"),
        "pixart-sigma-256": Preset(xl2(32), "PixArt-Sigma XL-2, 256 px (32x32 latent)"),
        "tiny": Preset(dict(TINY, interpolation_scale=1), "test model: 2 blocks, 72 wide, 8x8 latent"),
    },
    pipeline_class="PixArtSigmaPipeline",
    demo_preset="pixart-sigma-256",
)

PIXART_ALPHA = PixArtFamily(
    "pixart-alpha",
    "PixArt-Alpha (PixArtTransformer2DModel; at 1024 px with resolution / aspect-ratio conditions)",
    {
        # PixArt-XL-2-1024-MS: sample_size 128, additional conditions on, interpolation scale 2.
        "pixart-alpha-1024": Preset(xl2(128, use_additional_conditions=True),
                                    "PixArt-Alpha XL-2, 1024 px, resolution and aspect-ratio conditions"),
        "pixart-alpha-512": Preset(xl2(64), "PixArt-Alpha XL-2, 512 px (64x64 latent)"),
        "pixart-alpha-tiny": Preset(dict(TINY, interpolation_scale=1, use_additional_conditions=True),
                                    "test model: 2 blocks, 72 wide, 8x8 latent, with resolution conditions"),
    },
    pipeline_class="PixArtAlphaPipeline",
    demo_preset="pixart-alpha-512",
)


"""Architecture presets for PixArt-Sigma (diffusers `PixArtTransformer2DModel`).

The XL-2 presets are the real PixArt-Sigma architecture (28 blocks, 16 heads x 72 = 1152 wide, FFN 4608, T5-XXL
caption width 4096) at the three latent sizes the released checkpoints use. They only fix the architecture: the
weights are seeded random (see `models.build`), or come from a local checkpoint.

``use_additional_conditions`` is passed explicitly as False: diffusers turns it on by default when
``sample_size == 128``, which PixArt-Sigma does not use. ``interpolation_scale`` is what diffusers computes when it is
left at None, ``max(sample_size // 64, 1)``, written out so that the config is explicit.

``tiny`` is for tests: 2 blocks, 2 heads x 36 = 72 wide (FFN 288), 8x8 latent (16 tokens). All widths are multiples
of 36, so Hadamard constructions (sizes 2^k, 12 * 2^k, 20 * 2^k, ...) exist for them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

def default_interpolation_scale(sample_size: int) -> int:
    """What diffusers uses when `interpolation_scale` is None."""
    return max(sample_size // 64, 1)


@dataclass(frozen=True)
class PixArtPreset:
    """Keyword arguments of `PixArtTransformer2DModel` for one architecture."""

    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int = 8
    patch_size: int = 2
    sample_size: int = 128
    cross_attention_dim: int = 1152
    caption_channels: int = 4096
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int = 1000
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    use_additional_conditions: bool = False
    interpolation_scale: int | None = None  # None: filled in by `config()` the way diffusers computes it
    description: str = ""

    def replace(self, **changes: Any) -> "PixArtPreset":
        """A copy with some fields changed; `interpolation_scale` follows a new sample size unless given."""
        if "sample_size" in changes and "interpolation_scale" not in changes:
            changes["interpolation_scale"] = None
        return dataclasses.replace(self, **changes)

    def config(self) -> dict[str, Any]:
        """Keyword arguments for `PixArtTransformer2DModel(**preset.config())`."""
        cfg = dataclasses.asdict(self)
        cfg.pop("description")
        if cfg["interpolation_scale"] is None:
            cfg["interpolation_scale"] = default_interpolation_scale(self.sample_size)
        return cfg


_XL2 = PixArtPreset()

PRESETS: dict[str, PixArtPreset] = {
    "pixart-sigma-1024": _XL2.replace(sample_size=128, description="PixArt-Sigma XL-2, 1024 px (128x128 latent)"),
    "pixart-sigma-512": _XL2.replace(sample_size=64, description="PixArt-Sigma XL-2, 512 px (64x64 latent)"),
    "pixart-sigma-256": _XL2.replace(sample_size=32, description="PixArt-Sigma XL-2, 256 px (32x32 latent)"),
    "tiny": PixArtPreset(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=36,
        sample_size=8,
        cross_attention_dim=72,
        caption_channels=32,
        description="test model: 2 blocks, 72 wide, 8x8 latent",
    ),
}

"""The model families hn-export supports, one module each, and the registry.

Adding a family: write ``models/families/<name>.py`` with a `models.families.base.ModelFamily` subclass (presets,
role rules, export inputs, denoising loop) and add its instance to `FAMILIES` below. Nothing else changes.
"""

from __future__ import annotations

from models.errors import ModelInputError
from models.families.base import DenoiseSettings, InputSpec, ModelFamily, Preset, Signature
from models.families.dit import DIT
from models.families.flux import FLUX
from models.families.pixart import PIXART_ALPHA, PIXART_SIGMA
from models.families.sana import SANA
from models.families.sd3 import SD3
from models.families.unet import UNET

# Order matters where graphs are matched by their input names: the first family that accepts them wins.
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (PIXART_SIGMA, PIXART_ALPHA, FLUX, DIT, SD3, SANA, UNET)}
DEFAULT_FAMILY = PIXART_SIGMA.name

__all__ = ["FAMILIES", "DEFAULT_FAMILY", "DenoiseSettings", "InputSpec", "ModelFamily", "Preset", "Signature",
           "family", "family_of_class", "family_of_inputs", "family_of_preset", "all_presets", "supported"]


def supported() -> str:
    """The supported families, for messages."""
    return ", ".join(FAMILIES)


def family(name: str) -> ModelFamily:
    """The family called `name`; raises `ModelInputError` naming the supported ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelInputError(f"unknown model family {name!r}",
                              f"use one of: {supported()} (a new family is one module in models/families/ plus "
                              "a line in its registry)") from None


def all_presets() -> dict[str, tuple[ModelFamily, Preset]]:
    return {name: (fam, preset) for fam in FAMILIES.values() for name, preset in fam.presets.items()}


def family_of_preset(preset: str) -> ModelFamily:
    presets = all_presets()
    if preset not in presets:
        raise ModelInputError(f"unknown preset {preset!r}", f"use one of: {', '.join(presets)}")
    return presets[preset][0]


def family_of_class(class_name: str | None, cfg: dict | None = None) -> ModelFamily:
    """The family that accepts a diffusers config (its ``_class_name`` and values: PixArt-Alpha and -Sigma share a
    class, DiT's released configs name the legacy ``Transformer2DModel``); see `ModelFamily.accepts_config`."""
    matches = [f for f in FAMILIES.values() if f.accepts_config(class_name, cfg or {})]
    if not matches:
        found = f"a {class_name}" if class_name else "not a diffusers model config (no _class_name)"
        by_class: dict[str, list[str]] = {}
        for fam in FAMILIES.values():
            by_class.setdefault(fam.class_name, []).append(fam.name)
        classes = ", ".join(f"{cls} ({', '.join(names)})" for cls, names in by_class.items())
        raise ModelInputError(f"the model is {found}, which no supported family describes",
                              f"supported: {classes}; a new family is one module in models/families/ plus a "
                              "registry line")
    return matches[0]


def family_of_inputs(names: set[str]) -> ModelFamily | None:
    """The family whose graph inputs these are, or None."""
    for fam in FAMILIES.values():
        if fam.matches_inputs(names):
            return fam
    return None

"""Every pipeline preset `hn-export bundle --preset NAME` builds: PixArt-Sigma's (`models.pipelines`) and Stable
Diffusion 3's (`models.pipelines_sd3`), by name."""

from __future__ import annotations

from pathlib import Path

from models.errors import ModelInputError
from models.pipelines import PIPELINE_PRESETS, write_pipeline_folder
from models.pipelines_sd3 import SD3_PIPELINE_PRESETS, write_sd3_pipeline_folder


def pipeline_preset_names() -> list[str]:
    return [*PIPELINE_PRESETS, *SD3_PIPELINE_PRESETS]


def check_pipeline_preset(name: str) -> None:
    """`ModelInputError` naming every preset when `name` is none of them."""
    if name not in PIPELINE_PRESETS and name not in SD3_PIPELINE_PRESETS:
        raise ModelInputError(f"unknown pipeline preset {name!r}", f"use one of: {', '.join(pipeline_preset_names())}")


def write_preset_folder(name: str, folder: Path, seed: int = 0) -> Path:
    """Write preset `name` (seeded weights) as a local diffusers pipeline folder of its pipeline class."""
    check_pipeline_preset(name)
    if name in SD3_PIPELINE_PRESETS:
        return write_sd3_pipeline_folder(name, folder, seed)
    return write_pipeline_folder(name, folder, seed)

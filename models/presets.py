"""Architecture presets of every family (`models.families`), by name: ``PRESETS[name] -> Preset``.

Each family's presets live in its module (the PixArt-Sigma XL-2 presets in `models.families.pixart`, ...). They fix
the architecture only: the weights are seeded random (see `models.build`), or come from a local checkpoint.
"""

from __future__ import annotations

from models.families import all_presets
from models.families.base import Preset

PRESETS: dict[str, Preset] = {name: preset for name, (_family, preset) in all_presets().items()}

__all__ = ["PRESETS", "Preset"]

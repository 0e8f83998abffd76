"""The six methods as subsets of three parts, and the other transform options.

Every method is one recipe of the same mechanism ``x~ = H S^-1 (x - mu)``:

=============  ======  =====  ========
method         center  scale  rotate
=============  ======  =====  ========
none           .       .      .
smoothquant    .       S      .
quarot         .       .      H
sdcb           .       S      H
dyncenter      mu      .      .
hadanorm       mu      S      H
=============  ======  =====  ========
"""

from __future__ import annotations

import dataclasses
import enum

from graph_passes.hadamard import HadamardMode


@dataclasses.dataclass(frozen=True)
class Recipe:
    center: bool
    smooth: bool
    rotate: bool


class Method(enum.Enum):
    NONE = "none"
    SMOOTHQUANT = "smoothquant"
    QUAROT = "quarot"
    SDCB = "sdcb"
    DYNCENTER = "dyncenter"
    HADANORM = "hadanorm"

    @property
    def recipe(self) -> Recipe:
        return _RECIPES[self]


_RECIPES: dict[Method, Recipe] = {
    Method.NONE: Recipe(center=False, smooth=False, rotate=False),
    Method.SMOOTHQUANT: Recipe(center=False, smooth=True, rotate=False),
    Method.QUAROT: Recipe(center=False, smooth=False, rotate=True),
    Method.SDCB: Recipe(center=False, smooth=True, rotate=True),
    Method.DYNCENTER: Recipe(center=True, smooth=False, rotate=False),
    Method.HADANORM: Recipe(center=True, smooth=True, rotate=True),
}


class BiasCorrection(enum.Enum):
    """How ``W mu`` is computed for centered sites (see DEVELOPERS.md and the W4A4 issue)."""

    QUANTIZED_TOKEN = "quantized-token"  # the paper: transformed mean token appended and quantized with the tokens
    FLOAT_TOKEN = "float-token"  # transformed mean token kept in float, times the dequantized fused weight
    EXACT = "exact"  # mean token times an int8 per-output-channel copy of the fused weight (extra bytes)


@dataclasses.dataclass(frozen=True)
class TransformOptions:
    method: Method = Method.HADANORM
    alpha: float = 0.5
    hadamard: HadamardMode = HadamardMode.FULL
    hadamard_block: int = 128
    bias_correction: BiasCorrection = BiasCorrection.FLOAT_TOKEN
    seed: int | None = 0  # Hadamard random signs; None = no signs

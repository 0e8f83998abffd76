"""The seven methods as recipes of one mechanism, and the other transform options.

Every method is one recipe of the same mechanism ``x~ = H S^-1 (x - mu)``:

=============  ======  =====  ========  ===================================================================
method         center  scale  rotate    where the rotation goes
=============  ======  =====  ========  ===================================================================
none           .       .      .
smoothquant    .       S      .
quarot         .       .      H         both: ``(x H^T)(W H^T)^T``, the rotated weight is quantized
sdcb           .       S      H         both
dyncenter      mu      .      .
hadanorm       mu      S      H         both
hqdm           .       .      H_b       single: ``Q(x H^T) H (W)^T``, the weight is quantized unrotated
=============  ======  =====  ========  ===================================================================

HQ-DM (Mao et al., arXiv 2512.05746, public code msz12345/HQ-DM) rotates only the quantized activation: the
activation is rotated by a block-diagonal Sylvester Hadamard (blocks of 32, no random signs), quantized, and rotated
back; the weight is quantized in its own domain ("prevents the amplification of weight outliers"). In integer form
``y = Q(x H_n^T) (H_raw W_int^T) s_x s_w / sqrt(32)`` with ``H_raw W_int^T`` exact integers (the ``fused`` format,
`graph_passes.emit_fused`). Its default Hadamard is ``block`` of 32 (`Method.default_hadamard`).

The SmoothQuant exponent (``--alpha``) of the smoothing methods is one number for every site (`TransformOptions.alpha`
a float), or ``--alpha auto`` (`AlphaSearch`): per site the alpha of a small grid with the least output error on the
calibration data (`graph_passes.alpha_search`), which resolves it to `SiteAlphas` before the transforms are planned.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from graph_passes.hadamard import HadamardMode


@dataclasses.dataclass(frozen=True)
class Recipe:
    center: bool
    smooth: bool
    rotate: bool
    single: bool = False  # rotate the quantized activation only, and back (HQ-DM); the weight is not rotated


class Method(enum.Enum):
    NONE = "none"
    SMOOTHQUANT = "smoothquant"
    QUAROT = "quarot"
    SDCB = "sdcb"
    DYNCENTER = "dyncenter"
    HADANORM = "hadanorm"
    HQDM = "hqdm"

    @property
    def recipe(self) -> Recipe:
        return _RECIPES[self]

    @property
    def default_hadamard(self) -> tuple[HadamardMode, int]:
        """(mode, block) when the user chooses none: HQ-DM's Sylvester blocks of 32, else the full Hadamard."""
        return (HadamardMode.BLOCK, 32) if self is Method.HQDM else (HadamardMode.FULL, 128)


_RECIPES: dict[Method, Recipe] = {
    Method.NONE: Recipe(center=False, smooth=False, rotate=False),
    Method.SMOOTHQUANT: Recipe(center=False, smooth=True, rotate=False),
    Method.QUAROT: Recipe(center=False, smooth=False, rotate=True),
    Method.SDCB: Recipe(center=False, smooth=True, rotate=True),
    Method.DYNCENTER: Recipe(center=True, smooth=False, rotate=False),
    Method.HADANORM: Recipe(center=True, smooth=True, rotate=True),
    Method.HQDM: Recipe(center=False, smooth=False, rotate=True, single=True),
}


# ``--alpha auto``'s default grid: around SmoothQuant's 0.5, towards the weights (0.3) and the activations (0.8)
DEFAULT_ALPHA_GRID: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclasses.dataclass(frozen=True)
class AlphaSearch:
    """``--alpha auto``: each smoothed site takes the alpha of `grid` whose transform gives the least output error
    on the calibration data (`graph_passes.alpha_search`); resolved to `SiteAlphas` before any transform is planned.
    The grid: distinct finite numbers in [0, 1], in the order given (ties go to the earlier one)."""

    grid: tuple[float, ...] = DEFAULT_ALPHA_GRID

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError("the alpha grid is empty")
        if any(not (math.isfinite(a) and 0.0 <= a <= 1.0) for a in self.grid):
            raise ValueError(f"alpha grid {self.grid}: every alpha is a finite number in [0, 1]")
        if len(set(self.grid)) != len(self.grid):
            raise ValueError(f"alpha grid {self.grid} repeats a value")


@dataclasses.dataclass(frozen=True)
class SiteAlphas:
    """The alphas an `AlphaSearch` chose: (site name, alpha) pairs in site order."""

    chosen: tuple[tuple[str, float], ...]

    def __getitem__(self, site: str) -> float:
        for name, alpha in self.chosen:
            if name == site:
                return alpha
        raise KeyError(site)


class BiasCorrection(enum.Enum):
    """How ``W mu`` is computed for centered sites (see DEVELOPERS.md and the W4A4 issue)."""

    QUANTIZED_TOKEN = "quantized-token"  # the paper: transformed mean token appended and quantized with the tokens
    FLOAT_TOKEN = "float-token"  # transformed mean token kept in float, times the dequantized fused weight
    EXACT = "exact"  # mean token times an int8 per-output-channel copy of the fused weight (extra bytes)


@dataclasses.dataclass(frozen=True)
class TransformOptions:
    method: Method = Method.HADANORM
    alpha: float | AlphaSearch | SiteAlphas = 0.5  # one for every site; --alpha auto; what auto chose per site
    hadamard: HadamardMode | None = None  # None: the method's default (`Method.default_hadamard`)
    hadamard_block: int | None = None  # None: the method's default
    bias_correction: BiasCorrection = BiasCorrection.FLOAT_TOKEN
    seed: int | None = 0  # Hadamard random signs; None = no signs (single-Hadamard recipes never take signs)

    @property
    def hadamard_mode(self) -> HadamardMode:
        return self.hadamard if self.hadamard is not None else self.method.default_hadamard[0]

    def alpha_of(self, site: str) -> float:
        """The SmoothQuant exponent of `site`; an unresolved `AlphaSearch` is a programming error."""
        if isinstance(self.alpha, SiteAlphas):
            try:
                return self.alpha[site]
            except KeyError:
                raise ValueError(f"--alpha auto chose no alpha for site {site}") from None
        if isinstance(self.alpha, AlphaSearch):
            raise ValueError("--alpha auto is resolved per site (graph_passes.alpha_search) before transforms are "
                             "planned")
        return self.alpha

    @property
    def block(self) -> int:
        return self.hadamard_block if self.hadamard_block is not None else self.method.default_hadamard[1]

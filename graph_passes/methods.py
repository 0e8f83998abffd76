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


class BiasCorrection(enum.Enum):
    """How ``W mu`` is computed for centered sites (see DEVELOPERS.md and the W4A4 issue)."""

    QUANTIZED_TOKEN = "quantized-token"  # the paper: transformed mean token appended and quantized with the tokens
    FLOAT_TOKEN = "float-token"  # transformed mean token kept in float, times the dequantized fused weight
    EXACT = "exact"  # mean token times an int8 per-output-channel copy of the fused weight (extra bytes)


@dataclasses.dataclass(frozen=True)
class TransformOptions:
    method: Method = Method.HADANORM
    alpha: float = 0.5
    hadamard: HadamardMode | None = None  # None: the method's default (`Method.default_hadamard`)
    hadamard_block: int | None = None  # None: the method's default
    bias_correction: BiasCorrection = BiasCorrection.FLOAT_TOKEN
    seed: int | None = 0  # Hadamard random signs; None = no signs (single-Hadamard recipes never take signs)

    @property
    def hadamard_mode(self) -> HadamardMode:
        return self.hadamard if self.hadamard is not None else self.method.default_hadamard[0]

    @property
    def block(self) -> int:
        return self.hadamard_block if self.hadamard_block is not None else self.method.default_hadamard[1]

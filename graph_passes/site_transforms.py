"""Per-site transform parameters from calibration statistics.

For a site with linears ``W_1..W_k`` (stacked ``W`` with rows = output channels) and input channels ``j``:

    s_j   = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)          (SmoothQuant; X centered first when the method centers)
    x~    = H S^-1 (x - mu)                                     (online; H = H_L (x) H_R diag(signs))
    W~^T  = H S W^T                                             (offline, float64; ONNX stores W^T as [in, out])

so that ``W~ x~ = W (x - mu)`` exactly. Scales are clipped to [1e-5, 1e5] and channels with zero statistics get 1.
``alpha`` is one number for every site, or with ``--alpha auto`` the one chosen for the site
(`TransformOptions.alpha_of`, `graph_passes.alpha_search`).

Single-Hadamard recipes (HQ-DM) rotate the activation, quantize it and rotate it back, ``x^ = Q(x~) H``: the weight
takes ``S`` only, ``W~^T = S W^T``. A convolution weight ``W[out, in, kh, kw]`` is fused tap by tap (its input
channels are the rows: `fuse_conv_weight`). Sites where centering is not exact (padded k x k convs) are not centered.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graph_passes.hadamard import KroneckerHadamard, hadamard_factors
from graph_passes.hadanorm_ops import TransformOp
from graph_passes.linears import ActivationSite
from graph_passes.methods import TransformOptions


@dataclasses.dataclass
class SiteStats:
    """Per-channel calibration statistics of one activation tensor (float64, shape [d])."""

    absmax: np.ndarray
    centered_absmax: np.ndarray  # max |x - mean over tokens (axis -2)|, the mean taken per leading index


@dataclasses.dataclass
class SiteTransform:
    center: bool
    inv_scale: np.ndarray  # float64 [d]: 1 / s (ones without SmoothQuant)
    hadamard: KroneckerHadamard | None
    rotate_back: bool = False  # single Hadamard (HQ-DM): the quantized activation is rotated back, W not rotated

    @property
    def op(self) -> TransformOp | None:
        smooth = not np.all(self.inv_scale == 1.0)
        if not (self.center or smooth or self.hadamard is not None):
            return None
        return TransformOp(center=self.center, rotate=self.hadamard is not None)

    def channel_mul(self) -> np.ndarray:
        """The ``mul`` input of the op: 1/s with the Hadamard's random signs folded in (float64)."""
        if self.hadamard is not None and self.hadamard.signs is not None:
            return self.inv_scale * self.hadamard.signs
        return self.inv_scale

    def fuse_weight(self, weight_t: np.ndarray) -> np.ndarray:
        """``W~^T = H S W^T`` (``S W^T`` for a single Hadamard) for an ONNX weight ``W^T`` [in, out], in float64."""
        fused = np.asarray(weight_t, dtype=np.float64) / self.inv_scale[:, None]
        if self.hadamard is not None and not self.rotate_back:
            fused = self.hadamard.rotate_weight_rows(fused)
        return fused

    def fuse_conv_weight(self, weight: np.ndarray) -> np.ndarray:
        """The same at every tap of a convolution weight ``W`` [out, in, kh, kw], in float64."""
        w = np.asarray(weight, dtype=np.float64)
        fused = self.fuse_weight(conv_rows(w)).reshape(w.shape[1], w.shape[0], *w.shape[2:])
        return np.moveaxis(fused, 0, 1)


def conv_rows(weight: np.ndarray) -> np.ndarray:
    """A conv weight ``W`` [out, in, kh, kw] with its input channels as rows: [in, out * kh * kw]."""
    return np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)


def smoothing_inv_scale(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """``1 / s`` with ``s_j = act_j^alpha / w_j^(1-alpha)``; 1 where either statistic is zero."""
    act = np.asarray(act_absmax, dtype=np.float64)
    wmax = np.asarray(weight_absmax, dtype=np.float64)
    valid = (act > 0) & (wmax > 0)
    scale = np.ones_like(act)
    scale[valid] = act[valid] ** alpha / wmax[valid] ** (1.0 - alpha)
    return 1.0 / np.clip(scale, 1e-5, 1e5)


def weight_input_absmax(site: ActivationSite) -> np.ndarray:
    """max_i |W_ij| over every output row (and kernel tap) of every layer of the site, per input channel j."""
    rows = []
    for lin in site.linears:
        w = np.abs(np.asarray(lin.weight.const_value.numpy(), dtype=np.float64))
        rows.append((conv_rows(w) if lin.is_conv else w).max(axis=1))
    return np.max(np.stack(rows), axis=0)


def plan_site_transform(
    site: ActivationSite, stats: SiteStats | None, options: TransformOptions, site_index: int
) -> SiteTransform:
    recipe = options.method.recipe
    width = site.width
    center = recipe.center and site.can_center
    inv_scale = np.ones(width, dtype=np.float64)
    if recipe.smooth:
        if stats is None:
            raise ValueError(f"site {site.name} needs calibration statistics for SmoothQuant scales")
        act = stats.centered_absmax if center else stats.absmax
        inv_scale = smoothing_inv_scale(act, weight_input_absmax(site), options.alpha_of(site.name))
    hadamard = None
    if recipe.rotate:
        seed = None if options.seed is None or recipe.single else options.seed + site_index
        hadamard = hadamard_factors(width, options.hadamard_mode, block_size=options.block, seed=seed)
    return SiteTransform(center=center, inv_scale=inv_scale, hadamard=hadamard, rotate_back=recipe.single)

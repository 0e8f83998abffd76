"""The low-rank branch of a quantized linear (SVDQuant's): ``W~^T = P Q + R``, ``R`` quantized, ``P Q`` in float.

For a site's transformed weight ``W~^T = H S W^T`` [in, out] (float64), the rank-r truncated SVD
``W~^T ~ U_r Sigma_r V_r^T`` takes the weight's largest directions: ``P = U_r Sigma_r`` [in, r], ``Q = V_r^T`` [r, out];
only the residual ``R = W~^T - P Q`` is quantized (min/max, MSE or GPTQ ranges, unchanged). The linear becomes

    y = Q(x~) Q(R) + mu~ Q(R) + (x~ + mu~) P Q + b = [the quantized linear of R] + (x A) Q + b,

with ``x~ + mu~ = x S^-1 H^T`` (row form: the transform without the centering), so the branch reads the site's raw
activation: ``A = S^-1 H^T P`` [in, r] (float64, cast at the end). The centering's ``mu~`` term of the branch is
inside ``x A`` already: every bias correction stays as it is, applied to ``Q(R)``. The branch is two float MatMuls
and an Add after the linear in every output format (`graph_passes.emit.SiteEmitter`); it costs ``r (in + out)``
float weights and ``2 r (in + out)`` flops per token. A linear keeps its branch only where it lowers the weight's
quantization error (`split_low_rank`), so ``--low-rank R`` means "up to one rank-R branch per linear".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from graph_passes.site_transforms import SiteTransform


@dataclasses.dataclass(frozen=True)
class LowRankBranch:
    """``y += (x left) right`` beside a quantized linear; `x` is the site's activation before its transform."""

    left: np.ndarray  # [in, r]: A = S^-1 H^T P, in the weight's dtype
    right: np.ndarray  # [r, out]: Q, in the weight's dtype

    @property
    def rank(self) -> int:
        return self.left.shape[1]


def _truncated(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    u, sigma, vt = np.linalg.svd(w, full_matrices=False)
    return u[:, :rank] * sigma[:rank], vt[:rank]


def split_low_rank(fused_t: np.ndarray, transform: SiteTransform, rank: int, dtype: np.dtype,
                   dequantized: Callable[[np.ndarray], np.ndarray],
                   refinements: int = 1) -> tuple[np.ndarray, LowRankBranch | None]:
    """``(R, branch)`` for the transformed weight ``W~^T`` [in, out] (float64): the residual to quantize (float64)
    and the branch in `dtype`, or ``(W~^T, None)`` when no branch of this rank lowers the weight's error.

    `dequantized(m)`: ``m`` quantized and dequantized on the job's grid (the decision's error measure). The branch
    starts as the rank-r SVD of ``W~^T``; each of `refinements` steps refits it to ``W~^T - Q(R)`` (SVDQuant: the
    branch also takes the largest directions of the residual's quantization error). It is kept when
    ``|Q(R) + P Q - W~^T|_F < |Q(W~^T) - W~^T|_F``: with flat weights whose large entries are not a low-rank part
    (uniform ones, torch's default Linear init and so the synthetic presets'), removing the top directions widens the
    residual's block ranges and makes it worse. The
    residual is taken against the branch as stored (cast to `dtype`), so the quantized part absorbs the branch's
    rounding."""
    w = np.asarray(fused_t, dtype=np.float64)
    rank = min(rank, *w.shape)

    def stored(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, LowRankBranch]:
        left = p if transform.hadamard is None else transform.hadamard.unrotate_weight_rows(p)
        branch = LowRankBranch((left * transform.inv_scale[:, None]).astype(dtype), q.astype(dtype))
        # the branch as the graph computes it, in the transformed space: x~ P' Q' with P' = H S A
        p_back = branch.left.astype(np.float64) / transform.inv_scale[:, None]
        if transform.hadamard is not None:
            p_back = transform.hadamard.rotate_weight_rows(p_back)
        return p_back @ branch.right.astype(np.float64), branch

    low, branch = stored(*_truncated(w, rank))
    error = np.linalg.norm(dequantized(w - low) + low - w)
    for _ in range(refinements):
        candidate_low, candidate = stored(*_truncated(w - dequantized(w - low), rank))
        candidate_error = np.linalg.norm(dequantized(w - candidate_low) + candidate_low - w)
        if candidate_error >= error:
            break
        low, branch, error = candidate_low, candidate, candidate_error
    if error >= np.linalg.norm(dequantized(w) - w):
        return w, None
    return w - low, branch

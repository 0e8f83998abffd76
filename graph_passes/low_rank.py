"""The low-rank branch of a quantized linear (SVDQuant's): ``W~^T = P Q + R``, ``R`` quantized, ``P Q`` in float.

For a site's transformed weight ``W~^T = H S W^T`` [in, out] (float64), the rank-r truncated SVD
``W~^T ~ U_r Sigma_r V_r^T`` takes the weight's largest directions: ``P = U_r Sigma_r`` [in, r], ``Q = V_r^T`` [r, out];
only the residual ``R = W~^T - P Q`` is quantized (min/max, MSE or GPTQ ranges, unchanged). The linear becomes

    y = Q(x~) Q(R) + mu~ Q(R) + (x~ + mu~) P Q + b = [the quantized linear of R] + (x A) Q + b,

with ``x~ + mu~ = x S^-1 H^T`` (row form: the transform without the centering), so the branch reads the site's raw
activation: ``A = S^-1 H^T P`` [in, r] (float64, cast at the end). The centering's ``mu~`` term of the branch is
inside ``x A`` already: every bias correction stays as it is, applied to ``Q(R)``. The branch is two float MatMuls
and an Add after the linear in every output format (`graph_passes.emit.SiteEmitter`); it costs ``r (in + out)``
float weights and ``2 r (in + out)`` flops per token.
"""

from __future__ import annotations

import dataclasses

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


def split_low_rank(fused_t: np.ndarray, transform: SiteTransform, rank: int,
                   dtype: np.dtype) -> tuple[np.ndarray, LowRankBranch]:
    """``(R, branch)`` for the transformed weight ``W~^T`` [in, out] (float64): the residual to quantize (float64)
    and the branch in `dtype`. The residual is taken against the branch as stored (cast to `dtype`), so the
    quantized part absorbs the branch's rounding."""
    w = np.asarray(fused_t, dtype=np.float64)
    rank = min(rank, *w.shape)
    u, sigma, vt = np.linalg.svd(w, full_matrices=False)
    p = u[:, :rank] * sigma[:rank]
    q = vt[:rank]
    left = p if transform.hadamard is None else transform.hadamard.unrotate_weight_rows(p)
    left = (left * transform.inv_scale[:, None]).astype(dtype)
    right = q.astype(dtype)
    # the branch as the graph computes it, in the transformed space: x~ P' Q' with P' = H S A (exact in float64)
    stored_p = left.astype(np.float64) / transform.inv_scale[:, None]
    if transform.hadamard is not None:
        stored_p = transform.hadamard.rotate_weight_rows(stored_p)
    return w - stored_p @ right.astype(np.float64), LowRankBranch(left, right)

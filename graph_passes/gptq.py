"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) on the weight that is actually quantized, and its Hessian.

What is quantized. A site's linear multiplies its transformed activation by ``W~`` (``W~^T = H S W^T``; HQ-DM's
single Hadamard: ``S W^T``, the unrotated weight; a k x k conv: the matrix ``[in * kh * kw, out]``, rows ``c * taps +
t``). GPTQ quantizes ``W~`` column by column (one column = one input row of ``W~^T``) and spreads each column's
rounding error over the columns not yet quantized so as to minimise the output error on the calibration data,

    E = sum_n || (W~ - W^) z_n ||^2 = tr(dW Hs dW^T),     Hs = sum_n z_n z_n^T   (z_n: what W~ multiplies)

Hessian, from the calibration run (`hn_export.calibration`, only when GPTQ is asked for). For an activation ``X``
``[..., N, d]`` with leading index ``l`` (the calibration statistics' convention: tokens on axis -2, centered per
leading index) onnxruntime computes per call the centered Gram ``sum_{l,n} (x_ln - mu_l)(x_ln - mu_l)^T`` (float32,
one Gemm) and the means ``mu_l``; the host sums, in float64 over all calls,

    C = sum_{l,n} (x_ln - mu_l)(x_ln - mu_l)^T          [d, d]
    R = rows sqrt(N) mu_l, one per call and leading index  (M = R^T R = sum_l N mu_l mu_l^T; dense once rows > d)

so ``G = C + M = sum x x^T`` (the raw second moment) without the cancellation of ``G - M`` in float32, and no
activation is held. The transform ``T`` (``x~ = T (x - mu)``, ``T = H S^-1``; single Hadamard: ``T = S^-1``, the
quantized weight multiplies the back-rotated activation) is fixed by the statistics after the run; since it is
linear,

    Hs = T G T^T     not centered; and centered sites with float-token or quantized-token bias correction
    Hs = T C T^T     centered sites with exact bias correction

The second case is the literal "transformed, centered activations". In the first the same quantized weight also
multiplies the transformed mean token ``mu~ = T mu`` and that product is added to every token, so the error
reaching the output is ``dW (x~_n + mu~) = dW T x_n``: the raw Gram. Only ``exact`` multiplies the mean by a
separate int8 copy, leaving the quantized weight with ``x~_n`` alone. ``T M T^T`` is formed from ``T R^T`` without
the d x d matrix ``T`` (`KroneckerHadamard.rotate_weight_rows`).

k x k convs: ``z`` is the im2col patch of the raw input (rows ``c * taps + t``, zero padding included);
onnxruntime unfolds it with a depthwise one-hot conv of the conv's own strides, pads and dilations, and the host sums
``P = sum p p^T``; then ``Hs = (T (x) I_taps) P (T (x) I_taps)^T`` (no centering: k x k sites are never centered;
``T 0 = 0`` keeps the padding zero).

The algorithm (the reference code's formulation): damping ``lambda = percdamp * mean(diag Hs)`` (``percdamp`` 0.01)
added to the diagonal; inputs with ``Hs_jj = 0`` (never active in the calibration data) get ``Hs_jj = 1`` and keep
their weights (the reference zeroes them; here they are simply rounded, which changes nothing on the calibration
data); ``U`` the upper Cholesky factor of ``Hs^-1`` (``Hs^-1 = U^T U``); then for each column ``j`` in order

    q_j = Q(w_j);  e = (w_j - q_j) / U_jj;  w_k -= e U_jk for k > j

in lazy batches (the updates of a batch reach the later columns in one product). The grid is the min/max
quantizer's (`graph_passes.quantization`): per group (a block of ``B`` input rows of one output column; ``B >= in``:
per output channel) ``scale = max|w| / qmax`` (symmetric) or the asymmetric range with zero point, computed, as
GPTQ does with groupsize ``B``, when the group's first column is reached, from the weights as the earlier columns'
errors left them; the scale is rounded to the scale dtype before the integers are set. So the integers and scales have
exactly the layout of `quantize_weight` and every output format stores them unchanged.

Act-order (``WeightRange.GPTQ_ACT_ORDER``): columns in decreasing ``Hs_jj``; with groups the group parameters are the
min/max ones of the original ``W~`` ("static groups"), so the groups stay contiguous blocks of ``B`` rows.

Cost: two Choleskys and one triangular inverse per site (shared by its linears, about d^3 flops in all), per linear
``out * in^2`` flops of updates and a Python loop over its ``in`` columns; memory a few d x d float64 per site while
it is planned (``Hs``, the factors).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from graph_passes.hadamard import KroneckerHadamard
from graph_passes.site_transforms import SiteStats, SiteTransform
from graph_passes.weight_grid import asym_scale_zp, sym_scale, two_level_scale

logger = logging.getLogger(__name__)

DEFAULT_PERCDAMP = 0.01
_LAZY_BATCH = 128  # columns per lazy batch when the group is a whole output channel


@dataclasses.dataclass
class ActivationGram:
    """Second moments of one activation tensor over the calibration calls (float64; see the module docstring)."""

    width: int
    centered: np.ndarray  # C [d, d]
    mean_rows: list[np.ndarray] = dataclasses.field(default_factory=list)  # [k, d] arrays: sqrt(N) mu_l
    mean_dense: np.ndarray | None = None  # M, once the rows outnumber d
    tokens: int = 0  # sum over calls of the token count (all leading indices)
    patches: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # k x k conv key -> P

    def add_means(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.width)
        if self.mean_dense is not None:
            self.mean_dense += rows.T @ rows
            return
        self.mean_rows.append(rows)
        if sum(len(r) for r in self.mean_rows) > self.width:
            stacked = np.concatenate(self.mean_rows)
            self.mean_dense, self.mean_rows = stacked.T @ stacked, []

    def mean_factor(self) -> np.ndarray:
        """``R`` with ``M = R^T R`` ([k, d]; the Cholesky-free square root of the dense M once collapsed)."""
        if self.mean_dense is None:
            return np.concatenate(self.mean_rows) if self.mean_rows else np.zeros((0, self.width))
        vals, vecs = np.linalg.eigh(self.mean_dense)
        return (vecs * np.sqrt(np.clip(vals, 0.0, None))).T

    def raw(self) -> np.ndarray:
        """``G = C + M = sum x x^T``."""
        if self.mean_dense is not None:
            return self.centered + self.mean_dense
        r = self.mean_factor()
        return self.centered + r.T @ r

    @property
    def nbytes(self) -> int:
        return (self.centered.nbytes + sum(r.nbytes for r in self.mean_rows)
                + (0 if self.mean_dense is None else self.mean_dense.nbytes) + sum(p.nbytes for p in self.patches.values()))


@dataclasses.dataclass
class CalibratedStats(SiteStats):
    """`SiteStats` with the activation's Gram (collected only for ``--weight-range gptq``)."""

    gram: ActivationGram | None = None


def conv_key(node_name: str | None, weight_name: str | None) -> str:
    """How a k x k conv's patch Gram is keyed (the same in the calibration graph and in the plan)."""
    return f"{weight_name}|{node_name}"


def _transform_rows(transform: SiteTransform, m: np.ndarray) -> np.ndarray:
    """``T @ m`` for m [d, ...] (T = H S^-1; S^-1 for a single Hadamard), without forming T."""
    d = m.shape[0]
    out = np.asarray(m, dtype=np.float64).reshape(d, -1) * transform.inv_scale[:, None]
    hadamard: KroneckerHadamard | None = transform.hadamard
    if hadamard is not None and not transform.rotate_back:
        out = hadamard.rotate_weight_rows(out)
    return out.reshape(m.shape)


def _congruence(transform: SiteTransform, g: np.ndarray, taps: int = 1) -> np.ndarray:
    """``(T (x) I_taps) g (T (x) I_taps)^T`` for a symmetric g [d * taps, d * taps] (rows ``c * taps + t``)."""
    n = g.shape[0]
    d = n // taps
    a = _transform_rows(transform, g.reshape(d, taps * n))  # T on the row channel
    a = a.reshape(d, taps, d, taps).transpose(2, 3, 0, 1).reshape(d, taps * n)
    a = _transform_rows(transform, a).reshape(d, taps, d, taps).transpose(2, 3, 0, 1).reshape(n, n)
    return (a + a.T) / 2


def site_hessian(gram: ActivationGram, transform: SiteTransform, centered_only: bool) -> np.ndarray:
    """``Hs`` of the MatMul linears (and 1x1 convs) of a site: ``T C T^T`` when `centered_only` (a centered site
    with exact bias correction), else ``T G T^T`` (float64 [d, d])."""
    return _congruence(transform, gram.centered if centered_only else gram.raw())


def conv_hessian(gram: ActivationGram, key: str, transform: SiteTransform, taps: int) -> np.ndarray:
    """``Hs`` of a k x k conv: its patch Gram through ``T (x) I_taps`` (float64 [d * taps, d * taps])."""
    return _congruence(transform, gram.patches[key], taps)


@dataclasses.dataclass(frozen=True)
class GptqFactor:
    """The damped, (act-order) permuted Hessian of one site as GPTQ uses it: ``U`` upper, ``Hs^-1 = U^T U``."""

    upper: np.ndarray  # [in, in] float64, in the processing order
    perm: np.ndarray | None  # act-order: processing position -> input row; None: natural order
    damping: float  # the lambda added to the diagonal

    @classmethod
    def of(cls, hessian: np.ndarray, percdamp: float = DEFAULT_PERCDAMP, act_order: bool = False) -> "GptqFactor":
        h = np.array(hessian, dtype=np.float64)  # a copy
        h = (h + h.T) / 2
        diag = np.diagonal(h).copy()
        dead = diag <= 0
        h[dead, dead] = 1.0  # never active: no coupling, the column is simply rounded
        diag[dead] = 1.0
        perm = np.argsort(-diag, kind="stable") if act_order else None
        if perm is not None:
            h = h[perm][:, perm]
        damping = percdamp * float(np.mean(np.diagonal(h)))
        for attempt in range(4):
            try:
                lower = np.linalg.cholesky(h + (damping * 10.0**attempt) * np.eye(len(h)))
                break
            except np.linalg.LinAlgError:
                if attempt == 3:
                    raise
                logger.warning("GPTQ: the damped Hessian is not positive definite; damping x10")
        damping *= 10.0 ** attempt
        inv_lower = np.linalg.inv(lower)  # triangular: Hs^-1 = L^-T L^-1
        hinv = inv_lower.T @ inv_lower
        upper = np.linalg.cholesky((hinv + hinv.T) / 2).T
        return cls(upper, perm, damping)


def _group_params(w: np.ndarray, symmetric: bool, bits: int, scale_dtype,
                  unit: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """min/max scale (float64 of the scale dtype) and zero point per output row of w [out, cols]: the expressions of
    `graph_passes.weight_grid` (as `graph_passes.quantization.quantize_weight`) on one group; `unit`: two-level
    scales with these units per row."""
    if symmetric:
        amax = np.abs(w).max(axis=1)
        scale = sym_scale(amax, 2 ** (bits - 1) - 1, scale_dtype)
        if unit is not None:
            scale = two_level_scale(scale, amax, unit, scale_dtype)
        return scale.astype(np.float64), None
    wmin, wmax = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    scale, zp = asym_scale_zp(wmin, wmax, 2**bits - 1, scale_dtype)
    return scale.astype(np.float64), zp


def gptq_codes(weight_t: np.ndarray, factor: GptqFactor, block: int, bits: int, symmetric: bool,
               scale_dtype, unit: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ of ``W~^T`` [in, out]: integer codes [in, out] (float64 holding integers, zero point included), scales
    [blocks, out] in `scale_dtype` and zero points [blocks, out] (float64; None when symmetric). `unit` [out]:
    two-level scales (`graph_passes.weight_grid.two_level_scale`) with these column units."""
    w = np.array(np.asarray(weight_t, dtype=np.float64).T)  # W~ [out, in]: GPTQ's columns are the input rows
    out, cols = w.shape
    block = min(block, cols)
    blocks = -(-cols // block)
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    lo, hi = (-qmax, qmax) if symmetric else (0, qmax)
    scales = np.ones((blocks, out))
    zps = None if symmetric else np.zeros((blocks, out))
    perm = factor.perm
    if perm is not None:  # static groups: the min/max parameters of the original weight
        for g in range(blocks):
            scales[g], zp = _group_params(w[:, g * block:(g + 1) * block], symmetric, bits, scale_dtype, unit)
            if zps is not None:
                zps[g] = zp
        w = w[:, perm]
        batch = _LAZY_BATCH
    else:
        batch = block if block < cols else _LAZY_BATCH
    group_of = (perm if perm is not None else np.arange(cols)) // block
    codes = np.empty((out, cols))
    u = factor.upper
    for i1 in range(0, cols, batch):
        i2 = min(i1 + batch, cols)
        w1 = w[:, i1:i2].copy()
        err = np.empty((out, i2 - i1))
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if perm is None and col % block == 0:  # a group starts: its parameters from the weights as they are now
                width = min(block, cols - col)
                part = w1[:, i:i + width] if i + width <= i2 - i1 else w[:, col:col + width]
                scales[g], zp = _group_params(part, symmetric, bits, scale_dtype, unit)
                if zps is not None:
                    zps[g] = zp
            s = scales[g]
            col_w = w1[:, i]
            if symmetric:
                q = np.clip(np.round(col_w / s), lo, hi)
                deq = q * s
            else:
                q = np.clip(np.round(col_w / s) + zps[g], lo, hi)
                deq = (q - zps[g]) * s
            codes[:, col] = q
            e = (col_w - deq) / u[col, col]
            w1[:, i + 1:] -= np.outer(e, u[col, col + 1:i2])
            err[:, i] = e
        if i2 < cols:
            w[:, i2:] -= err @ u[i1:i2, i2:]
    if perm is not None:
        unpermuted = np.empty_like(codes)
        unpermuted[:, perm] = codes
        codes = unpermuted
    return codes.T, scales.astype(scale_dtype), zps

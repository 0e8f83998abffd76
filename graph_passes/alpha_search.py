"""``--alpha auto``: per site, the SmoothQuant exponent of a small grid with the least output error on calibration
tokens, weights and activations quantized as the graph quantizes them.

For a site reading activation ``x`` with linears ``W_1..W_k`` (all linears reading it) and a grid alpha ``a``, the
site's transform is planned as the graph's would be (`graph_passes.site_transforms.plan_site_transform`: the same
statistics, Hadamard and signs; only ``a`` changes the smoothing scales ``s_j = max|X_j|^a / max_i |W_ij|^(1-a)``), so
``T_a = H S_a^-1`` and, per linear, the stored weight ``Q_w(W~_a)`` with ``W~_a^T = H S_a W^T`` is planned by
`graph_passes.site_plan.plan_weight` (float64, cast to the weight's dtype, then quantized on the configured grid:
bits, block, symmetry, min/max or MSE range). On the sampled token rows ``x_n`` (and, for centered sites, their
centered rows ``x_n - mu_n``; `hn_export.calibration.SampleRequest`), in float64:

    z_n = T_a (x_n - mu_n)                    (mu_n = 0 for sites that are not centered)
    m_n = T_a mu_n                            (the transformed mean token)
    z^_n = Q_a(z_n)                           (per token, asymmetric min/max, the configured activation bits)
    y^_n = Q_w(W~_a) (z^_n + m_n)             float-token bias correction (and sites without centering: m_n = 0)
         = Q_w(W~_a) (z^_n + Q_a(m_n))        quantized-token (the mean quantized as one more token)
         = Q_w(W~_a) z^_n + Q_8(W~_a) m_n     exact (the int8 per-channel copy)
    E(a) = sum_linears sum_n || y^_n - W x_n ||^2

and the site takes ``argmin_a E(a)`` (ties: the earlier grid value). The bias cancels in ``y^ - y``. ``Q_a`` is
`graph_passes.emit_qdq.activation_qdq` in float64 (the graph rounds in the activation dtype). Sample rows are drawn
stratified from each calibration call (`hn_export.calibration`), so ``E`` estimates the site's output error over the
calibration distribution; with about 256 rows it is a noisy estimate for a site whose alphas differ by less than
its sampling error, which is then a coin toss between near-equal alphas (measured, PixArt-Sigma 4 blocks: the 240-row
choice is within 3.9% of the minimum E over 12000 rows at every site of block 0).

What is not modelled (the affordable proxies):

* ``--weight-range gptq`` / ``gptq-act-order``: candidates are measured on the min/max grid (GPTQ's own grid, before
  its error feedback): GPTQ per candidate costs a Cholesky per site and a column loop per linear, ``len(grid)``
  times the quantize job's GPTQ time. The chosen alpha is then quantized with GPTQ as usual.
* ``--low-rank R``: candidates are measured without the branch (an SVD per linear and candidate); the branch is split
  from the chosen alpha's weight as usual.
* ``--act-granularity timestep``: candidates are measured with per-token dynamic activations, not the static
  per-timestep scales (which are calibrated for the chosen transform afterwards).
* k x k convolutions: each tap is a linear on the sampled pixel (the weight's rows ``[in, taps * out]``), so the
  error is summed tap by tap without the cross-tap terms (the rows of a pixel's neighbours are not sampled).

Cost: ``len(grid)`` weight plans per linear (the fused weight, its quantization) and ``rows x in x out`` flops per
linear and candidate; memory one site's candidate weights at a time (measured, PixArt-Sigma 256 px 4 blocks, 28 sites,
the 2-core machine: quantize 18 -> 31 s wall).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from graph_passes.errors import GraphInputError
from graph_passes.linears import ActivationSite, LinearLayer
from graph_passes.methods import AlphaSearch, BiasCorrection, SiteAlphas, TransformOptions
from graph_passes.quantization import QuantConfig, WeightRange
from graph_passes.site_plan import plan_weight
from graph_passes.site_transforms import SiteStats, SiteTransform, plan_site_transform

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenSample:
    """Sampled token rows of one activation: ``rows`` [n, d] of ``x`` and, for centered sites, ``centered`` [n, d]
    of ``x - mu`` (the same tokens; float32 as the calibration graph returns them)."""

    rows: np.ndarray
    centered: np.ndarray | None = None

    @classmethod
    def concatenate(cls, parts: Sequence[TokenSample]) -> TokenSample:
        rows = np.concatenate([p.rows for p in parts])
        has_centered = [p.centered is not None for p in parts]
        if any(has_centered) and not all(has_centered):
            raise ValueError("token samples of one activation mix centered and raw rows")
        centered = np.concatenate([p.centered for p in parts]) if all(has_centered) else None
        return cls(rows, centered)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + (0 if self.centered is None else self.centered.nbytes)


def per_token_qdq(z: np.ndarray, bits: int) -> np.ndarray:
    """The per-token dynamic asymmetric quantizer of the graph (`graph_passes.emit_qdq.activation_qdq`), float64:
    ``scale = max((max(z, 0) - min(z, 0)) / qmax, tiny)``, ``zp = clip(round(-min / scale), 0, qmax)``,
    ``(clip(round(z / scale) + zp, 0, qmax) - zp) * scale``, ``qmax = 2^bits - 1``."""
    qmax = float(2**bits - 1)
    hi = np.maximum(z.max(axis=-1, keepdims=True), 0.0)
    lo = np.minimum(z.min(axis=-1, keepdims=True), 0.0)
    scale = np.maximum((hi - lo) / qmax, float(np.finfo(np.float32).tiny))
    zp = np.clip(np.round(-lo / scale), 0.0, qmax)
    return (np.clip(np.round(z / scale) + zp, 0.0, qmax) - zp) * scale


def transform_rows(transform: SiteTransform, m: np.ndarray) -> np.ndarray:
    """``T m`` per row of m [n, d] (``T = H S^-1``; the Hadamard's signs included), float64: with ``H = L (x) R``
    each row viewed as [K, M] becomes ``L X R^T``, two matrix products over all rows at once."""
    out = np.asarray(m, dtype=np.float64) * transform.channel_mul()
    hadamard = transform.hadamard
    if hadamard is None:
        return out
    n, k, inner = out.shape[0], hadamard.left.shape[0], hadamard.right.shape[0]
    # X R^T for every row block (R^T made contiguous: OpenBLAS multiplies by the transposed view ~30x slower here)
    out = out.reshape(n * k, inner) @ np.ascontiguousarray(hadamard.right.T)
    out = hadamard.left @ out.reshape(n, k, inner).transpose(1, 0, 2).reshape(k, n * inner)  # L (X R^T)
    return np.ascontiguousarray(out.reshape(k, n, inner).transpose(1, 0, 2)).reshape(n, k * inner)


def _weight_rows(layer: LinearLayer, matrix: np.ndarray) -> np.ndarray:
    """A linear's ``[in, out]`` matrix as rows of its input channels; a k x k conv's ``[in * taps, out]`` (rows
    ``c * taps + t``) as ``[in, taps * out]``: each tap a linear on the sampled pixel."""
    if layer.is_conv and not layer.is_pointwise:
        cin = layer.weight.const_value.shape[1]
        return matrix.reshape(cin, -1)
    return matrix


def _float_rows(layer: LinearLayer) -> np.ndarray:
    """The FP linear as `_weight_rows` lays it out, float64."""
    w = np.asarray(layer.weight.const_value.numpy(), dtype=np.float64)
    if layer.is_pointwise:
        return w[:, :, 0, 0].T
    if layer.is_conv:  # [out, in, kh, kw] -> [in * taps, out], rows c * taps + t
        return _weight_rows(layer, w.reshape(w.shape[0], -1).T)
    return w


def site_errors(site: ActivationSite, site_index: int, stats: SiteStats, sample: TokenSample,
                options: TransformOptions, config: QuantConfig, grid: Sequence[float]) -> np.ndarray:
    """``E(a)`` (module docstring) for each alpha of `grid`, float64 [len(grid)]. `site_index`: the site's position
    in the job's site list (its Hadamard signs' seed); `config`: the site's quantizer."""
    search = dataclasses.replace(config, low_rank=0, weight_range=WeightRange.MINMAX
                                 if config.weight_range.needs_hessian else config.weight_range)
    x = np.asarray(sample.rows, dtype=np.float64)
    references = [x @ _float_rows(layer) for layer in site.linears]
    errors = np.zeros(len(grid))
    for k, alpha in enumerate(grid):
        transform = plan_site_transform(site, stats, dataclasses.replace(options, alpha=alpha), site_index)
        if transform.rotate_back:
            raise ValueError("a single-Hadamard recipe does not smooth: no alpha to choose")
        mode = options.bias_correction if transform.center else None
        if transform.center:
            if sample.centered is None:
                raise GraphInputError(f"site {site.name}: --alpha auto needs the centered token samples of "
                                      f"activation {site.activation.name}; calibrate in the same run")
            centered = np.asarray(sample.centered, dtype=np.float64)
            zq = per_token_qdq(transform_rows(transform, centered), config.act_bits)
            mean = transform_rows(transform, x - centered)
        else:
            zq = per_token_qdq(transform_rows(transform, x), config.act_bits)
            mean = None
        if mode is BiasCorrection.QUANTIZED_TOKEN:
            mean = per_token_qdq(mean, config.act_bits)
        # float-token / quantized-token: the stored weight reads z^ + m (one product); exact: m reads the int8 copy
        reads = zq if mean is None or mode is BiasCorrection.EXACT else zq + mean
        planned: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        for layer, reference in zip(site.linears, references):
            key = id(layer.node) if layer.is_pointwise else id(layer.weight)
            if key not in planned:
                plan = plan_weight(layer, transform, search, False, mode is BiasCorrection.EXACT)
                correction = None if plan.correction is None else plan.correction.dequantize()
                planned[key] = (_weight_rows(layer, plan.quantized.dequantize()), correction)
            weight, correction = planned[key]
            y = reads @ weight
            if mode is BiasCorrection.EXACT:
                y += mean @ (correction if correction is not None else weight)
            y -= reference
            errors[k] += float(np.einsum("ij,ij->", y, y))
    return errors


def choose_alphas(sites: Sequence[ActivationSite], stats: Mapping[str, SiteStats],
                  samples: Mapping[str, TokenSample], options: TransformOptions, quant: QuantConfig,
                  outer: frozenset[str] = frozenset()) -> SiteAlphas:
    """Per site (in `sites` order, the job's: the Hadamard seeds follow it) the alpha of ``options.alpha`` (an
    `AlphaSearch`) with the least `site_errors`; `outer` sites at ``quant.outer_bits``. `stats` and `samples` are
    keyed by activation name."""
    search = options.alpha
    if not isinstance(search, AlphaSearch):
        raise ValueError(f"choose_alphas needs an AlphaSearch, not {search!r}")
    if not options.method.recipe.smooth:
        raise ValueError(f"--method {options.method.value} does not smooth: no alpha to choose")
    chosen = []
    for index, site in enumerate(sites):
        name = site.activation.name
        if name not in samples or name not in stats:
            raise GraphInputError(f"site {site.name}: --alpha auto needs token samples and statistics of activation "
                                  f"{name} from this run's calibration (saved --stats files hold no samples)")
        errors = site_errors(site, index, stats[name], samples[name], options, quant.for_site(site.name in outer),
                             search.grid)
        best = int(np.argmin(errors))
        chosen.append((site.name, search.grid[best]))
        logger.debug("alpha auto: site %s errors %s -> %g", site.name, np.array2string(errors, precision=4),
                     search.grid[best])
    counts = collections.Counter(alpha for _, alpha in chosen)
    rows = sorted({samples[site.activation.name].rows.shape[0] for site in sites})
    logger.info("alpha auto: %d sites, chosen %s (grid %s; %s token rows per activation)", len(chosen),
                ", ".join(f"{alpha:g} x{counts[alpha]}" for alpha in sorted(counts)),
                ",".join(f"{a:g}" for a in search.grid), "/".join(map(str, rows)))
    return SiteAlphas(tuple(chosen))

"""The quantization plan: one frozen `SitePlan` per activation site, computed once per job from the FP graph.

The plan is the contract between the planning step and the emitters (`graph_passes.emit` and the ``emit_*``
modules): an emitter receives the plans in its constructor and writes them in one format; it never reads back
what another pass wrote. Everything numeric is decided here, in float64 numpy, cast at the end:

* the site's transform ``x~ = H S^-1 (x - mu)`` (`graph_passes.site_transforms.plan_site_transform`; with
  ``--alpha auto`` the options carry the alpha chosen per site, `graph_passes.alpha_search`);
* per linear, the weight the site's linears multiply: ``W~^T = H S W^T`` (``S W^T`` for a single Hadamard) cast
  to the weight's dtype, and, when quantizing, its integer codes and block scales (`QuantizedWeight`, the same
  integers in every output format) and the ``exact`` bias correction's int8 per-channel copy;
* with ``--weight-range gptq``, the Hessian of what each weight multiplies (`graph_passes.gptq`: the site's Gram
  from the calibration run, through the site's transform), factored once per site and shared by its linears;
* with ``--low-rank R``, per MatMul weight the rank-R float branch (`graph_passes.low_rank`): the residual is what
  is quantized;
* the activation quantizer: bits, per-token dynamic or static per-timestep, and the static scales
  ``absmax[k] / (2^(b-1) - 1)`` (float64; the emitter casts them to the activation's dtype);
* how ``W mu`` is restored for a centered site (`BiasCorrection`).

Weights are planned once per stored weight: linears of one site that read the same initializer share one
`WeightPlan`; a transformed site's weight that something outside the site (or an earlier untransformed site) also
reads is fused into a copy (``copy``), the others in place. Sites without a transform share the original weight.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np

from graph_passes.errors import GraphInputError
from graph_passes.gptq import GptqFactor, conv_hessian, conv_key, site_hessian
from graph_passes.linears import ActivationSite, LinearLayer, SiteSelection
from graph_passes.low_rank import LowRankBranch, split_low_rank
from graph_passes.methods import BiasCorrection, TransformOptions
from graph_passes.quantization import (
    QuantConfig,
    QuantizedWeight,
    WeightRange,
    quantize_weight,
    quantize_weight_per_channel_int8,
)
from graph_passes.site_transforms import SiteStats, SiteTransform, plan_site_transform
from graph_passes.static_act_quant import ActGranularity, ActScaleTable

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StaticScales:
    """Static per-tensor symmetric scales, one per sampling timestep (`graph_passes.static_act_quant`)."""

    timestep_input: str  # the graph input that carries the timestep
    timesteps: np.ndarray  # [K] the table's timesteps (the graph picks the nearest)
    scales: np.ndarray  # [K] float64: absmax[k] / (2^(b-1) - 1)


@dataclasses.dataclass(frozen=True)
class ActQuantSpec:
    """The activation quantizer of one site: `bits` on the tensor the site's linears read (after its transform;
    before a single-Hadamard back rotation)."""

    bits: int
    granularity: ActGranularity = ActGranularity.TOKEN  # TOKEN: per-token dynamic asymmetric min/max
    static: StaticScales | None = None  # TIMESTEP: the site's scales

    def __post_init__(self) -> None:
        if (self.static is not None) != (self.granularity is ActGranularity.TIMESTEP):
            raise ValueError("static scales go with --act-granularity timestep, and only with it")


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """One stored weight of a site: fused, and quantized when the job quantizes."""

    layout: str  # "matmul": ``W^T`` [in, out] (a 1x1 conv's too); "conv": a k x k kernel [out, in, kh, kw]
    copy: bool  # fused into a new initializer ``<weight>.<site>`` (the original is also read outside the site)
    fused: np.ndarray | None  # float weights only (no quantization): ``W~`` in the weight's dtype; None: unchanged
    quantized: QuantizedWeight | None  # ``W~^T`` (a conv: [in * kh * kw, out]) in blocks; None without quantization
    correction: QuantizedWeight | None = None  # ``exact`` bias correction: int8 per output channel of ``W~^T``
    kernel_shape: tuple[int, ...] = ()  # "conv": the kernel's shape
    low_rank: LowRankBranch | None = None  # ``--low-rank``: the float branch; `quantized` then holds the residual


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    layer: LinearLayer  # the linear in the FP graph (its node, weight, bias)
    weight: WeightPlan


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """Everything an emitter writes for one activation site."""

    site: ActivationSite  # the activation tensor and the linears that read it (FP graph)
    transform: SiteTransform  # center / scale / rotation; ``transform.op`` None: no transform op
    linears: tuple[LinearPlan, ...]  # in the site's order
    act: ActQuantSpec | None  # None: activations stay float (transform only, calibration probes)
    bias_correction: BiasCorrection | None  # centered sites: how ``W mu`` is restored; None otherwise

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def width(self) -> int:
        return self.site.width

    @property
    def integer_matmuls(self) -> bool:
        """Every linear is a MatMul once the conv views are in (linears and 1x1 convs; not k x k convs)."""
        return all(lp.layer.is_matmul or lp.layer.is_pointwise for lp in self.linears)


def plan_transforms(sites: list[ActivationSite], stats: Mapping[str, SiteStats],
                    options: TransformOptions) -> dict[str, SiteTransform]:
    """`stats` is keyed by activation tensor name (statistics describe a tensor, whichever sites read it)."""
    return {site.name: plan_site_transform(site, stats.get(site.activation.name), options, i)
            for i, site in enumerate(sites)}


def outer_sites(sites: list[ActivationSite], selection: SiteSelection) -> frozenset[str]:
    """With ``selection.outer_linears`` (``--every-linear``): the sites whose linears all lie outside the family's
    blocks; none otherwise, or when the graph's family is unknown."""
    roles = selection.roles
    if roles is None or not selection.outer_linears:
        return frozenset()
    return frozenset(site.name for site in sites
                     if all(roles.block_of(linear.module_path) is None for linear in site.linears))


def _act_spec(site: str, bits: int, act_scales: ActScaleTable | None) -> ActQuantSpec:
    if act_scales is None:
        return ActQuantSpec(bits)
    if site not in act_scales.absmax:
        raise GraphInputError(f"the activation scale table has no entry for site {site}; recalibrate, or add the "
                              "site to the table file")
    scales = np.asarray(act_scales.absmax[site], np.float64) / (2 ** (bits - 1) - 1)
    static = StaticScales(act_scales.timestep_input, np.asarray(act_scales.timesteps), scales)
    return ActQuantSpec(bits, ActGranularity.TIMESTEP, static)


def plan_weight(layer: LinearLayer, transform: SiteTransform, config: QuantConfig | None, copy: bool,
                correction: bool, gptq: GptqFactor | None = None) -> WeightPlan:
    """One stored weight of a site: fused by `transform` (float64, cast to the weight's dtype), quantized by
    `config` (the GPTQ ranges with `gptq`), with the ``exact`` bias correction's int8 copy when `correction`
    (`graph_passes.alpha_search` plans its candidates here too, so it measures the weights the graph stores)."""
    array = layer.weight.const_value.numpy()
    kxk = layer.is_conv and not layer.is_pointwise
    if layer.is_pointwise:
        array = np.ascontiguousarray(array[:, :, 0, 0].T)  # the 1x1 conv as the MatMul it becomes
    dtype = array.dtype
    if transform.op is None:
        exact = fused = array
    else:  # float64, cast at the end (the low-rank split below works on the float64 weight)
        exact = transform.fuse_conv_weight(array) if kxk else transform.fuse_weight(array)
        fused = exact.astype(dtype)
    if config is None:
        return WeightPlan("conv" if kxk else "matmul", copy, fused if transform.op is not None else None, None,
                          kernel_shape=array.shape if kxk else ())
    if kxk:  # ``W`` [out, in, kh, kw] as ``[in * kh * kw, out]`` in blocks of B input channels with all their taps
        out, cin = array.shape[:2]
        taps = int(np.prod(array.shape[2:]))
        block = min(config.weight_block, cin) * taps
        quantized = quantize_weight(fused.reshape(out, cin * taps).T, dataclasses.replace(config, weight_block=block),
                                    dtype, gptq)
        return WeightPlan("conv", copy, None, quantized, kernel_shape=array.shape)
    branch = None
    if config.low_rank > 0 and not layer.is_pointwise:
        grid = dataclasses.replace(config, weight_range=WeightRange.MINMAX)  # the decision's measure: min/max codes
        residual, branch = split_low_rank(exact, transform, config.low_rank, dtype,
                                          lambda m: quantize_weight(m, grid, dtype).dequantize())
        fused = residual if branch is not None else fused
    int8 = quantize_weight_per_channel_int8(fused, dtype) if correction else None
    return WeightPlan("matmul", copy, None, quantize_weight(fused, config, dtype, gptq), int8, low_rank=branch)


class _SiteHessians:
    """The GPTQ factors of one site, made when a weight first needs one: the site's token Hessian (MatMul linears,
    1x1 convs) and each k x k conv's patch Hessian (`graph_passes.gptq`)."""

    def __init__(self, site: ActivationSite, stats: Mapping[str, SiteStats], transform: SiteTransform,
                 mode: BiasCorrection | None, config: QuantConfig):
        self.site, self.transform, self.config = site, transform, config
        self.gram = getattr(stats.get(site.activation.name), "gram", None)
        if self.gram is None:
            raise GraphInputError(f"site {site.name}: --weight-range {config.weight_range.value} needs the Hessian of "
                                  f"activation {site.activation.name}; calibrate in the same run (saved --stats "
                                  "files hold no Hessians)")
        # exact bias correction multiplies the mean by its own int8 copy: the quantized weight sees x~ only
        self.centered_only = mode is BiasCorrection.EXACT
        self.token: GptqFactor | None = None

    def factor(self, layer: LinearLayer) -> GptqFactor:
        act_order = self.config.weight_range is WeightRange.GPTQ_ACT_ORDER
        if layer.is_conv and not layer.is_pointwise:
            key = conv_key(layer.node.name, layer.weight.name)
            if key not in self.gram.patches:
                raise GraphInputError(f"site {self.site.name}: no patch Hessian for conv {layer.node.name}; "
                                      "calibrate in the same run")
            taps = int(np.prod(layer.weight.const_value.shape[2:]))
            hessian = conv_hessian(self.gram, key, self.transform, taps)
            return GptqFactor.of(hessian, self.config.gptq_damp, act_order)
        if self.token is None:
            hessian = site_hessian(self.gram, self.transform, self.centered_only)
            self.token = GptqFactor.of(hessian, self.config.gptq_damp, act_order)
        return self.token


def plan_sites(sites: list[ActivationSite], stats: Mapping[str, SiteStats], options: TransformOptions,
               quant: QuantConfig | None, *, outer: frozenset[str] = frozenset(),
               act_scales: ActScaleTable | None = None, act_bits: int | None = None) -> tuple[SitePlan, ...]:
    """The plan of every site. `quant`: quantized weights and activations (`outer` sites at
    ``quant.outer_bits``, static activation scales from `act_scales`); None: float weights, with `act_bits`
    per-token activation quantizers (the sensitivity study's gated ones) or none."""
    transforms = plan_transforms(sites, stats, options)
    weights: dict[tuple[int, str | None], WeightPlan] = {}
    transformed_readers: set[int] = set()  # nodes of earlier transformed sites (they read their fused weights)
    plans = []
    for site in sites:
        transform = transforms[site.name]
        config = quant.for_site(site.name in outer) if quant is not None else None
        if config is not None:
            act = _act_spec(site.name, config.act_bits, act_scales)
        else:
            act = ActQuantSpec(act_bits) if act_bits is not None else None
        mode = options.bias_correction if transform.center else None
        if config is not None and config.low_rank > 0 and transform.rotate_back:
            raise GraphInputError(f"site {site.name}: --low-rank needs the weight that is quantized to be the one the "
                                  "branch approximates; a single-Hadamard method (hqdm) quantizes it unrotated in "
                                  "integer parts: use another --method, or drop --low-rank")
        hessians = _SiteHessians(site, stats, transform, mode, config) \
            if config is not None and config.weight_range.needs_hessian else None
        own = {id(layer.node) for layer in site.linears}
        linears = []
        for layer in site.linears:
            fused_here = transform.op is not None
            key = (id(layer.node) if layer.is_pointwise else id(layer.weight), site.name if fused_here else None)
            if key not in weights:
                copy = fused_here and not layer.is_pointwise and any(
                    id(node) not in own and id(node) not in transformed_readers for node, _ in layer.weight.uses())
                if copy:
                    logger.info("weight %s of site %s is shared outside the site: fusing a copy", layer.weight.name,
                                site.name)
                weights[key] = plan_weight(layer, transform, config, copy, mode is BiasCorrection.EXACT,
                                           hessians.factor(layer) if hessians is not None else None)
            linears.append(LinearPlan(layer, weights[key]))
        if transform.op is not None:
            transformed_readers |= own
        plans.append(SitePlan(site, transform, tuple(linears), act, mode))
    if quant is not None and quant.low_rank > 0:
        kept = sum(1 for p in plans for lp in p.linears if lp.weight.low_rank is not None)
        logger.info("low-rank branch (rank %d) kept on %d of %d linears (the others: no lower weight error)",
                    quant.low_rank, kept, sum(len(p.linears) for p in plans))
    return tuple(plans)

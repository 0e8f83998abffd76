"""The W-A quantization pipeline: site tagging -> conv token views -> transform + weight fusion -> bias correction ->
quantize -> [fused attention] -> clean-up.

`build_pipeline` returns an onnx-ir `PassManager` ending in onnx-ir's common clean-up passes and a full
`onnx.checker` check. `quantize_model` plans each site's transform from calibration statistics and runs it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import onnx_ir as ir
from onnx_ir.passes.common import (
    CheckerPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
    TopologicalSortPass,
)

from graph_passes.activation_probe import ActivationProbePass
from graph_passes.attention_op import AttentionPrecision
from graph_passes.bias_correction import BiasCorrectionPass
from graph_passes.conv_sites import ConvSitesPass
from graph_passes.errors import from_pass_error
from graph_passes.fuse_attention import FuseAttentionPass
from graph_passes.gated_activation_quant import GatedActivationQuantPass
from graph_passes.insert_transforms import InsertTransformsPass
from graph_passes.linears import ActivationSite, SiteSelection, find_activation_sites
from graph_passes.lower_fused import LowerToFusedPass
from graph_passes.lower_nbits import LowerToNBitsPass
from graph_passes.methods import TransformOptions
from graph_passes.quantization import OutputFormat, QuantConfig
from graph_passes.quantize import QuantizePass
from graph_passes.site_transforms import SiteStats, SiteTransform, plan_site_transform
from graph_passes.static_act_quant import ActScaleTable
from graph_passes.tag_sites import TagSitesPass

logger = logging.getLogger(__name__)


def plan_transforms(
    sites: list[ActivationSite], stats: Mapping[str, SiteStats], options: TransformOptions
) -> dict[str, SiteTransform]:
    """`stats` is keyed by activation tensor name (statistics describe a tensor, whichever sites read it)."""
    return {
        site.name: plan_site_transform(site, stats.get(site.activation.name), options, i)
        for i, site in enumerate(sites)
    }


def outer_sites(sites: list[ActivationSite], selection: SiteSelection) -> frozenset[str]:
    """With ``selection.outer_linears`` (``--every-linear``): the sites whose linears all lie outside the family's
    blocks; none otherwise, or when the graph's family is unknown."""
    roles = selection.roles
    if roles is None or not selection.outer_linears:
        return frozenset()
    return frozenset(site.name for site in sites
                     if all(roles.block_of(linear.module_path) is None for linear in site.linears))


def build_pipeline(
    transforms: dict[str, SiteTransform],
    options: TransformOptions,
    quant: QuantConfig | None,
    selection: SiteSelection,
    gated_act_bits: int | None = None,
    act_scales: ActScaleTable | None = None,
    probe: bool = False,
    outer: frozenset[str] = frozenset(),
    attention: AttentionPrecision | None = None,
) -> ir.passes.PassManager:
    """`gated_act_bits`: instead of quantizing, put every activation quantizer behind a runtime switch (the
    sensitivity study); weights stay in float. `act_scales`: static per-timestep activation quantizers instead of
    per-token dynamic ones. `probe`: no quantization; one output per site with max |x~| (calibrating `act_scales`).
    `outer`: the sites outside the blocks (`outer_sites`), quantized at ``quant.outer_bits``. `attention`: replace
    every recognised softmax attention by ``hadanorm::Attention`` at that precision (None: keep them)."""
    passes: list[ir.passes.PassBase] = [
        TagSitesPass(selection),
        ConvSitesPass(),
        InsertTransformsPass(transforms),
        BiasCorrectionPass(options.bias_correction),
    ]
    if probe:
        passes.append(ActivationProbePass(list(transforms)))
    elif gated_act_bits is not None:
        passes.append(GatedActivationQuantPass(gated_act_bits, list(transforms)))
    elif quant is not None:
        passes.append(QuantizePass(quant, act_scales, outer))
        if quant.format is OutputFormat.NBITS:
            passes.append(LowerToNBitsPass())
        elif quant.format is OutputFormat.FUSED:
            passes.append(LowerToFusedPass())
    if attention is not None:
        passes.append(FuseAttentionPass(attention))
    return ir.passes.PassManager(passes + cleanup_passes())


def cleanup_passes(check: bool = True) -> list[ir.passes.PassBase]:
    """onnx-ir's clean-up after a rewrite, and (`check`) a full `onnx.checker` check."""
    passes: list[ir.passes.PassBase] = [RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass(),
                                        TopologicalSortPass()]
    return passes + ([CheckerPass(full_check=True)] if check else [])


def attention_pipeline(precision: AttentionPrecision, check: bool = True) -> ir.passes.PassManager:
    """Only the fused attention (`hn-export optimize`; calibration's session copy, unchecked) and the clean-up."""
    return ir.passes.PassManager([FuseAttentionPass(precision)] + cleanup_passes(check))


@dataclasses.dataclass
class QuantizeResult:
    sites: list[ActivationSite]
    transforms: dict[str, SiteTransform]


def quantize_model(
    model: ir.Model,
    stats: Mapping[str, SiteStats],
    options: TransformOptions,
    quant: QuantConfig | None,
    selection: SiteSelection = SiteSelection(),
    gated_act_bits: int | None = None,
    sites: list[ActivationSite] | None = None,
    act_scales: ActScaleTable | None = None,
    probe: bool = False,
    attention: AttentionPrecision | None = None,
) -> QuantizeResult:
    """Rewrite `model` in place. ``quant=None`` inserts and fuses the transforms only (the exactness check).
    `sites`: the activation sites of `selection`, when the caller found them already."""
    sites = sites if sites is not None else find_activation_sites(model, selection)
    transforms = plan_transforms(sites, stats, options)
    try:
        build_pipeline(transforms, options, quant, selection, gated_act_bits, act_scales, probe,
                       outer_sites(sites, selection), attention)(model)
    except ir.passes.PassError as exc:  # wraps what a pass raised: one line, no traceback
        raise from_pass_error(exc) from None
    logger.info("%s: %d sites, %s", options.method.value, len(sites), quant.label if quant else "transform only")
    return QuantizeResult(sites, transforms)

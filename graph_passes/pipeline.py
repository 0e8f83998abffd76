"""The W-A quantization pipeline: plan every site, write the plans in one format, [fused matmul epilogues: low-rank
branches, then Gelu, then gated residual adds; the adaLN modulation into the quantize ops (fused format)], [fused
attention], clean up.

`quantize_model` finds the activation sites (unless the caller did), computes one `SitePlan` per site
(`graph_passes.site_plan.plan_sites`: transform, weight integers, activation quantizer, bias correction) and runs
`build_pipeline`: the emitter of the output format (`graph_passes.emit` and the ``emit_*`` modules), then onnx-ir's
common clean-up passes and a full `onnx.checker` check.
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

from graph_passes.activation_probe import ProbeEmitter
from graph_passes.attention_op import AttentionPrecision
from graph_passes.emit import SiteEmitter, TransformEmitter
from graph_passes.emit_fused import FusedEmitter
from graph_passes.emit_nbits import NBitsEmitter
from graph_passes.emit_qdq import QdqEmitter
from graph_passes.errors import from_pass_error
from graph_passes.fuse_attention import FuseAttentionPass
from graph_passes.fuse_matmul_activation import FuseMatMulActivationPass
from graph_passes.fuse_matmul_low_rank import FuseMatMulLowRankPass
from graph_passes.fuse_matmul_residual import FuseMatMulResidualPass
from graph_passes.fuse_modulation import FuseModulationPass
from graph_passes.gated_activation_quant import GatedEmitter
from graph_passes.linears import ActivationSite, SiteSelection, find_activation_sites
from graph_passes.methods import TransformOptions
from graph_passes.quantization import OutputFormat, QuantConfig
from graph_passes.site_plan import SitePlan, outer_sites, plan_sites
from graph_passes.site_transforms import SiteStats, SiteTransform
from graph_passes.static_act_quant import ActScaleTable

logger = logging.getLogger(__name__)

EMITTERS: dict[OutputFormat, type[SiteEmitter]] = {
    OutputFormat.QDQ: QdqEmitter,
    OutputFormat.NBITS: NBitsEmitter,
    OutputFormat.FUSED: FusedEmitter,
}


def build_pipeline(emitter: SiteEmitter, attention: AttentionPrecision | None = None) -> ir.passes.PassManager:
    """`emitter`: the plans in one format (constructed with them). `attention`: replace every recognised softmax
    attention by ``hadanorm::Attention`` at that precision (None: keep them)."""
    return ir.passes.PassManager([
        emitter,
        *([FuseMatMulLowRankPass(), FuseMatMulActivationPass(), FuseMatMulResidualPass(), FuseModulationPass()]
          if isinstance(emitter, FusedEmitter) else []),
        *([FuseAttentionPass(attention)] if attention is not None else []),
        *cleanup_passes(),
    ])


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
    plans: tuple[SitePlan, ...] = ()


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
    `gated_act_bits`: instead of quantizing, put every activation quantizer behind a runtime switch (the
    sensitivity study); weights stay in float. `act_scales`: static per-timestep activation quantizers instead of
    per-token dynamic ones. `probe`: no quantization; one output per site with max |x~| (calibrating `act_scales`).
    `sites`: the activation sites of `selection`, when the caller found them already (sites are found once)."""
    sites = sites if sites is not None else find_activation_sites(model, selection)
    float_weights = probe or gated_act_bits is not None or quant is None
    plans = plan_sites(sites, stats, options, None if float_weights else quant, outer=outer_sites(sites, selection),
                       act_scales=act_scales, act_bits=None if probe else gated_act_bits)
    if probe:
        emitter: SiteEmitter = ProbeEmitter(plans)
    elif gated_act_bits is not None:
        emitter = GatedEmitter(plans)
    elif quant is None:
        emitter = TransformEmitter(plans)
    else:
        emitter = EMITTERS[quant.format](plans)
    try:
        build_pipeline(emitter, attention)(model)
    except ir.passes.PassError as exc:  # wraps what a pass raised: one line, no traceback
        raise from_pass_error(exc) from None
    logger.info("%s: %d sites, %s", options.method.value, len(sites), quant.label if quant else "transform only")
    return QuantizeResult(sites, {plan.name: plan.transform for plan in plans}, plans)

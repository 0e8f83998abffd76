"""The quantize job behind `hn-export MODEL.onnx --w4a4`: load, calibrate (or reuse statistics), [choose the alphas
of ``--alpha auto``], rewrite, save."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from pathlib import Path

import onnx_ir as ir

from graph_passes.alpha_search import choose_alphas
from graph_passes.attention_op import AttentionPrecision, attention_precisions, fused_attentions
from graph_passes.hadamard import hadamard_factors
from graph_passes.linears import SiteSelection, find_activation_sites
from hn_export.families import selection_for
from graph_passes.methods import AlphaSearch, SiteAlphas, TransformOptions
from graph_passes.pipeline import quantize_model
from graph_passes.quantization import OutputFormat, QuantConfig
from graph_passes.site_plan import outer_sites
from graph_passes.static_act_quant import ActGranularity
from hn_export.act_scales import calibrate_act_scales, load_act_scales, save_act_scales
from hn_export.calibration import CalibrationStats, HessianRequest, SampleRequest, ShardMap, calibrate, model_hash
from hn_export.denoise import DenoiseConfig, ModelSignature, load_input_file
from hn_export.errors import UserError
from hn_export.graph_import import check_float_graph, load_graph
from hn_export.model_files import check_output_path, input_files, save_model
from hn_export.metadata_keys import (
    ACT_GRANULARITY_KEY,
    ALPHA_KEY,
    ATTENTION_KEY,
    BIAS_CORRECTION_KEY,
    BITS_KEY,
    FORMAT_KEY,
    LOW_RANK_KEY,
    METHOD_KEY,
    SESSION_CONFIG_KEY,
    TRANSFORM_OPS_KEY,
    WEIGHT_RANGE_KEY,
    WEIGHT_SCALES_KEY,
)
from runtime.domain import HADANORM_DOMAIN

logger = logging.getLogger(__name__)


# The precision of the fused attention that `fused` graphs get by default: fast, the fastest path of the CPU that
# runs the graph, measured (benchmarks/attention.md, benchmarks/peers/): the bf16 tiles on AMX, int8 on AVX512-VNNI
# without AMX; the one-call SQNR of the W4A4 graphs with either is that with float attention, within noise.
DEFAULT_FUSED_ATTENTION = AttentionPrecision.FAST


class AttentionChoice(enum.Enum):
    """``--attention``: ``auto`` fuses the softmax attentions of ``fused`` graphs at `DEFAULT_FUSED_ATTENTION` and
    keeps those of the other formats (stock onnxruntime runs them); ``none`` keeps them; ``float`` / ``bf16`` /
    ``int8`` / ``fast`` fuse them at that precision whatever the format."""

    AUTO = "auto"
    NONE = "none"
    FLOAT = "float"
    BF16 = "bf16"
    INT8 = "int8"
    FAST = "fast"

    def resolve(self, quant: QuantConfig | None) -> AttentionPrecision | None:
        if self is AttentionChoice.AUTO:
            fused = quant is not None and quant.format is OutputFormat.FUSED
            return DEFAULT_FUSED_ATTENTION if fused else None
        return None if self is AttentionChoice.NONE else AttentionPrecision(self.value)


@dataclasses.dataclass(frozen=True)
class QuantizeJob:
    model_path: Path
    output: Path
    transform: TransformOptions
    quant: QuantConfig | None  # None = --transform-only
    selection: SiteSelection = SiteSelection()
    calibration: DenoiseConfig = DenoiseConfig(samples=2, steps=20)
    calib_inputs: Path | None = None
    stats_path: Path | None = None  # reuse statistics
    save_stats: Path | None = None
    stats: CalibrationStats | None = None  # statistics already in memory (compare computes them once)
    progress: bool = True
    act_granularity: ActGranularity = ActGranularity.TOKEN
    act_scales_path: Path | None = None  # a per-timestep activation scale table to use (else calibrated)
    save_act_scales: Path | None = None
    attention: AttentionChoice = AttentionChoice.AUTO
    cluster: ShardMap | None = None  # --ray: calibrate as a map-reduce on it (`hn_export.cluster.Cluster`)


@dataclasses.dataclass
class QuantizeReport:
    output: Path
    files: list[Path]
    sites: int
    linears: int
    weight_bytes_before: int  # the site linears' float weights
    weight_bytes_after: int  # their quantized integers + scales
    bias_correction_bytes: int  # extra int8 copies (exact bias correction)
    calibration: str
    attention: str = "none"  # e.g. "4 softmax attentions fused (bf16)", or "none" (read from the written graph)


def default_output(model_path: Path, quant: QuantConfig | None) -> Path:
    label = quant.label if quant is not None else "transformed"
    return model_path.with_name(f"{model_path.name.removesuffix('.onnx')}.{label}.onnx")


_MAIN_WEIGHT_OPS = {"MatMulNBits"}  # and IntMatMul4 / IntMatMul8 with their epilogue forms (inputs b, scales, zero_points)
_CORRECTION_WEIGHT_OPS = {"FloatMatMul4", "FloatMatMul8"}


def _weight_bytes(model: ir.Model) -> tuple[int, int]:
    """Bytes of the quantized site weights (integers + scales + zero points) and of the exact-correction copies,
    in any output format (each initializer counted once). In ``qdq`` graphs the weights are the
    ``DequantizeLinear`` nodes that read integer initializers: blocked ones (``block_size``) are site weights,
    per-channel ones (``axis=1``) the exact correction's int8 copies."""
    main: dict[int, int] = {}
    extra: dict[int, int] = {}
    for node in model.graph:
        inputs = node.inputs
        if node.op_type == "DequantizeLinear" and node.inputs[0] is not None and node.inputs[0].is_initializer():
            target = main if "block_size" in node.attributes else extra
        elif node.op_type.startswith(("IntMatMul4", "IntMatMul8")):  # with its epilogue forms: the packed weight only
            target, inputs = main, node.inputs[3:6]
        elif node.op_type in _MAIN_WEIGHT_OPS:
            target = main
        elif node.op_type in _CORRECTION_WEIGHT_OPS:
            target = extra
        else:
            continue
        for value in inputs:
            if value is not None and value.const_value is not None and value.is_initializer():
                target[id(value)] = value.const_value.nbytes
    return sum(main.values()), sum(v for k, v in extra.items() if k not in main)


def check_outputs(job: QuantizeJob, *inputs: Path | None) -> None:
    """Every file the job writes, before any work: the model (and its ``.data``), --save-stats, --save-act-scales;
    none may be an input or another output."""
    check_output_path(job.output, *inputs, data_file=True)
    written = {job.output.resolve(): "-o path",
               job.output.with_name(job.output.name + ".data").resolve(): "data file beside -o"}
    for path, option in ((job.save_stats, "--save-stats"), (job.save_act_scales, "--save-act-scales")):
        if path is not None:
            check_output_path(path, *inputs, what=option)
            if path.resolve() in written:
                raise UserError(f"{option} {path} is also the {written[path.resolve()]}",
                                "give each output its own path")
            written[path.resolve()] = f"{option} path"


def _holds_hessians(stats: CalibrationStats, sites) -> bool:
    """Statistics in memory (compare's) that carry the Gram of every site's activation."""
    return all(getattr(stats.sites.get(site.activation.name), "gram", None) is not None for site in sites)


def _holds_samples(stats: CalibrationStats, request: SampleRequest) -> bool:
    """Statistics in memory that carry the token samples `request` asks for (centered ones included)."""
    return all(name in stats.samples and (name not in request.centered or stats.samples[name].centered is not None)
               for name in request.activations)


def searches_alpha(job: QuantizeJob) -> bool:
    """``--alpha auto`` with a method that smooths (without smoothing there is no alpha: it has no effect)."""
    return isinstance(job.transform.alpha, AlphaSearch) and job.transform.method.recipe.smooth


def check_alpha_search(job: QuantizeJob) -> None:
    """``--alpha auto`` needs quantized weights and activations to measure, and the token samples of this run's
    calibration (one line, before any work; the quantize command and the bundle both reach it here)."""
    if not isinstance(job.transform.alpha, AlphaSearch):
        return
    if job.quant is None:
        raise UserError("--alpha auto chooses the alpha with the least quantization error, --transform-only "
                        "quantizes nothing", "drop one of them (or pass a number to --alpha)")
    if searches_alpha(job) and job.stats_path is not None:
        raise UserError("--alpha auto needs token samples of a calibration run, which --stats files do not hold",
                        "drop --stats (--save-stats still saves the statistics), or pass a number to --alpha")


def run_quantize(job: QuantizeJob) -> QuantizeReport:
    inputs = (job.model_path, job.calib_inputs, job.stats_path, job.act_scales_path)
    check_alpha_search(job)
    check_outputs(job, *inputs)
    model = load_graph(job.model_path)  # any exporter: opset converted, exporter fixes, Gemm linears as MatMul
    check_outputs(job, *inputs, *input_files(model))  # the input's external data files too
    check_float_graph(model, str(job.model_path))
    selection = selection_for(model, job.selection)
    sites = find_activation_sites(model, selection)  # fail fast on graphs with no linears
    before = sum(lin.weight.const_value.nbytes for site in sites for lin in site.linears)
    if job.transform.method.recipe.rotate:  # a width the Hadamard cannot rotate: one line before calibrating
        for width in sorted({site.width for site in sites}):
            hadamard_factors(width, job.transform.hadamard_mode, block_size=job.transform.block)
    if job.calib_inputs is not None and job.stats is None:  # the file, before any calibration
        load_input_file(job.calib_inputs, ModelSignature.of(model), "calibration input file")
    timestep = job.quant is not None and job.act_granularity is ActGranularity.TIMESTEP
    act_scales = None
    if timestep and job.act_scales_path is not None:  # the table, before any calibration
        act_scales = load_act_scales(job.act_scales_path, model, sites, job.calibration.steps)
    # --weight-range gptq: the Hessians of the sites' activations, from this run's calibration (never saved)
    hessians = HessianRequest.of(sites) if job.quant is not None and job.quant.weight_range.needs_hessian else None
    if hessians is not None and job.stats_path is not None:
        raise UserError(f"--weight-range {job.quant.weight_range.value} needs the Hessians of a calibration run, "
                        "which --stats files do not hold", "drop --stats (--save-stats still saves the statistics)")
    # --alpha auto: token samples of the sites' activations, from this run's calibration (never saved)
    samples = SampleRequest.of(sites, job.transform.method.recipe.center) if searches_alpha(job) else None
    stats = CalibrationStats(model_hash="", sites={}, calls=0, source="none (the method needs no statistics)")
    if job.transform.method.recipe.smooth or hessians is not None:
        if job.stats is not None and (hessians is None or _holds_hessians(job.stats, sites)) \
                and (samples is None or _holds_samples(job.stats, samples)):
            stats = job.stats
        elif job.stats_path is not None:
            stats = CalibrationStats.load(job.stats_path, expected_hash=model_hash(job.model_path), sites=sites)
        else:
            stats = calibrate(job.model_path, job.calibration, job.calib_inputs, progress=job.progress, model=model,
                              hessians=hessians, cluster=job.cluster, samples=samples)
            if hessians is not None:
                stats.source += "; GPTQ Hessians"
            if samples is not None:
                stats.source += "; token samples for --alpha auto"
        if job.save_stats is not None:
            stats.save(job.save_stats)
    calibration = stats.source
    transform = job.transform
    if samples is not None:
        transform = dataclasses.replace(transform, alpha=choose_alphas(
            sites, stats.sites, stats.samples, transform, job.quant, outer_sites(sites, selection)))
        if stats is not job.stats:
            stats.samples = {}  # this run's: not needed past the choice (560 MB at 28 PixArt blocks)
    if timestep:
        if act_scales is not None:
            calibration += f"; activation scales from {job.act_scales_path.name}"
        else:
            act_scales = calibrate_act_scales(model, sites, stats.sites, transform, selection, job.calibration,
                                              job.calib_inputs, job.progress)
            source = f"file:{job.calib_inputs.name}" if job.calib_inputs else \
                f"trajectories(samples={job.calibration.samples}, steps={job.calibration.steps})"
            calibration += f"; activation scales: {len(act_scales.timesteps)} timesteps from {source}"
        if job.save_act_scales is not None:
            save_act_scales(act_scales, job.save_act_scales)
    attention = job.attention.resolve(job.quant)
    quantize_model(model, stats.sites, transform, job.quant, selection, sites=sites, act_scales=act_scales,
                   attention=attention)
    main, extra = _weight_bytes(model)
    ops = sorted({n.op_type for n in model.graph if n.domain == HADANORM_DOMAIN})
    model.metadata_props[TRANSFORM_OPS_KEY] = ",".join(ops)
    model.metadata_props[METHOD_KEY] = job.transform.method.value
    model.metadata_props[BITS_KEY] = job.quant.label if job.quant else "float"
    if job.quant is not None:
        model.metadata_props[ACT_GRANULARITY_KEY] = job.act_granularity.value
        model.metadata_props[WEIGHT_RANGE_KEY] = job.quant.weight_range.value
        model.metadata_props[WEIGHT_SCALES_KEY] = job.quant.weight_scales.value
        model.metadata_props[LOW_RANK_KEY] = str(job.quant.low_rank)
    if isinstance(transform.alpha, SiteAlphas):  # --alpha auto's choice per site (a number given: no entry)
        model.metadata_props[ALPHA_KEY] = json.dumps(dict(transform.alpha.chosen), separators=(",", ":"))
    model.metadata_props[BIAS_CORRECTION_KEY] = job.transform.bias_correction.value
    model.metadata_props[FORMAT_KEY] = job.quant.format.value if job.quant else "float"
    precisions = attention_precisions(model.graph)  # the nodes' own, also those of an input that had them
    model.metadata_props[ATTENTION_KEY] = precisions
    model.metadata_props[SESSION_CONFIG_KEY] = (
        "session.disable_quant_qdq=1 (see runtime.session: default fusions change the numbers or fail)"
    )
    fused = len(fused_attentions(model.graph))
    files = save_model(model, job.output)
    return QuantizeReport(job.output, files, len(sites), sum(len(s.linears) for s in sites), before, main, extra,
                          calibration, f"{fused} softmax attentions fused ({precisions})" if fused else "none")

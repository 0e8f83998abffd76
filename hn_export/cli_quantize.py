"""`hn-export MODEL.onnx --w4a4 ...`: transform and quantize an FP ONNX graph.

Two option groups (`hn_export.cli_options.option_group`): `QuantOptions` (`quant_options`; ``hn-export bundle``
takes them too) and `QuantizeFiles` (the files only this command reads and writes). `QuantOptions.job` checks them
and builds the `QuantizeJob`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import click

from graph_passes.hadamard import HadamardMode
from graph_passes.linears import SiteSelection
from graph_passes.methods import DEFAULT_ALPHA_GRID, AlphaSearch, BiasCorrection, Method, TransformOptions
from graph_passes.quantization import OutputFormat, QuantConfig, WeightRange, WeightScales
from graph_passes.static_act_quant import ActGranularity
from hn_export.cli_options import (
    EnumChoice,
    FiniteFloatRange,
    RayOptions,
    check_format_block,
    check_hadamard_block,
    option_group,
    ray_options,
)
from hn_export.denoise import DenoiseConfig
from hn_export.errors import UserError
from hn_export.quantize_job import AttentionChoice, QuantizeJob, default_output, run_quantize

_PRESET_BITS = {"w4a4": (4, 4), "w6a6": (6, 6), "w8a8": (8, 8)}
_GRID_TEXT = ",".join(f"{a:g}" for a in DEFAULT_ALPHA_GRID)


class AlphaChoice(FiniteFloatRange):
    """``--alpha``: a finite number in [0, 1], or ``auto`` (an `AlphaSearch` on the default grid)."""

    name = "float|auto"

    def __init__(self) -> None:
        super().__init__(0.0, 1.0)

    def convert(self, value, param, ctx):
        if isinstance(value, AlphaSearch) or (isinstance(value, str) and value.strip().lower() == "auto"):
            return value if isinstance(value, AlphaSearch) else AlphaSearch()
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                self.fail(f"{value!r} is neither a number in [0, 1] nor auto", param, ctx)
        return super().convert(value, param, ctx)


def parse_alpha_grid(text: str) -> AlphaSearch:
    """``--alpha-grid 0.2,0.5,0.8``: distinct finite numbers in [0, 1], at least one."""
    example = "e.g. --alpha-grid 0.2,0.5,0.8"
    grid = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        try:
            value = float(item) if item.isascii() else None
        except ValueError:
            value = None
        if value is None:
            raise UserError(f"--alpha-grid item {item!r} is not a number", example)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UserError(f"--alpha-grid item {item!r} is not a finite number in [0, 1]", example)
        if value in grid:
            raise UserError(f"--alpha-grid {text!r} repeats {item}", example)
        grid.append(value)
    if not grid:
        raise UserError(f"--alpha-grid {text!r} names no alpha", example)
    return AlphaSearch(tuple(grid))


@dataclasses.dataclass(frozen=True)
class QuantizeFiles:
    """The files of one quantize run (the quantize command's; a bundle calibrates each size itself): calibration
    inputs, saved statistics, a per-timestep activation scale table. ``--calib`` and ``--stats`` exclude each
    other."""

    calib_inputs: Path | None = None
    stats_path: Path | None = None  # reuse saved statistics
    save_stats: Path | None = None
    act_scales_path: Path | None = None  # a per-timestep activation scale table to use (else calibrated)
    save_act_scales: Path | None = None

    def __post_init__(self) -> None:
        if self.calib_inputs is not None and self.stats_path is not None:
            raise UserError("--calib and --stats both given", "pass one: inputs to calibrate on, or saved statistics")


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """How a transformer is quantized: bit widths, method and transform, weight quantizer, output format, attention,
    calibration trajectories, site selection, activation granularity (the quantize command's options that
    ``hn-export bundle`` takes too). `job` checks them and builds the `QuantizeJob`."""

    preset: str | None  # w4a4 (None), w6a6, w8a8
    wbits: int | None  # overrides the preset
    abits: int | None
    every_linear: bool
    outer_bits: int
    outer_weight_block: int | None  # None: weight_block; 0: per output channel
    method: Method
    alpha: float | AlphaSearch  # --alpha A, or auto
    alpha_grid: str | None  # --alpha-grid: the grid of --alpha auto (None: the default)
    hadamard: HadamardMode | None  # None: the method's default
    hadamard_block: int | None
    bias_correction: BiasCorrection
    weight_block: int
    asymmetric_weights: bool
    output_format: OutputFormat
    attention: AttentionChoice
    calib_samples: int
    calib_steps: int
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    act_granularity: ActGranularity
    weight_range: WeightRange
    weight_scales: WeightScales
    low_rank: int
    seed: int

    def job(self, model: Path, output: Path | None, files: QuantizeFiles = QuantizeFiles(),
            transform_only: bool = False, progress: bool = True) -> QuantizeJob:
        """The quantize job of these options, checked in one place before any work: the quantize command and
        `hn-export bundle` (per transformer size) both build theirs here."""
        granularity = ActGranularity.TIMESTEP if files.act_scales_path is not None else self.act_granularity
        w_default, a_default = _PRESET_BITS[self.preset or "w4a4"]
        if self.weight_block < 1:
            raise UserError(f"--weight-block {self.weight_block} must be positive", "use e.g. 128")
        fmt = self.output_format
        check_format_block(fmt, self.weight_block, self.wbits or w_default)
        check_hadamard_block(self.hadamard_block)
        if self.outer_bits != 8 and not self.every_linear:
            raise UserError(f"--outer-bits {self.outer_bits} applies to the linears outside the blocks, which only "
                            "--every-linear quantizes", "add --every-linear, or drop --outer-bits")
        if self.outer_weight_block is not None:
            if not self.every_linear:
                raise UserError(f"--outer-weight-block {self.outer_weight_block} applies to the linears outside the "
                                "blocks, which only --every-linear quantizes", "add --every-linear, or drop "
                                "--outer-weight-block")
            if self.outer_weight_block:
                check_format_block(fmt, self.outer_weight_block, self.outer_bits, "--outer-weight-block")
            elif fmt is OutputFormat.NBITS:
                raise UserError("--outer-weight-block 0 (one block per output channel, as long as the input) is not "
                                "a MatMulNBits block size for --format nbits (a power of two; 1152 inputs would be "
                                "padded to 2048)", "use --format fused or qdq, or a power-of-two --outer-weight-block")
        if granularity is ActGranularity.TIMESTEP and fmt is OutputFormat.FUSED:
            raise UserError("--act-granularity timestep cannot be written as --format fused (its integer kernels "
                            "quantize activations per token)", "use --format qdq or nbits")
        if granularity is ActGranularity.TIMESTEP and transform_only:
            raise UserError("--act-granularity timestep / --act-scales quantize activations, --transform-only does "
                            "not", "drop one of them")
        if self.low_rank and transform_only:
            raise UserError(f"--low-rank {self.low_rank} splits the weight that is quantized, --transform-only "
                            "quantizes nothing", "drop one of them")
        alpha = self.alpha
        if self.alpha_grid is not None:
            if not isinstance(alpha, AlphaSearch):
                raise UserError(f"--alpha-grid {self.alpha_grid} is the grid of --alpha auto, not of --alpha {alpha:g}",
                                "add --alpha auto, or drop --alpha-grid")
            alpha = parse_alpha_grid(self.alpha_grid)
        if self.weight_scales is WeightScales.TWO_LEVEL and self.asymmetric_weights:
            raise UserError("--weight-scales two-level needs symmetric weights", "drop --asymmetric-weights")
        if self.low_rank and self.method is Method.HQDM:
            raise UserError(f"--low-rank {self.low_rank} needs the quantized weight to be the transformed one; "
                            "--method hqdm quantizes it unrotated in integer parts", "use another --method, or drop "
                            "--low-rank")
        quant = None if transform_only else QuantConfig(
            weight_bits=self.wbits or w_default, act_bits=self.abits or a_default, weight_block=self.weight_block,
            weight_symmetric=not self.asymmetric_weights, format=fmt, weight_range=self.weight_range,
            outer_bits=self.outer_bits, outer_weight_block=self.outer_weight_block, low_rank=self.low_rank,
            weight_scales=self.weight_scales)
        return QuantizeJob(
            model_path=model,
            output=output or default_output(model, quant),
            transform=TransformOptions(method=self.method, alpha=alpha, hadamard=self.hadamard,
                                       hadamard_block=self.hadamard_block, bias_correction=self.bias_correction,
                                       seed=self.seed),
            quant=quant,
            selection=SiteSelection(include=self.include or SiteSelection().include, exclude=self.exclude,
                                    explicit=bool(self.include), outer_linears=self.every_linear),
            calibration=DenoiseConfig(samples=self.calib_samples, steps=self.calib_steps, seed=self.seed),
            calib_inputs=files.calib_inputs,
            stats_path=files.stats_path,
            save_stats=files.save_stats,
            progress=progress,
            act_granularity=granularity,
            act_scales_path=files.act_scales_path,
            save_act_scales=files.save_act_scales,
            attention=self.attention,
        )


def quant_options(default_format: OutputFormat = OutputFormat.QDQ):
    """The `QuantOptions` options (parameter ``quant``); `default_format`: the ``--format`` default."""
    return option_group(
        QuantOptions, "quant",
        click.option("--w4a4", "preset", flag_value="w4a4", help="4-bit weights and activations (default)."),
        click.option("--w6a6", "preset", flag_value="w6a6", help="6-bit weights and activations."),
        click.option("--w8a8", "preset", flag_value="w8a8", help="8-bit weights and activations."),
        click.option("--wbits", type=click.IntRange(2, 8), help="Weight bits (2-8); overrides the preset."),
        click.option("--abits", type=click.IntRange(2, 8), help="Activation bits (2-8); overrides the preset."),
        click.option("--every-linear", is_flag=True,
                     help="Also make every linear outside the model's blocks a site (caption projection, timestep "
                          "embedder, adaLN-single, final projection), at --outer-bits."),
        click.option("--outer-bits", type=click.IntRange(2, 8), default=8, show_default=True,
                     help="Weight and activation bits of the linears outside the model's blocks that --every-linear "
                          "selects (caption projection, timestep embedder, adaLN-single, final projection)."),
        click.option("--outer-weight-block", type=click.IntRange(0),
                     help="Weight block of the linears that --every-linear adds (default: --weight-block); 0: one "
                          "block per output channel, the whole input (up to 32768 in --format fused; with 8-bit "
                          "weights the integer kernels then need no per-block fold: faster on AMX)."),
        click.option("--method", type=EnumChoice(Method), default=Method.HADANORM.value, show_default=True),
        click.option("--alpha", type=AlphaChoice(), default=0.5, show_default=True,
                     help="SmoothQuant migration strength in [0, 1], or auto: per site the alpha of a grid (default "
                          f"{_GRID_TEXT}; --alpha-grid) with the least output error on calibration token samples, "
                          "weights and activations quantized (recorded in the model metadata, hn_export.alpha). "
                          "Methods without smoothing (none, quarot, dyncenter, hqdm) ignore it."),
        click.option("--alpha-grid", help="Comma list of the alphas --alpha auto tries (each in [0, 1]), e.g. "
                                          "0.2,0.5,0.8."),
        click.option("--hadamard", type=EnumChoice(HadamardMode),
                     help="full: H_K (x) H_2^n; block: block-diagonal Hadamard. Default: full, block for --method "
                          "hqdm."),
        click.option("--hadamard-block", type=int,
                     help="Block size of --hadamard block (default 128; 32 for --method hqdm, as HQ-DM)."),
        click.option("--bias-correction", type=EnumChoice(BiasCorrection), default=BiasCorrection.FLOAT_TOKEN.value,
                     show_default=True, help="How centered sites add W mu back."),
        click.option("--weight-block", type=int, default=128, show_default=True,
                     help="Weight quantization block size."),
        click.option("--asymmetric-weights", is_flag=True, help="Asymmetric (zero-point) weight quantization."),
        click.option("--format", "output_format", type=EnumChoice(OutputFormat), default=default_format.value,
                     show_default=True,
                     help="qdq: portable Q/DQ graph (float MatMuls); nbits: MatMulNBits, stock onnxruntime, int4 "
                          "weights in memory; fused: hadanorm integer kernels (build the library; function bodies "
                          "otherwise)."),
        click.option("--attention", type=EnumChoice(AttentionChoice), default=AttentionChoice.AUTO.value,
                     show_default=True,
                     help="Softmax attention: fuse it into hadanorm::Attention (tiled, O(N) memory) at float, bf16 or int8 "
                          "precision (int8: keys centered and rotated, int8 q k^T and p v on AVX512-VNNI), fast "
                          "(chosen by the CPU that runs it: bf16 on AMX, int8 on AVX512-VNNI, float elsewhere), or "
                          "keep it (none); auto: fast for --format fused, none otherwise."),
        click.option("--calib-samples", type=click.IntRange(1), default=2, show_default=True,
                     help="Denoising trajectories for calibration."),
        click.option("--calib-steps", type=click.IntRange(1), default=20, show_default=True,
                     help="Denoising steps per calibration trajectory."),
        click.option("--include", multiple=True, help="Module-path regex of linears to quantize (repeatable)."),
        click.option("--exclude", multiple=True, help="Module-path regex of linears to leave in float (repeatable)."),
        click.option("--act-granularity", type=EnumChoice(ActGranularity), default=ActGranularity.TOKEN.value,
                     show_default=True,
                     help="token: per-token dynamic asymmetric activations; timestep: static per-tensor symmetric, one "
                          "scale per sampling timestep chosen in the graph from the timestep input (HQ-DM)."),
        click.option("--weight-range", type=EnumChoice(WeightRange), default=WeightRange.MINMAX.value,
                     show_default=True,
                     help="Weight range per block: min/max, the clipping that minimises the squared error (MSE "
                          "search), or GPTQ's error feedback over the calibration Hessian on the min/max grid "
                          "(gptq; gptq-act-order: rows by decreasing Hessian diagonal)."),
        click.option("--weight-scales", type=EnumChoice(WeightScales), default=WeightScales.BLOCK.value,
                     show_default=True,
                     help="block: a float scale per weight block; two-level: the block scales of 4-bit weights put on "
                          "one unit per output column times an integer 1..16 per block (the ratio with the smaller "
                          "block error; a weight it would hurt keeps its block scales), so that the CPU kernels run "
                          "them without a per-block fold (faster on AMX; the file layout is the same)."),
        click.option("--low-rank", type=click.IntRange(0), default=0, show_default=True,
                     help="Rank of a float branch beside each quantized MatMul weight (SVDQuant): the weight's largest "
                          "directions in float, the residual quantized; 0: none."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of Hadamard signs and calibration."),
    )


quantize_files_options = option_group(
    QuantizeFiles, "files",
    click.option("--calib", "calib_inputs", type=click.Path(path_type=Path),
                 help="Calibration inputs (.npz with hidden_states, timestep, encoder_hidden_states)."),
    click.option("--stats", "stats_path", type=click.Path(path_type=Path), help="Reuse saved calibration statistics."),
    click.option("--save-stats", type=click.Path(path_type=Path), help="Save the calibration statistics here."),
    click.option("--act-scales", "act_scales_path", type=click.Path(path_type=Path),
                 help="Per-timestep activation scale table (JSON, one value per --calib-steps step and site) instead "
                      "of calibrating it; implies --act-granularity timestep."),
    click.option("--save-act-scales", type=click.Path(path_type=Path), help="Save the per-timestep scale table here."),
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@quant_options()
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output .onnx (default MODEL.w4a4.onnx).")
@quantize_files_options
@click.option("--transform-only", is_flag=True, help="Insert and fuse the transforms, no quantization.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@ray_options
def quantize_command(model: Path, quant: QuantOptions, output: Path | None, files: QuantizeFiles,
                     transform_only: bool, no_progress: bool, ray_options: RayOptions) -> None:
    """Quantize MODEL.onnx (W4A4 with HadaNorm by default)."""
    job = quant.job(model, output, files, transform_only, progress=not no_progress)
    with ray_options.cluster() as cluster:
        report = run_quantize(dataclasses.replace(job, cluster=cluster))
    bits = f"{job.quant.label.upper()} ({job.quant.format.value})" if job.quant else "transform only"
    click.echo(f"{quant.method.value} {bits}: {report.sites} activation sites, {report.linears} linears")
    if job.quant:
        ratio = report.weight_bytes_after / max(report.weight_bytes_before, 1)
        click.echo(f"site weights: {report.weight_bytes_before / 1e6:.2f} MB -> {report.weight_bytes_after / 1e6:.2f} MB"
                   f" ({ratio:.3f}x)")
        if report.bias_correction_bytes:
            click.echo(f"exact bias correction adds {report.bias_correction_bytes / 1e6:.2f} MB of int8 weights")
    click.echo(f"calibration: {report.calibration}")
    if report.attention != "none":
        click.echo(f"attention: {report.attention}")
    for path in report.files:
        click.echo(f"wrote {path}")
    if job.quant and job.quant.format is OutputFormat.QDQ:
        click.echo("note: --format qdq simulates the integer maths with float MatMuls (portable, slower than FP32 in "
                   "onnxruntime); to deploy, use --format fused (hadanorm kernels) or --format nbits (stock onnxruntime)")

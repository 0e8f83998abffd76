"""`hn-export MODEL.onnx --w4a4 ...`: transform and quantize an FP ONNX graph."""

from __future__ import annotations

from pathlib import Path

import click

from graph_passes.hadamard import HadamardMode
from graph_passes.linears import SiteSelection
from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.quantization import OutputFormat, QuantConfig, WeightRange
from graph_passes.static_act_quant import ActGranularity
from hn_export.cli_options import FiniteFloatRange, check_format_block, check_hadamard_block
from hn_export.denoise import DenoiseConfig
from hn_export.errors import UserError
from hn_export.quantize_job import AttentionChoice, QuantizeJob, default_output, run_quantize

_PRESET_BITS = {"w4a4": (4, 4), "w6a6": (6, 6), "w8a8": (8, 8)}


def _enum_choice(enum_type) -> click.Choice:
    return click.Choice([m.value for m in enum_type])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--w4a4", "preset", flag_value="w4a4", help="4-bit weights and activations (default).")
@click.option("--w6a6", "preset", flag_value="w6a6", help="6-bit weights and activations.")
@click.option("--w8a8", "preset", flag_value="w8a8", help="8-bit weights and activations.")
@click.option("--wbits", type=click.IntRange(2, 8), help="Weight bits (2-8); overrides the preset.")
@click.option("--abits", type=click.IntRange(2, 8), help="Activation bits (2-8); overrides the preset.")
@click.option("--every-linear", is_flag=True,
              help="Also make every linear outside the model's blocks a site (caption projection, timestep embedder, "
                   "adaLN-single, final projection), at --outer-bits.")
@click.option("--outer-bits", type=click.IntRange(2, 8), default=8, show_default=True,
              help="Weight and activation bits of the linears outside the model's blocks that --every-linear "
                   "selects (caption projection, timestep embedder, adaLN-single, final projection).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output .onnx (default MODEL.w4a4.onnx).")
@click.option("--method", type=_enum_choice(Method), default=Method.HADANORM.value, show_default=True)
@click.option("--alpha", type=FiniteFloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="SmoothQuant migration strength.")
@click.option("--hadamard", type=_enum_choice(HadamardMode),
              help="full: H_K (x) H_2^n; block: block-diagonal Hadamard. Default: full, block for --method hqdm.")
@click.option("--hadamard-block", type=int,
              help="Block size of --hadamard block (default 128; 32 for --method hqdm, as HQ-DM).")
@click.option("--bias-correction", type=_enum_choice(BiasCorrection), default=BiasCorrection.FLOAT_TOKEN.value,
              show_default=True, help="How centered sites add W mu back.")
@click.option("--weight-block", type=int, default=128, show_default=True, help="Weight quantization block size.")
@click.option("--asymmetric-weights", is_flag=True, help="Asymmetric (zero-point) weight quantization.")
@click.option("--format", "output_format", type=_enum_choice(OutputFormat), default=OutputFormat.QDQ.value,
              show_default=True,
              help="qdq: portable Q/DQ graph (float MatMuls); nbits: MatMulNBits, stock onnxruntime, int4 weights "
                   "in memory; fused: hadanorm integer kernels (build the library; function bodies otherwise).")
@click.option("--attention", type=_enum_choice(AttentionChoice), default=AttentionChoice.AUTO.value,
              show_default=True,
              help="Softmax attention: fuse it into hadanorm::Attention (tiled, O(N) memory) at float or bf16 "
                   "precision, or keep it (none); auto: bf16 for --format fused, none otherwise.")
@click.option("--calib", "calib_inputs", type=click.Path(path_type=Path),
              help="Calibration inputs (.npz with hidden_states, timestep, encoder_hidden_states).")
@click.option("--calib-samples", type=click.IntRange(1), default=2, show_default=True,
              help="Denoising trajectories for calibration.")
@click.option("--calib-steps", type=click.IntRange(1), default=20, show_default=True,
              help="Denoising steps per calibration trajectory.")
@click.option("--stats", "stats_path", type=click.Path(path_type=Path), help="Reuse saved calibration statistics.")
@click.option("--save-stats", type=click.Path(path_type=Path), help="Save the calibration statistics here.")
@click.option("--include", multiple=True, help="Module-path regex of linears to quantize (repeatable).")
@click.option("--exclude", multiple=True, help="Module-path regex of linears to leave in float (repeatable).")
@click.option("--act-granularity", type=_enum_choice(ActGranularity), default=ActGranularity.TOKEN.value,
              show_default=True,
              help="token: per-token dynamic asymmetric activations; timestep: static per-tensor symmetric, one scale "
                   "per sampling timestep chosen in the graph from the timestep input (HQ-DM).")
@click.option("--act-scales", "act_scales_path", type=click.Path(path_type=Path),
              help="Per-timestep activation scale table (JSON, one value per --calib-steps step and site) instead of "
                   "calibrating it; implies --act-granularity timestep.")
@click.option("--save-act-scales", type=click.Path(path_type=Path), help="Save the per-timestep scale table here.")
@click.option("--weight-range", type=_enum_choice(WeightRange), default=WeightRange.MINMAX.value, show_default=True,
              help="Weight range per block: min/max, or the clipping that minimises the squared error (MSE search).")
@click.option("--transform-only", is_flag=True, help="Insert and fuse the transforms, no quantization.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of Hadamard signs and calibration.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def quantize_command(model: Path, preset, wbits, abits, every_linear, outer_bits, output, method, alpha, hadamard,
                     hadamard_block,
                     bias_correction, weight_block, asymmetric_weights, output_format, attention, calib_inputs, calib_samples, calib_steps,
                     stats_path, save_stats, include, exclude, act_granularity, act_scales_path, save_act_scales,
                     weight_range, transform_only, seed, no_progress) -> None:
    """Quantize MODEL.onnx (W4A4 with HadaNorm by default)."""
    if calib_inputs is not None and stats_path is not None:
        raise UserError("--calib and --stats both given", "pass one: inputs to calibrate on, or saved statistics")
    job = quantize_job(model, output, preset=preset, wbits=wbits, abits=abits, every_linear=every_linear,
                       outer_bits=outer_bits, method=method, alpha=alpha, hadamard=hadamard,
                       hadamard_block=hadamard_block, bias_correction=bias_correction, weight_block=weight_block,
                       asymmetric_weights=asymmetric_weights, output_format=output_format, attention=attention,
                       calib_samples=calib_samples, calib_steps=calib_steps, include=include, exclude=exclude,
                       act_granularity=act_granularity, weight_range=weight_range, seed=seed,
                       calib_inputs=calib_inputs, stats_path=stats_path, save_stats=save_stats,
                       act_scales_path=act_scales_path, save_act_scales=save_act_scales,
                       transform_only=transform_only, progress=not no_progress)
    quant = job.quant
    report = run_quantize(job)
    bits = f"{quant.label.upper()} ({quant.format.value})" if quant else "transform only"
    click.echo(f"{method} {bits}: {report.sites} activation sites, {report.linears} linears")
    if quant:
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
    if quant and quant.format is OutputFormat.QDQ:
        click.echo("note: --format qdq simulates the integer maths with float MatMuls (portable, slower than FP32 in "
                   "onnxruntime); to deploy, use --format fused (hadanorm kernels) or --format nbits (stock onnxruntime)")


def quantize_job(model: Path, output: Path | None, *, preset, wbits, abits, every_linear, outer_bits, method, alpha,
                 hadamard, hadamard_block, bias_correction, weight_block, asymmetric_weights, output_format, attention,
                 calib_samples, calib_steps, include, exclude, act_granularity, weight_range, seed, calib_inputs=None,
                 stats_path=None, save_stats=None, act_scales_path=None, save_act_scales=None,
                 transform_only=False, progress=True) -> QuantizeJob:
    """The quantize options (this command's click parameters, by name) as a `QuantizeJob`, checked in one place
    before any work: the quantize command and `hn-export bundle` (per transformer size) both build theirs here."""
    granularity = ActGranularity.TIMESTEP if act_scales_path is not None else ActGranularity(act_granularity)
    w_default, a_default = _PRESET_BITS[preset or "w4a4"]
    if weight_block < 1:
        raise UserError(f"--weight-block {weight_block} must be positive", "use e.g. 128")
    fmt = OutputFormat(output_format)
    check_format_block(fmt, weight_block, wbits or w_default)
    check_hadamard_block(hadamard_block)
    if outer_bits != 8 and not every_linear:
        raise UserError(f"--outer-bits {outer_bits} applies to the linears outside the blocks, which only "
                        "--every-linear quantizes", "add --every-linear, or drop --outer-bits")
    if granularity is ActGranularity.TIMESTEP and fmt is OutputFormat.FUSED:
        raise UserError("--act-granularity timestep cannot be written as --format fused (its integer kernels "
                        "quantize activations per token)", "use --format qdq or nbits")
    if granularity is ActGranularity.TIMESTEP and transform_only:
        raise UserError("--act-granularity timestep / --act-scales quantize activations, --transform-only does not",
                        "drop one of them")
    quant = None if transform_only else QuantConfig(
        weight_bits=wbits or w_default, act_bits=abits or a_default, weight_block=weight_block,
        weight_symmetric=not asymmetric_weights, format=fmt, weight_range=WeightRange(weight_range),
        outer_bits=outer_bits)
    include = tuple(include or ())
    return QuantizeJob(
        model_path=model,
        output=output or default_output(model, quant),
        transform=TransformOptions(method=Method(method), alpha=alpha,
                                   hadamard=HadamardMode(hadamard) if hadamard else None,
                                   hadamard_block=hadamard_block, bias_correction=BiasCorrection(bias_correction),
                                   seed=seed),
        quant=quant,
        selection=SiteSelection(include=include or SiteSelection().include, exclude=tuple(exclude or ()),
                                explicit=bool(include), outer_linears=every_linear),
        calibration=DenoiseConfig(samples=calib_samples, steps=calib_steps, seed=seed),
        calib_inputs=calib_inputs,
        stats_path=stats_path,
        save_stats=save_stats,
        progress=progress,
        act_granularity=granularity,
        act_scales_path=act_scales_path,
        save_act_scales=save_act_scales,
        attention=AttentionChoice(attention),
    )

"""`hn-export compare MODEL.onnx`: every method x bit width (x bias-correction mode) against a reference graph."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.quantization import OutputFormat, WeightRange
from graph_passes.static_act_quant import ActGranularity
from hn_export.cli_options import (
    check_format_block,
    check_hadamard_block,
    check_model_and_inputs,
    input_file_options,
    parse_bits,
    parse_list,
    samples_option,
)
from hn_export.compare import (
    REPORT_FILES,
    CompareConfig,
    EvaluationInputs,
    grid,
    run_compare,
    table_markdown,
    write_results,
)
from hn_export.denoise import DenoiseConfig, ModelSignature
from hn_export.errors import UserError
from hn_export.quantize_job import AttentionChoice
from hn_export.input_arrays import check_same_inputs
from hn_export.model_files import check_output_folder, check_output_path, load_model


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--methods", default="all", show_default=True, help="Comma list of methods, or all.")
@click.option("--bits", default="w4a4,w6a6", show_default=True, help="Comma list of wNaM.")
@click.option("--formats", default="qdq", show_default=True,
              help="Comma list of output formats (qdq, nbits, fused), or all: the same quantization run three ways.")
@click.option("--attention", type=click.Choice([c.value for c in AttentionChoice]), default=AttentionChoice.AUTO.value,
              show_default=True,
              help="Softmax attention of the quantized graphs: auto (fused graphs: hadanorm::Attention bf16; others "
                   "keep it), none, float or bf16 (as `hn-export MODEL --attention`).")
@click.option("--bias-corrections", default="float-token", show_default=True,
              help="Comma list of bias-correction modes for centered methods, or all.")
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="Denoising steps.")
@samples_option(default=2)
@click.option("--reference", type=click.Path(path_type=Path), help="Reference graph (e.g. FP16); default MODEL.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("hn-export-compare"),
              show_default=True, help="Folder for table.md, results.json and sqnr.png.")
@input_file_options
@click.option("--calib-samples", type=click.IntRange(1), default=2, show_default=True)
@click.option("--calib-steps", type=click.IntRange(1), default=20, show_default=True)
@click.option("--hadamard", type=click.Choice(["full", "block"]),
              help="Hadamard of every rotating method (default: full; block of 32 for hqdm).")
@click.option("--hadamard-block", type=int, help="Block size of --hadamard block (default 128; hqdm 32).")
@click.option("--act-granularities", default="token", show_default=True,
              help="Comma list of activation granularities (token, timestep), or all.")
@click.option("--weight-ranges", default="minmax", show_default=True,
              help="Comma list of weight ranges (minmax, mse), or all.")
@click.option("--weight-block", type=click.IntRange(1), default=128, show_default=True,
              help="Weight quantization block (at least the width: per output channel).")
@click.option("--asymmetric-weights", is_flag=True, help="Asymmetric (zero-point) weights at every point.")
@click.option("--keep-models", type=click.Path(path_type=Path), help="Keep the quantized graphs in this folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True)
def compare_command(model, methods, bits, formats, attention, bias_corrections, steps, samples, reference, out_dir, calib_inputs,
                    inputs_path, calib_samples, calib_steps, hadamard, hadamard_block, act_granularities, weight_ranges,
                    weight_block, asymmetric_weights, keep_models, seed, no_progress) -> None:
    """Quantize MODEL with each method and bit width; SQNR against the reference graph."""
    from graph_passes.hadamard import HadamardMode

    quants = [dataclasses.replace(q, format=f, weight_range=r, weight_block=weight_block,
                                  weight_symmetric=not asymmetric_weights) for q in parse_bits(bits)
              for r in parse_list(weight_ranges, WeightRange, "--weight-ranges")
              for f in parse_list(formats, OutputFormat, "--formats")]
    check_hadamard_block(hadamard_block)
    for quant in quants:  # a block the format cannot hold: one line before any work
        check_format_block(quant.format, weight_block, quant.weight_bits)
    points = grid(parse_list(methods, Method, "--methods"), quants,
                  parse_list(bias_corrections, BiasCorrection, "--bias-corrections"),
                  parse_list(act_granularities, ActGranularity, "--act-granularities"))
    # fail fast with a clear message, before any work: the model, both input files, the reference
    if not points:
        raise UserError("the comparison grid is empty: no (method, bits, format, granularity) point is left",
                        "--act-granularities timestep needs --formats qdq or nbits (fused quantizes per token)")
    sig, feeds = check_model_and_inputs(model, calib_inputs, inputs_path, samples)
    if reference is not None:
        check_same_inputs(sig, ModelSignature.of(load_model(reference, what="reference", any_opset=True)),
                          "reference")
    input_paths = (model, reference, calib_inputs, inputs_path)  # every output path, before any work
    check_output_folder(out_dir, REPORT_FILES, *input_paths)
    if keep_models is not None:
        check_output_folder(keep_models, [], *input_paths, what="--keep-models")
        for point in points:
            check_output_path(keep_models / f"{model.name.removesuffix('.onnx')}.{point.file_stem}.onnx", *input_paths,
                              data_file=True, what="--keep-models file")
    evaluation = DenoiseConfig(steps=steps, samples=samples or 2, seed=seed + 1000)
    inputs = EvaluationInputs(evaluation, feeds, f"file:{inputs_path.name}" if feeds is not None else "seeded")
    config = CompareConfig(
        evaluation=evaluation,
        calibration=DenoiseConfig(steps=calib_steps, samples=calib_samples, seed=seed),
        transform=TransformOptions(hadamard=HadamardMode(hadamard) if hadamard else None,
                                   hadamard_block=hadamard_block, seed=seed),
        keep_models=keep_models,
        progress=not no_progress,
        calib_inputs=calib_inputs,
        inputs=inputs,
        attention=AttentionChoice(attention),
    )
    if keep_models is not None:
        keep_models.mkdir(parents=True, exist_ok=True)
    results = run_compare(model, points, reference, config)
    calibration = ({"file": calib_inputs.name} if calib_inputs is not None
                   else dataclasses.asdict(config.calibration))
    meta = {"model": model.name, "reference": (reference or model).name, "steps": steps, "samples": inputs.samples,
            "inputs": inputs.source, "calibration": calibration, "seed": seed,
            "hadamard": hadamard or "method default", "hadamard_block": hadamard_block,
            "weight_block": weight_block, "asymmetric_weights": asymmetric_weights}
    files = write_results(results, out_dir, meta, f"{model.name}: SQNR after {steps} denoising steps")
    click.echo(table_markdown(results))
    for path in files:
        click.echo(f"wrote {path}")

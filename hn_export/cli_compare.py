"""`hn-export compare MODEL.onnx`: every method x bit width (x bias-correction mode) against a reference graph."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from graph_passes.hadamard import HadamardMode
from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.quantization import OutputFormat, WeightRange
from graph_passes.static_act_quant import ActGranularity
from hn_export.cli_options import (
    EnumChoice,
    Evaluation,
    EvaluationData,
    RayOptions,
    check_format_block,
    check_hadamard_block,
    evaluation_data_options,
    evaluation_options,
    option_group,
    parse_bits,
    parse_list,
    parse_ranks,
    ray_options,
)
from hn_export.compare import REPORT_FILES, CompareConfig, GridPoint, run_compare, table_markdown, write_results
from hn_export.compare import grid as grid_points
from hn_export.denoise import ModelSignature
from hn_export.errors import UserError
from hn_export.input_arrays import check_same_inputs
from hn_export.model_files import check_output_folder, check_output_path, load_model
from hn_export.quantize_job import AttentionChoice


@dataclasses.dataclass(frozen=True)
class GridOptions:
    """The comparison grid: comma lists of methods, bit widths, formats, bias-correction modes, activation
    granularities and weight ranges, and the settings every point shares. `points` checks them."""

    methods: str
    bits: str
    formats: str
    attention: AttentionChoice
    bias_corrections: str
    hadamard: HadamardMode | None  # None: each method's default
    hadamard_block: int | None
    act_granularities: str
    weight_ranges: str
    low_ranks: str
    weight_block: int
    asymmetric_weights: bool

    def points(self) -> list[GridPoint]:
        """Every point of the grid, checked before any work (one line for the first bad option)."""
        quants = [dataclasses.replace(q, format=f, weight_range=r, low_rank=rank, weight_block=self.weight_block,
                                      weight_symmetric=not self.asymmetric_weights) for q in parse_bits(self.bits)
                  for r in parse_list(self.weight_ranges, WeightRange, "--weight-ranges")
                  for rank in parse_ranks(self.low_ranks)
                  for f in parse_list(self.formats, OutputFormat, "--formats")]
        check_hadamard_block(self.hadamard_block)
        for quant in quants:  # a block the format cannot hold: one line before any work
            check_format_block(quant.format, self.weight_block, quant.weight_bits)
        methods = parse_list(self.methods, Method, "--methods")
        if Method.HQDM in methods and any(q.low_rank for q in quants):
            raise UserError("--low-ranks above 0 need the quantized weight to be the transformed one; --methods hqdm "
                            "quantizes it unrotated", "run hqdm in a grid with --low-ranks 0")
        points = grid_points(methods, quants,
                             parse_list(self.bias_corrections, BiasCorrection, "--bias-corrections"),
                             parse_list(self.act_granularities, ActGranularity, "--act-granularities"))
        if not points:
            raise UserError("the comparison grid is empty: no (method, bits, format, granularity) point is left",
                            "--act-granularities timestep needs --formats qdq or nbits (fused quantizes per token)")
        return points

    def transform(self, seed: int) -> TransformOptions:
        """What every point's transform shares (each point sets its method and bias correction)."""
        return TransformOptions(hadamard=self.hadamard, hadamard_block=self.hadamard_block, seed=seed)


grid_options = option_group(
    GridOptions, "grid",
    click.option("--methods", default="all", show_default=True, help="Comma list of methods, or all."),
    click.option("--bits", default="w4a4,w6a6", show_default=True, help="Comma list of wNaM."),
    click.option("--formats", default="qdq", show_default=True,
                 help="Comma list of output formats (qdq, nbits, fused), or all: the same quantization run three "
                      "ways."),
    click.option("--attention", type=EnumChoice(AttentionChoice), default=AttentionChoice.AUTO.value,
                 show_default=True,
                 help="Softmax attention of the quantized graphs: auto (fused graphs: hadanorm::Attention fast; "
                      "others keep it), none, float, bf16, int8 or fast (as `hn-export MODEL --attention`)."),
    click.option("--bias-corrections", default="float-token", show_default=True,
                 help="Comma list of bias-correction modes for centered methods, or all."),
    click.option("--hadamard", type=EnumChoice(HadamardMode),
                 help="Hadamard of every rotating method (default: full; block of 32 for hqdm)."),
    click.option("--hadamard-block", type=int, help="Block size of --hadamard block (default 128; hqdm 32)."),
    click.option("--act-granularities", default="token", show_default=True,
                 help="Comma list of activation granularities (token, timestep), or all."),
    click.option("--weight-ranges", default="minmax", show_default=True,
                 help="Comma list of weight ranges (minmax, mse, gptq, gptq-act-order), or all."),
    click.option("--low-ranks", default="0", show_default=True,
                 help="Comma list of low-rank branch ranks (as `hn-export MODEL --low-rank`; 0: none)."),
    click.option("--weight-block", type=click.IntRange(1), default=128, show_default=True,
                 help="Weight quantization block (at least the width: per output channel)."),
    click.option("--asymmetric-weights", is_flag=True, help="Asymmetric (zero-point) weights at every point."),
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@grid_options
@evaluation_options(default_samples=2)
@click.option("--reference", type=click.Path(path_type=Path), help="Reference graph (e.g. FP16); default MODEL.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("hn-export-compare"),
              show_default=True, help="Folder for table.md, results.json and sqnr.png.")
@evaluation_data_options
@click.option("--keep-models", type=click.Path(path_type=Path), help="Keep the quantized graphs in this folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True)
@ray_options
def compare_command(model: Path, grid: GridOptions, evaluation: Evaluation, reference: Path | None, out_dir: Path,
                    data: EvaluationData, keep_models: Path | None, seed: int, no_progress: bool,
                    ray_options: RayOptions) -> None:
    """Quantize MODEL with each method and bit width; SQNR against the reference graph."""
    points = grid.points()
    # fail fast with a clear message, before any work: the model, both input files, the reference
    sig, feeds = data.check(model, evaluation.samples)
    if reference is not None:
        check_same_inputs(sig, ModelSignature.of(load_model(reference, what="reference", any_opset=True)),
                          "reference")
    input_paths = (model, reference, data.calib_inputs, data.inputs_path)  # every output path, before any work
    check_output_folder(out_dir, REPORT_FILES, *input_paths)
    if keep_models is not None and ray_options.ray is not None:
        raise UserError("--keep-models with --ray: the quantized graphs are built on the cluster's nodes",
                        "drop --keep-models, or quantize the points to keep with `hn-export MODEL --w4a4 ...`")
    if keep_models is not None:
        check_output_folder(keep_models, [], *input_paths, what="--keep-models")
        for point in points:
            check_output_path(keep_models / f"{model.name.removesuffix('.onnx')}.{point.file_stem}.onnx", *input_paths,
                              data_file=True, what="--keep-models file")
    inputs = data.evaluation_inputs(evaluation.config(seed + 1000), feeds)
    config = CompareConfig(
        evaluation=inputs.config,
        calibration=data.calibration(seed),
        transform=grid.transform(seed),
        keep_models=keep_models,
        progress=not no_progress,
        calib_inputs=data.calib_inputs,
        inputs=inputs,
        attention=grid.attention,
    )
    if keep_models is not None:
        keep_models.mkdir(parents=True, exist_ok=True)
    with ray_options.cluster() as cluster:
        results = run_compare(model, points, reference, config, cluster)
    meta = {"model": model.name, "reference": (reference or model).name, "steps": evaluation.steps,
            "samples": inputs.samples, "inputs": inputs.source, "calibration": data.calibration_report(seed),
            "seed": seed, "hadamard": grid.hadamard.value if grid.hadamard else "method default",
            "hadamard_block": grid.hadamard_block, "weight_block": grid.weight_block,
            "asymmetric_weights": grid.asymmetric_weights}
    files = write_results(results, out_dir, meta, f"{model.name}: SQNR after {evaluation.steps} denoising steps")
    click.echo(table_markdown(results))
    for path in files:
        click.echo(f"wrote {path}")

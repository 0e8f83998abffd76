"""`hn-export sensitivity MODEL.onnx`: one activation quantizer at a time, per method (the paper's study)."""

from __future__ import annotations

from pathlib import Path

import click

from graph_passes.methods import Method
from hn_export.cli_options import (
    Evaluation,
    EvaluationData,
    RayOptions,
    evaluation_data_options,
    evaluation_options,
    parse_list,
    ray_options,
)
from hn_export.model_files import check_output_folder
from hn_export.sensitivity import REPORT_FILES, aggregate, run_sensitivity, write_results


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--methods", default="none,quarot,sdcb,hadanorm", show_default=True, help="Comma list, or all.")
@click.option("--abits", type=click.IntRange(2, 8), default=4, show_default=True, help="Activation bits.")
@evaluation_options(default_samples=1)
@evaluation_data_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("hn-export-sensitivity"),
              show_default=True, help="Folder for sensitivity.json and sensitivity.png.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True)
@ray_options
def sensitivity_command(model: Path, methods: str, abits: int, evaluation: Evaluation, data: EvaluationData,
                        out_dir: Path, seed: int, no_progress: bool, ray_options: RayOptions) -> None:
    """Turn on one activation quantizer at a time (weights float); SQNR at the end of denoising."""
    chosen = parse_list(methods, Method, "--methods")
    _, feeds = data.check(model, evaluation.samples)  # before any work
    check_output_folder(out_dir, REPORT_FILES, model, data.calib_inputs, data.inputs_path)
    inputs = data.evaluation_inputs(evaluation.config(seed + 1000), feeds)
    with ray_options.cluster() as cluster:
        results = run_sensitivity(model, chosen, abits, inputs.config, data.calibration(seed),
                                  progress=not no_progress, calib_inputs=data.calib_inputs, inputs=inputs,
                                  cluster=cluster)
    agg = aggregate(results)
    header = f"{'role':<22}" + "".join(f"{m:>13}" for m in agg["by_role"])
    click.echo(f"A{abits} sensitivity (end-of-denoising SQNR, dB, mean over blocks)")
    click.echo(header)
    roles = list(dict.fromkeys(r.role for r in results))
    for role in roles:
        click.echo(f"{role:<22}" + "".join(f"{agg['by_role'][m].get(role, float('nan')):>13.2f}" for m in agg["by_role"]))
    meta = {"model": model.name, "abits": abits, "steps": evaluation.steps, "samples": inputs.samples,
            "inputs": inputs.source, "seed": seed, "calibration": data.calibration_report(seed)}
    for path in write_results(results, out_dir, meta, f"{model.name}: A{abits} sensitivity, one quantizer at a time"):
        click.echo(f"wrote {path}")

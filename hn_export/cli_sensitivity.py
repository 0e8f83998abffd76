"""`hn-export sensitivity MODEL.onnx`: one activation quantizer at a time, per method (the paper's study)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from graph_passes.methods import Method
from hn_export.cli_options import check_model_and_inputs, input_file_options, parse_list, samples_option
from hn_export.compare import EvaluationInputs
from hn_export.denoise import DenoiseConfig
from hn_export.model_files import check_output_folder
from hn_export.sensitivity import REPORT_FILES, aggregate, run_sensitivity, write_results


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--methods", default="none,quarot,sdcb,hadanorm", show_default=True, help="Comma list, or all.")
@click.option("--abits", type=click.IntRange(2, 8), default=4, show_default=True, help="Activation bits.")
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="Denoising steps.")
@samples_option(default=1)
@input_file_options
@click.option("--calib-samples", type=click.IntRange(1), default=2, show_default=True)
@click.option("--calib-steps", type=click.IntRange(1), default=20, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("hn-export-sensitivity"),
              show_default=True, help="Folder for sensitivity.json and sensitivity.png.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True)
def sensitivity_command(model, methods, abits, steps, samples, calib_inputs, inputs_path, calib_samples, calib_steps,
                        out_dir, seed, no_progress) -> None:
    """Turn on one activation quantizer at a time (weights float); SQNR at the end of denoising."""
    chosen = parse_list(methods, Method, "--methods")
    _, feeds = check_model_and_inputs(model, calib_inputs, inputs_path, samples)  # before any work
    check_output_folder(out_dir, REPORT_FILES, model, calib_inputs, inputs_path)
    config = DenoiseConfig(steps=steps, samples=samples or 1, seed=seed + 1000)
    inputs = EvaluationInputs(config, feeds, f"file:{inputs_path.name}" if feeds is not None else "seeded")
    calibration = DenoiseConfig(steps=calib_steps, samples=calib_samples, seed=seed)
    results = run_sensitivity(model, chosen, abits, config, calibration, progress=not no_progress,
                              calib_inputs=calib_inputs, inputs=inputs)
    agg = aggregate(results)
    header = f"{'role':<22}" + "".join(f"{m:>13}" for m in agg["by_role"])
    click.echo(f"A{abits} sensitivity (end-of-denoising SQNR, dB, mean over blocks)")
    click.echo(header)
    roles = list(dict.fromkeys(r.role for r in results))
    for role in roles:
        click.echo(f"{role:<22}" + "".join(f"{agg['by_role'][m].get(role, float('nan')):>13.2f}" for m in agg["by_role"]))
    meta = {"model": model.name, "abits": abits, "steps": steps, "samples": inputs.samples, "inputs": inputs.source,
            "seed": seed,
            "calibration": {"file": calib_inputs.name} if calib_inputs is not None else dataclasses.asdict(calibration)}
    for path in write_results(results, out_dir, meta, f"{model.name}: A{abits} sensitivity, one quantizer at a time"):
        click.echo(f"wrote {path}")

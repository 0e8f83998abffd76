"""`hn-export compare MODEL.onnx`: every method x bit width (x bias-correction mode) against a reference graph."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.quantization import QuantConfig
from hn_export.compare import CompareConfig, grid, run_compare, table_markdown, write_results
from hn_export.denoise import DenoiseConfig
from hn_export.errors import UserError
from hn_export.model_files import load_model


def _parse_list(text: str, enum_type, option: str) -> list:
    if text == "all":
        return list(enum_type)
    try:
        return [enum_type(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        valid = ", ".join(m.value for m in enum_type)
        raise UserError(f"{option} {text!r} names an unknown value", f"choose from: {valid}, or all") from None


def _parse_bits(text: str) -> list[QuantConfig]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            w, a = item.removeprefix("w").split("a")
            out.append(QuantConfig(int(w), int(a)))
        except ValueError:
            raise UserError(f"--bits item {item!r} is not of the form wNaM with N, M in 2..8",
                            "e.g. --bits w4a4,w6a6") from None
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--methods", default="all", show_default=True, help="Comma list of methods, or all.")
@click.option("--bits", default="w4a4,w6a6", show_default=True, help="Comma list of wNaM.")
@click.option("--bias-corrections", default="float-token", show_default=True,
              help="Comma list of bias-correction modes for centered methods, or all.")
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="Denoising steps.")
@click.option("--samples", type=click.IntRange(1), default=2, show_default=True, help="Samples (seeded).")
@click.option("--reference", type=click.Path(path_type=Path), help="Reference graph (e.g. FP16); default MODEL.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("hn-export-compare"),
              show_default=True, help="Folder for table.md, results.json and sqnr.png.")
@click.option("--calib-samples", type=click.IntRange(1), default=2, show_default=True)
@click.option("--calib-steps", type=click.IntRange(1), default=20, show_default=True)
@click.option("--hadamard", type=click.Choice(["full", "block"]), default="full", show_default=True)
@click.option("--keep-models", type=click.Path(path_type=Path), help="Keep the quantized graphs in this folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True)
def compare_command(model, methods, bits, bias_corrections, steps, samples, reference, out_dir, calib_samples,
                    calib_steps, hadamard, keep_models, seed, no_progress) -> None:
    """Quantize MODEL with each method and bit width; SQNR against the reference graph."""
    from graph_passes.hadamard import HadamardMode

    points = grid(_parse_list(methods, Method, "--methods"), _parse_bits(bits),
                  _parse_list(bias_corrections, BiasCorrection, "--bias-corrections"))
    load_model(model)  # fail fast with a clear message
    if reference is not None:
        load_model(reference, what="reference")
    config = CompareConfig(
        evaluation=DenoiseConfig(steps=steps, samples=samples, seed=seed + 1000),
        calibration=DenoiseConfig(steps=calib_steps, samples=calib_samples, seed=seed),
        transform=TransformOptions(hadamard=HadamardMode(hadamard), seed=seed),
        keep_models=keep_models,
        progress=not no_progress,
    )
    if keep_models is not None:
        keep_models.mkdir(parents=True, exist_ok=True)
    results = run_compare(model, points, reference, config)
    meta = {"model": model.name, "reference": (reference or model).name, "steps": steps, "samples": samples,
            "calibration": dataclasses.asdict(config.calibration), "seed": seed, "hadamard": hadamard}
    files = write_results(results, out_dir, meta, f"{model.name}: SQNR after {steps} denoising steps")
    click.echo(table_markdown(results))
    for path in files:
        click.echo(f"wrote {path}")

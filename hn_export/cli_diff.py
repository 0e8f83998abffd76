"""`hn-export diff CANDIDATE.onnx REFERENCE.onnx`: SQNR and friends, for one call and a whole denoising run."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import click

from hn_export.compare import EvaluationInputs
from hn_export.denoise import ModelSignature, first_call_feeds, load_input_file
from hn_export import diff as diff_lib
from hn_export.diff import check_pair, compare_outputs
from hn_export.evaluate import GraphRunner
from hn_export.cli_options import Evaluation, FiniteFloatRange, RayOptions, option_group, ray_options
from hn_export.json_report import report_json
from hn_export.model_files import check_output_path, input_files, load_model, write_atomic


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("candidate", type=click.Path(path_type=Path))
@click.argument("reference", type=click.Path(path_type=Path))
@option_group(
    Evaluation, "evaluation",
    click.option("--steps", type=click.IntRange(0), default=20, show_default=True,
                 help="Denoising steps of the full run (0: single call only)."),
    click.option("--samples", type=click.IntRange(1), default=1, show_default=True, help="Seeded samples."),
    default_samples=1)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path),
              help="Single-call inputs (.npz named like the graph inputs) instead of seeded ones.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON.")
@click.option("--min-sqnr", type=FiniteFloatRange(),
              help="Exit with code 1 when the SQNR (end of denoising, else single call) is below this many dB "
                   "(or NaN).")
@click.option("--per-layer", "per_layer", is_flag=True, help="SQNR at every activation site (one call).")
@click.option("--provider", help="Execution provider (CPU, CUDA, ...); default: the best available.")
@ray_options
def diff_command(candidate: Path, reference: Path, evaluation: Evaluation, seed: int, inputs_path: Path | None,
                 json_path: Path | None, min_sqnr: float | None, per_layer: bool, provider: str | None,
                 ray_options: RayOptions) -> None:
    """Run CANDIDATE and REFERENCE on identical inputs and compare their outputs."""
    config = evaluation.config(seed)
    steps, samples = config.steps, config.samples
    if json_path is not None:  # before any work; the graphs' external data files are inputs too
        graphs = [file for path in (candidate, reference) for file in input_files(load_model(path, any_opset=True))]
        check_output_path(json_path, candidate, reference, inputs_path, *graphs, what="--json path")
    with ray_options.cluster() as cluster:
        if cluster is None:
            with GraphRunner(reference, provider=provider) as ref, GraphRunner(candidate, provider=provider) as cand:
                sig = ref.signature
                feeds = load_input_file(inputs_path, sig, "inputs file", single_call=True) if inputs_path else None
                results = compare_outputs(cand, ref, config, feeds)
                implementations = {"candidate": cand.denoiser.implementation,
                                   "reference": ref.denoiser.implementation}
                runs_on = cand.denoiser.providers[0]
        else:  # the same outputs, one task per graph and sample
            sig = ModelSignature.of(load_model(reference, "reference", any_opset=True))
            feeds = load_input_file(inputs_path, sig, "inputs file", single_call=True) if inputs_path else None
            check_pair(sig, ModelSignature.of(load_model(candidate, "candidate", any_opset=True)), config, feeds)
            results, implementations, runs_on = cluster.diff(candidate, reference, EvaluationInputs(config), feeds,
                                                             provider, True)
    click.echo(f"candidate {candidate.name} ({implementations['candidate']}, {runs_on}) vs "
               f"reference {reference.name} ({implementations['reference']})")
    layer_feeds = first_call_feeds(sig, config, 0) if feeds is None else feeds
    click.echo(f"{'output':<28} {'SQNR (dB)':>10} {'cosine':>10} {'max abs':>11} {'rel L2':>10}")
    for name, comp in results.items():
        label = "sample, one call" if name == "single_call" else f"latents after {steps} steps"
        click.echo(f"{label:<28} {comp.sqnr_db:>10.2f} {comp.cosine:>10.6f} {comp.max_abs:>11.4g} {comp.rel_l2:>10.4g}")
    layers = diff_lib.per_layer(candidate, reference, layer_feeds) if per_layer else []
    if layers:
        click.echo(f"\n{'activation site':<36} {'role':<20} {'SQNR (dB)':>10}")
        for layer in layers:
            click.echo(f"{layer.site:<36} {layer.role:<20} {layer.comparison.sqnr_db:>10.2f}")
    if json_path is not None:
        data = {"candidate": candidate.name, "reference": reference.name, "implementation": implementations,
                "steps": steps, "samples": samples, "seed": seed,
                "outputs": {k: dataclasses.asdict(c) for k, c in results.items()},
                "per_layer": [{"site": l.site, "role": l.role, "block": l.block, **dataclasses.asdict(l.comparison)}
                              for l in layers]}
        write_atomic(json_path, report_json(data))  # NaN and inf as null
        click.echo(f"wrote {json_path}")
    if min_sqnr is not None:
        key = "end_of_denoising" if "end_of_denoising" in results else "single_call"
        got = results[key].sqnr_db
        if math.isnan(got):  # NaN passes no comparison: a broken candidate must not pass the gate
            click.echo(f"error: SQNR is NaN ({key.replace('_', ' ')}): the outputs hold NaN or inf, below --min-sqnr "
                       f"{min_sqnr} dB", err=True)
            sys.exit(1)
        if got < min_sqnr:
            click.echo(f"error: SQNR {got:.2f} dB ({key.replace('_', ' ')}) is below --min-sqnr {min_sqnr} dB", err=True)
            sys.exit(1)

"""`hn-export demo`: the whole toolchain on a built-in model, no files or network needed.

Builds the family's demo preset (``--family``; default PixArt-Sigma: the real XL-2 architecture, 256 px, full 1152
width) at reduced depth with `dit-stats` weights,
exports FP32 and FP16 graphs, quantizes W4A4 with all seven methods (calibration shared) and HadaNorm also in the
deployment formats (`nbits`, `fused`), runs each against the FP16 graph (one denoiser call and a denoising run),
prints the comparison table, then times one denoiser call of FP32 and of HadaNorm W4A4 in each format. The kernel
library is built first when it can be (otherwise `fused` runs its function bodies, and the demo says so).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import click

from graph_passes.methods import BiasCorrection, Method
from graph_passes.quantization import OutputFormat, QuantConfig
from hn_export.compare import REPORT_FILES, CompareConfig, grid, run_compare, table_markdown, write_results
from hn_export.denoise import DenoiseConfig
from hn_export.latency import median_call_ms
from hn_export.model_files import check_output_folder, write_atomic
from models.families import DEFAULT_FAMILY, FAMILIES, family

DEMO_PRESET = "pixart-sigma-256"  # the default family's demo preset


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Keep every file in this folder.")
@click.option("--family", "family_name", default=DEFAULT_FAMILY, show_default=True, metavar="NAME",
              help=f"Model family: {', '.join(FAMILIES)} (its demo preset at reduced depth).")
@click.option("--layers", type=click.IntRange(1, 28), default=2, show_default=True, help="Transformer blocks.")
@click.option("--steps", type=click.IntRange(1), default=10, show_default=True, help="Denoising steps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True)
def demo_command(out_dir: Path | None, family_name: str, layers: int, steps: int, seed: int,
                 no_progress: bool) -> None:
    """Export, quantize with all seven methods and compare against FP16 on a built-in model (PixArt-Sigma default)."""
    from hn_export.export import export_transformer
    from models.build import InitKind, ModelSource, build_transformer

    preset = family(family_name).demo_preset  # an unknown name: one line naming the families
    if out_dir is not None:  # before any work: the folder and the files it will hold
        check_output_folder(out_dir, [f"{preset}.onnx", f"{preset}.fp16.onnx", *REPORT_FILES, "latency.json"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hn-export-demo-") as tmp:
        folder = out_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        fp32, fp16 = folder / f"{preset}.onnx", folder / f"{preset}.fp16.onnx"
        source = ModelSource(preset=preset, layers=layers, seed=seed, init=InitKind.DIT_STATS)
        _build_kernels()
        click.echo(f"1/4 building {preset} ({layers} blocks, dit-stats, seed {seed}) and exporting FP32 + FP16")
        model = build_transformer(source)
        export_transformer(model, fp32, progress=not no_progress)
        export_transformer(model, fp16, fp16=True, progress=not no_progress)
        del model
        click.echo("2/4 calibrating once, then quantizing W4A4 with every method (HadaNorm also as nbits and fused)")
        config = CompareConfig(
            evaluation=DenoiseConfig(steps=steps, samples=1, seed=seed + 1000),
            calibration=DenoiseConfig(steps=steps, samples=1, seed=seed),
            keep_models=folder,
            progress=not no_progress,
        )
        deploy = [QuantConfig(4, 4, format=f) for f in (OutputFormat.NBITS, OutputFormat.FUSED)]
        points = (grid(list(Method), [QuantConfig(4, 4)], [BiasCorrection.FLOAT_TOKEN])
                  + grid([Method.HADANORM], deploy, [BiasCorrection.FLOAT_TOKEN]))
        results = run_compare(fp32, points, fp16, config)
        click.echo(f"3/4 compared against {fp16.name} (single call and {steps}-step denoising)\n")
        click.echo(table_markdown(results))
        click.echo("4/4 one denoiser call (batch 2), median of 3 interleaved runs\n")
        graphs = {"FP32": fp32, **{f"HadaNorm {p.bits.upper()}": folder / f"{fp32.name.removesuffix('.onnx')}."
                                   f"{p.file_stem}.onnx" for p in points if p.method is Method.HADANORM}}
        timings = median_call_ms(graphs)
        base = timings["FP32"][0]
        click.echo("| graph | ms | speed-up vs FP32 | runs as |\n|---|---:|---:|---|")
        for name, (ms, implementation) in timings.items():
            click.echo(f"| {name} | {ms:.0f} | {base / ms:.2f}x | {implementation} |")
        click.echo("")
        meta = {"preset": preset, "layers": layers, "steps": steps, "seed": seed, "reference": fp16.name,
                "calibration": dataclasses.asdict(config.calibration)}
        files = write_results(results, folder, meta, f"{preset}, {layers} blocks: W4A4 SQNR vs FP16")
        if out_dir:
            meta_timings = {name: {"ms": round(ms, 1), "implementation": impl} for name, (ms, impl) in timings.items()}
            write_atomic(folder / "latency.json", json.dumps(meta_timings, indent=2) + "\n")
            for path in sorted(folder.iterdir()):
                if path.is_file():
                    click.echo(f"wrote {path}")
        else:
            click.echo(f"(files were in a temporary folder, now deleted: {', '.join(p.name for p in files)} and "
                       "the ONNX graphs; pass --out DIR to keep them)")
    click.echo(f"done in {time.perf_counter() - start:.0f} s")


def _build_kernels() -> None:
    from runtime.kernels.build import BuildError, build

    try:
        build()
    except BuildError as exc:
        click.echo(f"note: hadanorm kernel library not built ({' '.join(str(exc).split())[:200]}); "
                   "fused graphs run their function bodies (slow)")

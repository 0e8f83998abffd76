"""`hn-export demo`: the whole toolchain on the built-in PixArt-Sigma, no files or network needed.

Builds the real PixArt-Sigma XL-2 architecture (256 px, full 1152 width) at reduced depth with `dit-stats` weights,
exports FP32 and FP16 graphs, quantizes W4A4 with all six methods (calibration shared), runs each against the FP16
graph (one denoiser call and a denoising run) and prints the comparison table.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import click

from graph_passes.methods import BiasCorrection, Method
from graph_passes.quantization import QuantConfig
from hn_export.compare import CompareConfig, grid, run_compare, table_markdown, write_results
from hn_export.denoise import DenoiseConfig

DEMO_PRESET = "pixart-sigma-256"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Keep every file in this folder.")
@click.option("--layers", type=click.IntRange(1, 28), default=2, show_default=True, help="Transformer blocks.")
@click.option("--steps", type=click.IntRange(1), default=10, show_default=True, help="Denoising steps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True)
def demo_command(out_dir: Path | None, layers: int, steps: int, seed: int, no_progress: bool) -> None:
    """Export, quantize with all six methods and compare against FP16 on the built-in PixArt-Sigma."""
    from hn_export.export import export_transformer
    from models.build import InitKind, ModelSource, build_transformer

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hn-export-demo-") as tmp:
        folder = out_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        fp32, fp16 = folder / "pixart-sigma-256.onnx", folder / "pixart-sigma-256.fp16.onnx"
        source = ModelSource(preset=DEMO_PRESET, layers=layers, seed=seed, init=InitKind.DIT_STATS)
        click.echo(f"1/3 building {DEMO_PRESET} ({layers} blocks, dit-stats, seed {seed}) and exporting FP32 + FP16")
        model = build_transformer(source)
        export_transformer(model, fp32, progress=not no_progress)
        export_transformer(model, fp16, fp16=True, progress=not no_progress)
        del model
        click.echo("2/3 calibrating once, then quantizing W4A4 with every method")
        config = CompareConfig(
            evaluation=DenoiseConfig(steps=steps, samples=1, seed=seed + 1000),
            calibration=DenoiseConfig(steps=steps, samples=1, seed=seed),
            keep_models=folder if out_dir else None,
            progress=not no_progress,
        )
        points = grid(list(Method), [QuantConfig(4, 4)], [BiasCorrection.FLOAT_TOKEN])
        results = run_compare(fp32, points, fp16, config)
        click.echo(f"3/3 compared against {fp16.name} (single call and {steps}-step denoising)\n")
        click.echo(table_markdown(results))
        meta = {"preset": DEMO_PRESET, "layers": layers, "steps": steps, "seed": seed, "reference": fp16.name,
                "calibration": dataclasses.asdict(config.calibration)}
        files = write_results(results, folder, meta, f"{DEMO_PRESET}, {layers} blocks: W4A4 SQNR vs FP16")
        if out_dir:
            for path in sorted(folder.iterdir()):
                if path.is_file():
                    click.echo(f"wrote {path}")
        else:
            click.echo(f"(files were in a temporary folder, now deleted: {', '.join(p.name for p in files)} and "
                       "the ONNX graphs; pass --out DIR to keep them)")
    click.echo(f"done in {time.perf_counter() - start:.0f} s")

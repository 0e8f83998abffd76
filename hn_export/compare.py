"""The comparison grid behind `hn-export compare`: methods x bit widths x bias-correction modes.

Calibration runs once and is shared; each grid point is quantized to a temporary file, run against the reference
(single-call and end-of-denoising SQNR), then deleted unless kept.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.quantization import QuantConfig
from hn_export.calibration import CalibrationStats, calibrate
from hn_export.denoise import DenoiseConfig
from hn_export.evaluate import Evaluation, GraphRunner, evaluate, reference_outputs
from hn_export.model_files import write_atomic
from hn_export.quantize_job import QuantizeJob, run_quantize

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GridPoint:
    method: Method
    quant: QuantConfig
    bias_correction: BiasCorrection

    @property
    def file_stem(self) -> str:
        bias = f".{self.bias_correction.value}" if self.method.recipe.center else ""
        return f"{self.method.value}{bias}.{self.quant.label}"

    @property
    def label(self) -> str:
        if self.method.recipe.center:
            return f"{self.method.value} ({self.bias_correction.value})"
        return self.method.value


@dataclasses.dataclass
class GridResult:
    point: GridPoint
    evaluation: Evaluation
    seconds: float

    def as_dict(self) -> dict:
        def comp(c):
            return None if c is None else {k: (None if isinstance(v, float) and math.isinf(v) else v)
                                           for k, v in dataclasses.asdict(c).items()}
        return {
            "label": self.point.label,
            "method": self.point.method.value,
            "bias_correction": self.point.bias_correction.value if self.point.method.recipe.center else None,
            "bits": self.point.quant.label,
            "single_call": comp(self.evaluation.single_call),
            "end_of_denoising": comp(self.evaluation.end_of_denoising),
        }  # no timings: the same command gives byte-identical reports


def grid(methods: list[Method], quants: list[QuantConfig], biases: list[BiasCorrection]) -> list[GridPoint]:
    points = []
    for quant in quants:
        for method in methods:
            for bias in (biases if method.recipe.center else biases[:1]):
                points.append(GridPoint(method, quant, bias))
    return points


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    evaluation: DenoiseConfig = DenoiseConfig(steps=20, samples=2)
    calibration: DenoiseConfig = DenoiseConfig(steps=20, samples=2)
    transform: TransformOptions = TransformOptions()
    keep_models: Path | None = None
    progress: bool = True


def run_compare(model: Path, points: list[GridPoint], reference: Path | None, config: CompareConfig) -> list[GridResult]:
    needs_stats = any(p.method.recipe.smooth for p in points)
    stats: CalibrationStats | None = None
    if needs_stats:
        stats = calibrate(model, config.calibration, progress=config.progress)
    with GraphRunner(reference or model) as ref:
        ref_out = reference_outputs(ref, config.evaluation, with_denoising=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="hn-export-compare-") as tmp:
        folder = config.keep_models or Path(tmp)
        for point in tqdm(points, desc="compare", unit="model", disable=not config.progress):
            start = time.perf_counter()
            out = folder / f"{model.name.removesuffix('.onnx')}.{point.file_stem}.onnx"
            transform = dataclasses.replace(config.transform, method=point.method,
                                            bias_correction=point.bias_correction)
            run_quantize(QuantizeJob(model, out, transform, point.quant, stats=stats, progress=False))
            with GraphRunner(out) as runner:
                evaluation = evaluate(runner, ref_out, config.evaluation)
            if config.keep_models is None:
                out.unlink()
            results.append(GridResult(point, evaluation, time.perf_counter() - start))
            logger.info("%s %s: %.2f dB", point.label, point.quant.label, evaluation.end_of_denoising.sqnr_db)
    return results


def table_markdown(results: list[GridResult]) -> str:
    lines = ["| method | bits | end-of-denoising SQNR (dB) | single-call SQNR (dB) | single-call cosine |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        e, s = r.evaluation.end_of_denoising, r.evaluation.single_call
        lines.append(f"| {r.point.label} | {r.point.quant.label.upper()} | {e.sqnr_db:.2f} | {s.sqnr_db:.2f} | "
                     f"{s.cosine:.4f} |")
    return "\n".join(lines) + "\n"


def plot_sqnr(rows: list[dict], title: str) -> bytes:
    """Grouped bars of end-of-denoising SQNR from `GridResult.as_dict()` rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(dict.fromkeys(r["label"] for r in rows))
    bits = list(dict.fromkeys(r["bits"] for r in rows))
    values = {(r["label"], r["bits"]): r["end_of_denoising"]["sqnr_db"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.5), dpi=120)
    width = 0.8 / len(bits)
    x = np.arange(len(labels))
    for i, b in enumerate(bits):
        heights = [values.get((label, b), np.nan) for label in labels]
        bars = ax.bar(x + (i - (len(bits) - 1) / 2) * width, heights, width, label=b.upper())
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.margins(y=0.12)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("end-of-denoising SQNR (dB)")
    ax.set_xlabel("method (bias correction)")
    ax.set_title(title)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(title="bits")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def replot(out_dir: Path) -> Path:
    """Redraw `out_dir/sqnr.png` from `out_dir/results.json`."""
    data = json.loads((Path(out_dir) / "results.json").read_text())
    meta = data["meta"]
    title = f"{meta['model']}: SQNR after {meta['steps']} denoising steps"
    return write_atomic(Path(out_dir) / "sqnr.png", plot_sqnr(data["results"], title))


def write_results(results: list[GridResult], out_dir: Path, meta: dict, title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r.as_dict() for r in results]
    return [
        write_atomic(out_dir / "table.md", table_markdown(results)),
        write_atomic(out_dir / "results.json", json.dumps({"meta": meta, "results": rows}, indent=2) + "\n"),
        write_atomic(out_dir / "sqnr.png", plot_sqnr(rows, title)),
    ]

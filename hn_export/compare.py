"""The comparison grid behind `hn-export compare`: methods x bit widths x bias-correction modes.

Calibration runs once (on denoising trajectories, or on a user file) and is shared; each grid point is quantized to
a temporary file, run against the reference (single-call and end-of-denoising SQNR), then deleted unless kept.

What the graphs run on (`EvaluationInputs`): seeded inputs by default (`hn_export.evaluate`), or a user file
(``--inputs FILE.npz``). A file's rows are taken in (unconditional, conditional) pairs, as a classifier-free-guidance
pipeline calls the transformer: the single call runs the rows as stored, two at a time; denoising sample ``i`` starts
from the same seeded latents as the default run and is conditioned on pair ``i``'s caption embeddings (and mask), so a
file holding the seeded captions reproduces the default figures.
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

import numpy as np
from tqdm import tqdm

from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.quantization import OutputFormat, QuantConfig, WeightRange
from graph_passes.static_act_quant import ActGranularity
from hn_export.calibration import CalibrationStats, calibrate
from hn_export.denoise import DenoiseConfig, denoise, first_call_feeds
from hn_export.evaluate import Evaluation, GraphRunner
from hn_export.json_report import report_json
from hn_export.metrics import Comparison
from hn_export.model_files import write_atomic
from hn_export.quantize_job import AttentionChoice, QuantizeJob, run_quantize

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GridPoint:
    method: Method
    quant: QuantConfig
    bias_correction: BiasCorrection
    act_granularity: ActGranularity = ActGranularity.TOKEN

    @property
    def file_stem(self) -> str:
        bias = f".{self.bias_correction.value}" if self.method.recipe.center else ""
        act = "" if self.act_granularity is ActGranularity.TOKEN else f".{self.act_granularity.value}"
        return f"{self.method.value}{bias}{act}.{self.bits}"

    @property
    def bits(self) -> str:
        """``w4a4``; ``-mse`` / ``-gptq`` / ``-gptq-act-order`` for a weight range other than min/max, ``-r16`` for a
        low-rank branch, ``-fused`` for a format other than qdq (``w4a4-gptq-r16-fused``)."""
        quant, fmt = self.quant, self.quant.format
        weight_range = "" if quant.weight_range is WeightRange.MINMAX else f"-{quant.weight_range.value}"
        low_rank = f"-r{quant.low_rank}" if quant.low_rank else ""
        return quant.label + weight_range + low_rank + ("" if fmt is OutputFormat.QDQ else f"-{fmt.value}")

    @property
    def label(self) -> str:
        parts = [self.bias_correction.value] if self.method.recipe.center else []
        if self.act_granularity is not ActGranularity.TOKEN:
            parts.append(f"static per {self.act_granularity.value}")
        return self.method.value + (f" ({', '.join(parts)})" if parts else "")


@dataclasses.dataclass
class GridResult:
    point: GridPoint
    evaluation: Evaluation
    seconds: float
    implementation: str = ""  # what ran the quantized graph (runtime.Denoiser.implementation)

    def as_dict(self) -> dict:
        def comp(c):
            return None if c is None else {k: (None if isinstance(v, float) and math.isinf(v) else v)
                                           for k, v in dataclasses.asdict(c).items()}
        return {
            "label": self.point.label,
            "method": self.point.method.value,
            "bias_correction": self.point.bias_correction.value if self.point.method.recipe.center else None,
            "act_granularity": self.point.act_granularity.value,
            "weight_range": self.point.quant.weight_range.value,
            "low_rank": self.point.quant.low_rank,
            "bits": self.point.bits,
            "format": self.point.quant.format.value,
            "implementation": self.implementation,
            "single_call": comp(self.evaluation.single_call),
            "end_of_denoising": comp(self.evaluation.end_of_denoising),
        }  # no timings: the same command gives byte-identical reports


def grid(methods: list[Method], quants: list[QuantConfig], biases: list[BiasCorrection],
         granularities: list[ActGranularity] = (ActGranularity.TOKEN,)) -> list[GridPoint]:
    """Every method x bit width x (bias correction of centered methods) x activation granularity; static
    granularities only at points that are written in a format that holds them (qdq, nbits)."""
    points = []
    for quant in quants:
        for method in methods:
            for bias in (biases if method.recipe.center else biases[:1]):
                for granularity in granularities:
                    if granularity is ActGranularity.TOKEN or quant.format is not OutputFormat.FUSED:
                        points.append(GridPoint(method, quant, bias, granularity))
    return points


OUTPUTS = ("single_call", "end_of_denoising")  # what a comparison measures (`EvaluationInputs.sample_outputs`)


@dataclasses.dataclass(frozen=True)
class EvaluationInputs:
    """The inputs every graph of one comparison runs on: seeded (``feeds`` None) or a user file's checked arrays
    (`hn_export.cli_options.EvaluationData.check`: rows in (unconditional, conditional) pairs)."""

    config: DenoiseConfig  # steps; seed of the starting latents; samples when seeded
    feeds: dict[str, np.ndarray] | None = None
    source: str = "seeded"  # or "file:NAME"

    @property
    def samples(self) -> int:
        first = None if self.feeds is None else self.feeds.get("hidden_states", next(iter(self.feeds.values())))
        return self.config.samples if first is None else first.shape[0] // 2

    def _pair(self, index: int) -> dict[str, np.ndarray]:
        assert self.feeds is not None
        return {k: v[2 * index:2 * index + 2] for k, v in self.feeds.items()}

    def sample_outputs(self, runner: GraphRunner, index: int,
                       outputs: tuple[str, ...] = OUTPUTS) -> dict[str, np.ndarray]:
        """Sample `index`'s single-call output and / or final latents (`outputs`): the unit of work of a grid task
        (`hn_export.cluster.grid_tasks`); `gather_samples` puts the samples together as `reference` does."""
        out = {}
        if "single_call" in outputs:  # one call: the seeded latents at a mid-schedule timestep, or the file's pair
            out["single_call"] = runner(first_call_feeds(runner.signature, self.config, index)) \
                if self.feeds is None else runner(self._pair(index))
        if "end_of_denoising" in outputs:
            out["end_of_denoising"] = self._final_latents(runner, index)
        return out

    def _final_latents(self, runner: GraphRunner, index: int) -> np.ndarray:
        if self.feeds is None:
            return denoise(runner, runner.signature, self.config, index)
        # the file's conditioning (captions, pooled text, class labels, ...): every input but latents and time
        conditions = {k: v for k, v in self._pair(index).items() if k not in ("hidden_states", "timestep")}

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            return runner({**feeds, **conditions})  # the seeded trajectory, the file's captions

        return denoise(run, runner.signature, self.config, index)

    def final_latents(self, runner: GraphRunner) -> np.ndarray:
        """The final latents of every sample's denoising run."""
        return np.concatenate([self._final_latents(runner, i) for i in range(self.samples)])

    def reference(self, runner: GraphRunner) -> dict[str, np.ndarray]:
        return gather_samples([self.sample_outputs(runner, i) for i in range(self.samples)])

    def evaluate(self, runner: GraphRunner, reference: dict[str, np.ndarray]) -> Evaluation:
        return compare_outputs(reference, self.reference(runner))


def gather_samples(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-sample outputs (in sample order) -> each output over the samples that have it."""
    keys = dict.fromkeys(key for sample in samples for key in sample)
    return {key: np.concatenate([sample[key] for sample in samples if key in sample]) for key in keys}


def compare_outputs(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> Evaluation:
    return Evaluation(Comparison.of(reference["single_call"], outputs["single_call"]),
                      Comparison.of(reference["end_of_denoising"], outputs["end_of_denoising"]))


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    evaluation: DenoiseConfig = DenoiseConfig(steps=20, samples=2)
    calibration: DenoiseConfig = DenoiseConfig(steps=20, samples=2)
    transform: TransformOptions = TransformOptions()
    keep_models: Path | None = None
    progress: bool = True
    calib_inputs: Path | None = None  # --calib FILE.npz instead of trajectories
    inputs: EvaluationInputs | None = None  # default: seeded, from `evaluation`
    attention: AttentionChoice = AttentionChoice.AUTO  # --attention (fused graphs: fast by default)


def point_job(model: Path, out: Path, point: GridPoint, config: CompareConfig, stats: CalibrationStats | None,
              calib_inputs: Path | None = None) -> QuantizeJob:
    """The quantize job of one grid point (`calib_inputs`: where this machine reads ``--calib``, for the points
    that calibrate again: GPTQ's Hessians)."""
    transform = dataclasses.replace(config.transform, method=point.method, bias_correction=point.bias_correction)
    return QuantizeJob(model, out, transform, point.quant, stats=stats, progress=False,
                       calibration=config.calibration, calib_inputs=calib_inputs or config.calib_inputs,
                       act_granularity=point.act_granularity, attention=config.attention)


def run_compare(model: Path, points: list[GridPoint], reference: Path | None, config: CompareConfig,
                cluster=None) -> list[GridResult]:
    """`cluster` (`hn_export.cluster.Cluster`): calibrate as a map-reduce and run the grid as tasks, one per graph
    and sample; the results are the same."""
    needs_stats = any(p.method.recipe.smooth for p in points)
    stats: CalibrationStats | None = None
    if needs_stats:
        stats = calibrate(model, config.calibration, config.calib_inputs, progress=config.progress, cluster=cluster)
    inputs = config.inputs or EvaluationInputs(config.evaluation)
    if cluster is not None:
        return cluster.compare(model, points, reference, config, inputs, stats)
    with GraphRunner(reference or model) as ref:
        ref_out = inputs.reference(ref)
    results = []
    with tempfile.TemporaryDirectory(prefix="hn-export-compare-") as tmp:
        folder = config.keep_models or Path(tmp)
        for point in tqdm(points, desc="compare", unit="model", disable=not config.progress):
            start = time.perf_counter()
            out = folder / f"{model.name.removesuffix('.onnx')}.{point.file_stem}.onnx"
            run_quantize(point_job(model, out, point, config, stats))
            with GraphRunner(out) as runner:
                evaluation = inputs.evaluate(runner, ref_out)
                implementation = runner.denoiser.implementation
            if config.keep_models is None:
                out.unlink()
            results.append(GridResult(point, evaluation, time.perf_counter() - start, implementation))
            logger.info("%s %s: %.2f dB", point.label, point.bits, evaluation.end_of_denoising.sqnr_db)
    return results


def table_markdown(results: list[GridResult]) -> str:
    lines = ["| method | bits | end-of-denoising SQNR (dB) | single-call SQNR (dB) | single-call cosine | runs as |",
             "|---|---|---:|---:|---:|---|"]
    for r in results:
        e, s = r.evaluation.end_of_denoising, r.evaluation.single_call
        lines.append(f"| {r.point.label} | {r.point.bits.upper()} | {e.sqnr_db:.2f} | {s.sqnr_db:.2f} | "
                     f"{s.cosine:.4f} | {r.implementation} |")
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


REPORT_FILES = ("table.md", "results.json", "sqnr.png")  # what `write_results` writes


def write_results(results: list[GridResult], out_dir: Path, meta: dict, title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r.as_dict() for r in results]
    return [
        write_atomic(out_dir / "table.md", table_markdown(results)),
        write_atomic(out_dir / "results.json", report_json({"meta": meta, "results": rows})),
        write_atomic(out_dir / "sqnr.png", plot_sqnr(rows, title)),
    ]

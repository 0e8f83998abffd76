"""The paper's sensitivity study: one activation quantizer on at a time, SQNR at the end of denoising.

For each method the FP graph gets the method's transforms (fused, float weights) and every activation quantizer
behind a runtime mask (`graph_passes.gated_activation_quant`). Run ``i`` sets the mask to ``e_i`` and denoises from
the same seeds as the FP reference; the SQNR of its final latents is quantizer ``i``'s sensitivity. Results are
aggregated by role (mean over blocks, in dB) and by block (mean over roles). Calibration may come from a user file
(``--calib``) and the denoising runs may be conditioned on a user file's caption embeddings (``--inputs``, see
`hn_export.compare.EvaluationInputs`).
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from graph_passes.gated_activation_quant import MASK_INPUT
from graph_passes.methods import Method, TransformOptions
from graph_passes.pipeline import quantize_model
from hn_export.families import selection_for
from hn_export.calibration import CalibrationStats, calibrate
from hn_export.compare import EvaluationInputs
from hn_export.denoise import DenoiseConfig
from hn_export.evaluate import GraphRunner
from hn_export.json_report import report_json
from hn_export.metrics import sqnr_db
from hn_export.graph_import import load_graph
from hn_export.model_files import save_model, write_atomic


@dataclasses.dataclass(frozen=True)
class SiteSensitivity:
    method: str
    site: str
    role: str
    block: int | None
    sqnr_db: float
    implementation: str = ""  # what ran the gated graph (runtime.Denoiser.implementation)


class MaskedRunner(GraphRunner):
    """A gated graph run with one mask (`graph_passes.gated_activation_quant`): quantizer ``i`` on for ``e_i``."""

    def __init__(self, path: Path, mask: np.ndarray):
        super().__init__(path)
        self.mask = mask

    def __call__(self, feeds):
        return super().__call__({**feeds, MASK_INPUT: self.mask.astype(self.signature.dtype)})


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """One activation quantizer of a gated graph (its mask index is its position in `gated_graph`'s list)."""

    site: str
    role: str
    block: int | None


def gated_graph(model_path: Path, method: Method, act_bits: int, stats: CalibrationStats | None,
                transform: TransformOptions, path: Path) -> list[Quantizer]:
    """Write `method`'s gated graph of the FP graph to `path`; returns its quantizers in mask order."""
    model = load_graph(model_path)
    options = dataclasses.replace(transform, method=method)
    plan = quantize_model(model, stats.sites if stats else {}, options, None, selection_for(model),
                          gated_act_bits=act_bits)
    save_model(model, path)
    return [Quantizer(site.name, site.role, site.block) for site in plan.sites]


def mask_of(quantizers: list[Quantizer], index: int) -> np.ndarray:
    mask = np.zeros(len(quantizers))
    mask[index] = 1.0
    return mask


def run_sensitivity(model_path: Path, methods: list[Method], act_bits: int, config: DenoiseConfig,
                    calibration: DenoiseConfig, transform: TransformOptions = TransformOptions(),
                    progress: bool = True, calib_inputs: Path | None = None,
                    inputs: EvaluationInputs | None = None, cluster=None) -> list[SiteSensitivity]:
    """`config` sets the denoising runs (seeded unless `inputs` is given); `calib_inputs` replaces the calibration
    trajectories of `calibration`. `cluster` (`hn_export.cluster.Cluster`): calibrate as a map-reduce and run each
    (method, quantizer, sample) as a task; the results are the same."""
    stats: CalibrationStats | None = None
    if any(m.recipe.smooth for m in methods):
        stats = calibrate(model_path, calibration, calib_inputs, progress=progress, cluster=cluster)
    inputs = inputs or EvaluationInputs(config)
    if cluster is not None:
        return cluster.sensitivity(model_path, methods, act_bits, stats, transform, inputs, progress)
    with GraphRunner(model_path) as ref:
        reference = inputs.final_latents(ref)
    results: list[SiteSensitivity] = []
    with tempfile.TemporaryDirectory(prefix="hn-export-sensitivity-") as tmp:
        for method in methods:
            path = Path(tmp) / f"{method.value}.gated.onnx"
            quantizers = gated_graph(model_path, method, act_bits, stats, transform, path)
            for i, q in enumerate(tqdm(quantizers, desc=f"sensitivity {method.value}", unit="quantizer",
                                       disable=not progress)):
                with MaskedRunner(path, mask_of(quantizers, i)) as runner:
                    latents = inputs.final_latents(runner)
                    implementation = runner.denoiser.implementation
                results.append(SiteSensitivity(method.value, q.site, q.role, q.block, sqnr_db(reference, latents),
                                               implementation))
            path.unlink()
    return results


def aggregate(results: list[SiteSensitivity]) -> dict:
    by_role: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_block: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_role[r.method][r.role].append(r.sqnr_db)
        if r.block is not None:
            by_block[r.method][r.block].append(r.sqnr_db)
    return {
        "by_role": {m: {role: float(np.mean(v)) for role, v in roles.items()} for m, roles in by_role.items()},
        "by_block": {m: {str(b): float(np.mean(v)) for b, v in sorted(blocks.items())}
                     for m, blocks in by_block.items()},
    }


def plot(results: list[SiteSensitivity], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    agg = aggregate(results)
    methods = list(agg["by_role"])
    roles = list(dict.fromkeys(r.role for r in results))  # the order of the sites in the graph
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(roles))
    for i, m in enumerate(methods):
        left.bar(x + (i - (len(methods) - 1) / 2) * width, [agg["by_role"][m].get(r, np.nan) for r in roles],
                 width, label=m)
        blocks = agg["by_block"].get(m, {})
        right.plot([int(b) for b in blocks], list(blocks.values()), marker="o", label=m)
    left.set_xticks(x, roles, rotation=25, ha="right")
    left.set_ylabel("end-of-denoising SQNR (dB)")
    left.set_xlabel("activation quantizer role (mean over blocks)")
    left.grid(axis="y", alpha=0.3)
    left.legend(title="method", fontsize=8)
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.set_xlabel("transformer block (mean over roles)")
    right.set_ylabel("end-of-denoising SQNR (dB)")
    right.grid(alpha=0.3)
    right.legend(title="method", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


REPORT_FILES = ("sensitivity.json", "sensitivity.png")  # what `write_results` writes


def write_results(results: list[SiteSensitivity], out_dir: Path, meta: dict, title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "sites": [dataclasses.asdict(r) for r in results], **aggregate(results)}
    return [
        write_atomic(out_dir / "sensitivity.json", report_json(data)),
        write_atomic(out_dir / "sensitivity.png", plot(results, title)),
    ]

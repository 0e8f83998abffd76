"""compare, sensitivity and diff as tasks: one per graph x sample (x quantizer, for sensitivity).

A task gets its graph on its node (`GraphSource`): a shipped model as it is (the FP model, a reference, a diff
candidate), or a graph built from it once per node (`node_files.built_once`): a compare grid point quantized by
the quantize job (`hn_export.compare.point_job`) or a method's gated sensitivity graph
(`hn_export.sensitivity.gated_graph`). It runs one sample (`hn_export.compare.EvaluationInputs.sample_outputs`:
the single call and / or the final latents) and returns the outputs; the driver puts the samples together in
sample order and computes the same comparisons, tables and plots as the local run, from the same arrays.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from graph_passes.methods import Method, TransformOptions
from hn_export.calibration import CalibrationStats
from hn_export.cluster.node_files import FileSet, built_once, materialize
from hn_export.cluster.tasks import TaskFault, TaskOutput, check_fault, node_id
from hn_export.compare import (OUTPUTS, CompareConfig, EvaluationInputs, GridPoint, GridResult, compare_outputs,
                               gather_samples, point_job)
from hn_export.evaluate import GraphRunner
from hn_export.metrics import Comparison, sqnr_db
from hn_export.quantize_job import run_quantize
from hn_export.sensitivity import MaskedRunner, Quantizer, SiteSensitivity, gated_graph, mask_of

KIND = "grid"
GRAPH = "graph.onnx"  # a built graph's name in its node folder
_QUANTIZERS = "quantizers.json"


@dataclasses.dataclass(frozen=True)
class PointBuild:
    """A compare grid point: the quantize job on the node's copy of the model (and of ``--calib``)."""

    point: GridPoint
    config: CompareConfig
    calib: FileSet | None = None

    def __call__(self, model: Path, folder: Path, stats: CalibrationStats | None) -> None:
        calib = materialize(self.calib)[0] if self.calib is not None else None
        run_quantize(point_job(model, folder / GRAPH, self.point, self.config, stats, calib))


@dataclasses.dataclass(frozen=True)
class GatedBuild:
    """A method's gated sensitivity graph, and its quantizers in mask order."""

    method: Method
    act_bits: int
    transform: TransformOptions

    def __call__(self, model: Path, folder: Path, stats: CalibrationStats | None) -> None:
        quantizers = gated_graph(model, self.method, self.act_bits, stats, self.transform, folder / GRAPH)
        (folder / _QUANTIZERS).write_text(json.dumps([dataclasses.asdict(q) for q in quantizers]))


@dataclasses.dataclass(frozen=True)
class GraphSource:
    files: FileSet  # the shipped model
    build: Callable[[Path, Path, CalibrationStats | None], None] | None = None  # PointBuild, GatedBuild
    key: str = ""  # the built graph's node folder

    def path(self, stats: CalibrationStats | None) -> tuple[Path, bool]:
        """On the node: the graph to run, and whether this call fetched the shipped model."""
        model, fetched = materialize(self.files)
        if self.build is None:
            return model, fetched
        build = self.build
        folder, _ = built_once(self.key, lambda out: build(model, out, stats))
        return folder / GRAPH, fetched


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """What one task runs: sample `index` of the inputs (`outputs` of `EvaluationInputs.sample_outputs`), under
    `mask` (a gated graph), or one call on `feeds` (diff --inputs)."""

    index: int = 0
    outputs: tuple[str, ...] = OUTPUTS
    mask: np.ndarray | None = None
    feeds: dict[str, np.ndarray] | None = None


@dataclasses.dataclass
class SampleResult:
    outputs: dict[str, np.ndarray]
    implementation: str
    provider: str
    seconds: float


def graph_task(source: GraphSource, stats: CalibrationStats | None, inputs: EvaluationInputs,
               request: SampleRequest, provider: str | None, number: int, fault: TaskFault | None) -> TaskOutput:
    check_fault(fault, KIND, number)
    start = time.perf_counter()
    path, fetched = source.path(stats)
    runner = GraphRunner(path, provider=provider) if request.mask is None else MaskedRunner(path, request.mask)
    with runner:
        if request.feeds is not None:
            outputs = {"single_call": runner(request.feeds)}
        else:
            outputs = inputs.sample_outputs(runner, request.index, request.outputs)
        result = SampleResult(outputs, runner.denoiser.implementation, runner.denoiser.providers[0],
                              time.perf_counter() - start)
    return TaskOutput(result, node_id(), fetched)


def quantizers_task(source: GraphSource, stats: CalibrationStats | None) -> TaskOutput:
    """Build a gated graph on this node; its quantizers."""
    path, fetched = source.path(stats)
    quantizers = [Quantizer(**q) for q in json.loads((path.parent / _QUANTIZERS).read_text())]
    return TaskOutput(quantizers, node_id(), fetched)


@dataclasses.dataclass(frozen=True)
class Job:
    source: GraphSource
    request: SampleRequest
    label: str


def run_jobs(cluster, jobs: Sequence[Job], stats: CalibrationStats | None, inputs: EvaluationInputs,
             provider: str | None, desc: str, progress: bool) -> list[SampleResult]:
    """Every job as a task; their results in job order."""
    import ray

    fault = TaskFault.from_env()
    stats_ref, inputs_ref = ray.put(stats), ray.put(inputs)
    task = cluster.remote(graph_task)
    refs = [task.remote(job.source, stats_ref, inputs_ref, job.request, provider, i, fault)
            for i, job in enumerate(jobs)]
    return list(cluster.gather(refs, [job.label for job in jobs], desc, progress))


def _samples(source: GraphSource, inputs: EvaluationInputs, label: str,
             outputs: tuple[str, ...] = OUTPUTS, mask: np.ndarray | None = None) -> list[Job]:
    return [Job(source, SampleRequest(i, outputs, mask), f"{label} sample {i}") for i in range(inputs.samples)]


def _gathered(results: list[SampleResult]) -> tuple[dict[str, np.ndarray], str, float]:
    """Samples of one graph -> its outputs over all samples, what ran it, its task seconds."""
    return (gather_samples([r.outputs for r in results]), results[0].implementation,
            sum(r.seconds for r in results))


def compare_grid(cluster, model: Path, points: list[GridPoint], reference: Path | None, config: CompareConfig,
                 inputs: EvaluationInputs, stats: CalibrationStats | None) -> list[GridResult]:
    """`hn_export.compare.run_compare`'s grid: the reference and every point, one task per sample."""
    files = cluster.ship_model(model)
    needs_calib = config.calib_inputs is not None and any(p.quant.weight_range.needs_hessian for p in points)
    calib = cluster.ship_file(config.calib_inputs) if needs_calib else None
    base = dataclasses.replace(config, inputs=None, keep_models=None)
    sources = [GraphSource(cluster.ship_model(reference) if reference is not None else files)]
    sources += [GraphSource(files, PointBuild(p, base, calib), f"point-{i}") for i, p in enumerate(points)]
    labels = ["reference"] + [f"compare {p.label} {p.bits}" for p in points]
    jobs = [job for source, label in zip(sources, labels) for job in _samples(source, inputs, label)]
    results = run_jobs(cluster, jobs, stats, inputs, None, "compare", config.progress)
    n = inputs.samples
    per_graph = [_gathered(results[g * n:(g + 1) * n]) for g in range(len(sources))]
    ref_out = per_graph[0][0]
    return [GridResult(point, compare_outputs(ref_out, outputs), seconds, implementation)
            for point, (outputs, implementation, seconds) in zip(points, per_graph[1:])]


def sensitivity_grid(cluster, model: Path, methods: list[Method], act_bits: int, stats: CalibrationStats | None,
                     transform: TransformOptions, inputs: EvaluationInputs, progress: bool) -> list[SiteSensitivity]:
    """`hn_export.sensitivity.run_sensitivity`'s runs: one task per method x quantizer x sample."""
    import ray

    files = cluster.ship_model(model)
    gated = [GraphSource(files, GatedBuild(m, act_bits, transform), f"gated-{m.value}") for m in methods]
    stats_ref = ray.put(stats)
    task = cluster.remote(quantizers_task)
    plans = list(cluster.gather([task.remote(source, stats_ref) for source in gated],
                                [f"sensitivity {m.value} gated graph" for m in methods], "gated graphs", progress))
    end = ("end_of_denoising",)
    jobs = _samples(GraphSource(files), inputs, "reference", end)
    for method, source, quantizers in zip(methods, gated, plans):
        for i, q in enumerate(quantizers):
            jobs += _samples(source, inputs, f"sensitivity {method.value} {q.site}", end, mask_of(quantizers, i))
    results = run_jobs(cluster, jobs, stats, inputs, None, "sensitivity", progress)
    n = inputs.samples
    reference = _gathered(results[:n])[0]["end_of_denoising"]
    out, at = [], n
    for method, quantizers in zip(methods, plans):
        for q in quantizers:
            latents, implementation, _ = _gathered(results[at:at + n])
            out.append(SiteSensitivity(method.value, q.site, q.role, q.block,
                                       sqnr_db(reference, latents["end_of_denoising"]), implementation))
            at += n
    return out


def diff_graphs(cluster, candidate: Path, reference: Path, inputs: EvaluationInputs,
                feeds: dict[str, np.ndarray] | None, provider: str | None,
                progress: bool) -> tuple[dict[str, Comparison], dict[str, str], str]:
    """`hn_export.diff.compare_outputs` on the cluster: each graph's single call(s) and, with steps, each sample's
    final latents as tasks. Returns the comparisons, what ran each graph, and the candidate's provider."""
    outputs = () if feeds is not None else ("single_call",)
    outputs += ("end_of_denoising",) if inputs.config.steps > 0 else ()
    graphs = {"reference": GraphSource(cluster.ship_model(reference)),
              "candidate": GraphSource(cluster.ship_model(candidate))}
    jobs: list[Job] = []
    for name, source in graphs.items():
        if feeds is not None:
            jobs.append(Job(source, SampleRequest(feeds=feeds), f"diff {name} call"))
        if outputs:
            jobs += _samples(source, inputs, f"diff {name}", outputs)
    results = run_jobs(cluster, jobs, None, inputs, provider, "diff", progress)
    half = len(jobs) // 2
    ref, cand = (_gathered(results[:half]), _gathered(results[half:]))
    comparisons = {key: Comparison.of(ref[0][key], cand[0][key]) for key in OUTPUTS if key in ref[0]}
    return comparisons, {"candidate": cand[1], "reference": ref[1]}, results[-1].provider

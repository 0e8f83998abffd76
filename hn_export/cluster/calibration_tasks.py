"""Calibration as a map-reduce on the cluster: one task per shard (a denoising trajectory, a ``--calib`` batch) runs
`hn_export.calibration.ShardCalibrator` on the node's copy of the model and returns the shard's per-site reductions
(`ShardStats`: channel maxima, the float64 Gram sums when GPTQ asked for them, the token rows when ``--alpha auto``
did: each call's rows are chosen by its own seeded key, so they do not depend on the node); the driver reduces them in
shard order (`hn_export.calibration.reduce_shards`), so the statistics do not depend on which task finished first."""

from __future__ import annotations

from hn_export.calibration import CalibrationShard, HessianRequest, SampleRequest, ShardCalibrator
from hn_export.cluster.node_files import FileSet, materialize
from hn_export.cluster.tasks import TaskFault, TaskOutput, check_fault, node_id
from hn_export.denoise import DenoiseConfig

KIND = "calibration"


def calibration_task(files: FileSet, config: DenoiseConfig, shard: CalibrationShard,
                     hessians: HessianRequest | None, threads: int, fault: TaskFault | None,
                     samples: SampleRequest | None = None) -> TaskOutput:
    """One shard's reductions, on the node's copy of the model."""
    from hn_export.graph_import import load_graph

    check_fault(fault, KIND, shard.index)
    path, fetched = materialize(files)
    with ShardCalibrator(load_graph(path), config, hessians, threads, samples) as calibrator:
        stats = calibrator.run(shard)
    return TaskOutput(stats, node_id(), fetched)


def submit(remote, files: FileSet, config: DenoiseConfig, shards: list[CalibrationShard],
           hessians: HessianRequest | None, threads: int,
           samples: SampleRequest | None = None) -> tuple[list, list[str]]:
    """The shards' tasks (`remote`: `calibration_task` as a Ray remote function) and their labels."""
    import ray

    fault = TaskFault.from_env()
    config_ref, hessians_ref, samples_ref = ray.put(config), ray.put(hessians), ray.put(samples)
    refs = [remote.remote(files, config_ref, shard, hessians_ref, threads, fault, samples_ref) for shard in shards]
    return refs, [f"calibration {shard.label}" for shard in shards]


"""A `hn_export.calibration.ShardMap` that runs a cluster's calibration shards on this machine: the map-reduce
without Ray (the reduction must not depend on how the calls are split, nor on the order the shards finish)."""

from __future__ import annotations

from hn_export.calibration import ShardCalibrator
from hn_export.graph_import import load_graph


class LocalShards:
    """Runs the shards (one per trajectory) here, last first, and returns them in shard order."""

    def calibration_shards(self, model_path, config, shards, hessians, progress, samples=None):
        with ShardCalibrator(load_graph(model_path), config, hessians, samples=samples) as calibrator:
            done = {shard.index: calibrator.run(shard) for shard in reversed(shards)}
        return iter([done[shard.index] for shard in shards])

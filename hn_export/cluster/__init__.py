"""The same commands on a Ray cluster (``--ray ADDRESS``): calibration as a map-reduce, compare / sensitivity / diff
grids as tasks.

Nothing here imports ray at module level: `ray` is an optional extra (``pip install -e '.[cluster]'``) imported only
once a command is given ``--ray``.

- `address`: what ``--ray`` takes (``HOST:PORT``, ``auto``, ``local``), checked before any work.
- `ray_session.Cluster`: connects (or starts a local cluster), ships each model once per node, runs the tasks.
- `node_files`: the files a task reads on its node: shipped through Ray's object store in chunks (fetched by the
  first task on a node, reused by the others) or read from a shared path; graphs built on a node (a quantized
  grid point, a gated sensitivity graph) are built once per node.
- `tasks`: submitting tasks with retries, gathering their results in submission order, one-line failures.
- `calibration_tasks`: one calibration shard (a trajectory, a ``--calib`` batch) per task
  (`hn_export.calibration.ShardCalibrator`), reduced by the driver in shard order.
- `grid_tasks`: one task per graph x sample of compare, sensitivity and diff, gathered in sample order.
"""

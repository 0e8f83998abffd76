"""The connection to a Ray cluster for one command (``--ray ADDRESS``) and the work it runs there.

`Cluster` is a context manager: ``ray.init`` on entry (connecting to ``HOST:PORT`` / ``auto``, or starting a
cluster on this machine for ``local``), and on exit every node's files of the run removed and ``ray.shutdown``.
Models are shipped once per run and path (`ship_model`), fetched once per node (`hn_export.cluster.node_files`);
`transfers` counts, per node, the tasks that fetched one. Each task takes `task_cpus` CPUs of its node (its
onnxruntime session gets as many threads for calibration).

The nodes must run the same hn-export, onnxruntime and (for byte-identical results) the same CPU kind and kernel
library build as each other: a trajectory computed on another instruction set can differ in the last bits.
"""

from __future__ import annotations

import collections
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hn_export.calibration import CalibrationShard, HessianRequest, SampleRequest, ShardStats
from hn_export.cluster import calibration_tasks, grid_tasks, tasks
from hn_export.cluster.address import ClusterAddress
from hn_export.cluster.node_files import CHUNK_BYTES, FileSet, cleanup, ship
from hn_export.denoise import DenoiseConfig
from hn_export.errors import UserError
from hn_export.model_files import input_files, load_model

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


class Cluster:
    def __init__(self, address: ClusterAddress, shared_files: bool = False, task_cpus: int = 1,
                 local_cpus: int | None = None, chunk_bytes: int = CHUNK_BYTES):
        self.address, self.shared_files, self.task_cpus = address, shared_files, task_cpus
        self.local_cpus, self.chunk_bytes = local_cpus, chunk_bytes
        self.transfers: collections.Counter[str] = collections.Counter()
        self._shipped: dict[Path, FileSet] = {}
        self._ray: Any = None

    # -- connection ---------------------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        try:
            import ray
        except ImportError:
            raise UserError("--ray needs the ray package, which is not installed",
                            "pip install -e '.[cluster]' (or pip install 'ray>=2.9')") from None
        if not self.address.starts_cluster and self.address.text != "auto":
            self._reachable()
        options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
        if self.address.starts_cluster:  # this machine only: every address on the loopback
            options.update(num_cpus=self.local_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
        else:
            options["address"] = self.address.init_address
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(**options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot connect to the Ray cluster at {self.address.text}: {_first_line(exc)}",
                            "start one with `ray start --head`, check --ray, or pass --ray local") from None
        finally:
            if sigterm is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)  # ray.init sets its own: keep the CLI's (clean unwind)
        self._ray = ray
        largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
        if largest < self.task_cpus:
            self.__exit__(None, None, None)
            raise UserError(f"--ray-task-cpus {self.task_cpus}: no node of the cluster has that many CPUs (the "
                            f"largest has {largest:g})", "lower --ray-task-cpus")
        logger.info("ray cluster %s: %s", self.address.text, ray.cluster_resources())
        return self

    def _reachable(self) -> None:
        """HOST:PORT answers (ray.init would wait minutes for an address nobody listens on)."""
        host, _, port = self.address.text.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise UserError(f"cannot connect to the Ray cluster at {self.address.text}: {exc.strerror or exc}",
                            "start its head with `ray start --head --port PORT`, check --ray, or pass --ray "
                            "local") from None

    def __exit__(self, *exc) -> None:
        ray, self._ray = self._ray, None
        if ray is None:
            return
        try:
            self._cleanup_nodes(ray)
        finally:
            self._shipped.clear()
            ray.shutdown()

    def _cleanup_nodes(self, ray) -> None:
        """Remove this run's node folders (shipped models, built graphs) on every node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0, max_retries=0)(cleanup)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
                for node in ray.nodes() if node["Alive"]]
        try:
            ray.get(refs, timeout=60)
        except Exception as exc:  # a node gone meanwhile: its folder goes with its temporary directory
            logger.warning("could not clean every node's hn-export folder: %s", _first_line(exc))

    # -- files and tasks ----------------------------------------------------------------------------------------
    def ship_model(self, path: Path) -> FileSet:
        """`path` and its external data files, shipped once per run."""
        return self._ship(path, input_files(load_model(path, any_opset=True)))

    def ship_file(self, path: Path) -> FileSet:
        return self._ship(path, ())

    def _ship(self, path: Path, files: Sequence[Path]) -> FileSet:
        key = Path(path).resolve()
        if key not in self._shipped:
            self._shipped[key] = ship(f"files-{len(self._shipped)}", key, tuple(files), self.shared_files,
                                      self.chunk_bytes)
        return self._shipped[key]

    def remote(self, function: Callable) -> Any:
        return tasks.remote(function, self.task_cpus)

    def gather(self, refs: Sequence[Any], labels: Sequence[str], desc: str, progress: bool) -> Iterator[Any]:
        def count(output: tasks.TaskOutput) -> None:
            self.transfers[output.node] += int(output.fetched)

        return tasks.gather(refs, labels, count, desc, progress)

    # -- the work -----------------------------------------------------------------------------------------------
    def calibration_shards(self, model_path: Path, config: DenoiseConfig, shards: list[CalibrationShard],
                           hessians: HessianRequest | None, progress: bool,
                           samples: SampleRequest | None = None) -> Iterator[ShardStats]:
        """`hn_export.calibration.ShardMap`: one task per shard, results in shard order."""
        files = self.ship_model(model_path)
        refs, labels = calibration_tasks.submit(self.remote(calibration_tasks.calibration_task), files, config,
                                                shards, hessians, self.task_cpus, samples)
        return self.gather(refs, labels, "calibrating", progress)

    def compare(self, *args) -> list:
        """`hn_export.compare.run_compare`'s grid as tasks (`grid_tasks.compare_grid`)."""
        return grid_tasks.compare_grid(self, *args)

    def sensitivity(self, *args) -> list:
        """`hn_export.sensitivity.run_sensitivity`'s runs as tasks (`grid_tasks.sensitivity_grid`)."""
        return grid_tasks.sensitivity_grid(self, *args)

    def diff(self, *args):
        """`hn-export diff`'s outputs as tasks (`grid_tasks.diff_graphs`)."""
        return grid_tasks.diff_graphs(self, *args)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""A Ray cluster on the loopback for the cluster tests: a head and two worker nodes of one CPU each, started with
`ray start --block` (so that each node's processes are ours, stopped by signalling the process that started them,
never by `ray stop`, which would stop every Ray on the machine), in their own temporary folder, on free ports.

The nodes listen on 127.0.0.2 (still the loopback): Ray resolves 127.0.0.1 and localhost to the machine's outward
address, which a test must not use."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.2"
WORKERS = 2
AUTH = "RAY_AUTH_MODE"  # no token on this test-only loopback cluster (Ray 2.5x's `ray start` may ask for one)


def free_port() -> int:
    """A free TCP port above Ray's worker port range (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port > 20000:
            return port


def _agent_ports() -> list[str]:
    return [arg for option in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                               "--runtime-env-agent-port") for arg in (option, str(free_port()))]


def _ray(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    ray = Path(sys.executable).with_name("ray")
    return subprocess.Popen([str(ray), "start", "--block", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            cwd=ROOT, env=env, start_new_session=True)


@contextlib.contextmanager
def loopback_cluster(timeout: float = 60.0) -> Iterator[str]:
    """Start the cluster; yields its address (``HOST:PORT``); stops every node it started on exit."""
    import ray

    auth = os.environ.get(AUTH)
    folder = Path(tempfile.mkdtemp(prefix="hnray", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0", AUTH: "disabled"}
    common = ["--node-ip-address", HOST, "--num-cpus", "1", "--disable-usage-stats",
              "--object-store-memory", str(200 << 20)]
    port = free_port()
    address = f"{HOST}:{port}"
    nodes = [_ray(["--head", "--port", str(port), "--temp-dir", str(folder), "--include-dashboard", "false",
                   *common, *_agent_ports()], folder / "head.log", env)]
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or nodes[0].poll() is not None:
                    raise RuntimeError(f"the Ray head did not start: {(folder / 'head.log').read_text()[-2000:]}")
                time.sleep(0.2)
        os.environ[AUTH] = "disabled"  # the driver too (restored on exit)
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        try:
            for i in range(WORKERS):  # one at a time, each on its own agent ports: nodes starting together collide
                log = folder / f"worker{i}.log"
                nodes.append(_ray(["--address", address, *common, *_agent_ports()], log, env))
                while len([n for n in ray.nodes() if n["Alive"]]) < 2 + i:
                    if time.monotonic() > deadline or nodes[-1].poll() is not None:
                        raise RuntimeError(f"Ray worker node {i} did not join: {log.read_text()[-1500:]}")
                    time.sleep(0.2)
        finally:
            ray.shutdown()
        yield address
    finally:
        if auth is None:
            os.environ.pop(AUTH, None)
        else:
            os.environ[AUTH] = auth
        for node in nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(folder, ignore_errors=True)

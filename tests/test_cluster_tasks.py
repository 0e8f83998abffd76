"""``--ray`` on a real cluster: a head and two worker nodes started on the loopback (`tests.ray_cluster`).

* calibration as a map-reduce (one task per trajectory) writes the same model, byte for byte, as the local run;
  the model (with external data, shipped in many chunks) travels once per node; GPTQ's float64 Gram sums agree to
  1e-12 relative and the model's integer codes are identical;
* a worker killed during calibration (the test hook ends the first attempt of a shard's task) is retried and the
  model is unchanged; a task that cannot finish is one ``error:`` line naming it, exit 2, nothing written;
* compare, sensitivity and diff gather the same JSON, tables and plots as the local run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_passes.linears import find_activation_sites
from graph_passes.methods import TransformOptions
from graph_passes.quantization import OutputFormat, QuantConfig, WeightRange
from hn_export.calibration import HessianRequest, calibrate
from hn_export.cluster.address import parse_address
from hn_export.cluster.ray_session import Cluster
from hn_export.cluster.tasks import FAULT_ENV, TASK_RETRIES
from hn_export.denoise import DenoiseConfig
from hn_export.families import selection_for
from hn_export.graph_import import load_graph
from hn_export.quantize_job import QuantizeJob, run_quantize
from tests.cli_runner import run_cli
from tests.ray_cluster import WORKERS, loopback_cluster

pytest.importorskip("ray")

CALIB = ["--calib-samples", "4", "--calib-steps", "3", "--no-progress"]
CONFIG = DenoiseConfig(samples=4, steps=3)
CHUNK = 16 << 10


@pytest.fixture(scope="module")
def cluster_address() -> str:
    with loopback_cluster() as address:
        yield address


def quantize(model: Path, out: Path, *extra) -> None:
    assert run_cli([str(model), "--w4a4", *CALIB, "-o", str(out), *map(str, extra)]) == 0


@pytest.fixture(scope="module")
def local_run(tiny_onnx, tmp_path_factory) -> Path:
    """The local run's model and statistics (local.onnx, local.npz)."""
    folder = tmp_path_factory.mktemp("local")
    quantize(tiny_onnx, folder / "local.onnx", "--save-stats", folder / "local.npz")
    return folder


def test_calibration_on_the_cluster_writes_the_same_model(tiny_onnx, tmp_path, local_run, cluster_address):
    quantize(tiny_onnx, tmp_path / "ray.onnx", "--save-stats", tmp_path / "ray.npz", "--ray", cluster_address)
    assert (tmp_path / "ray.onnx").read_bytes() == (local_run / "local.onnx").read_bytes()
    with np.load(local_run / "local.npz") as local, np.load(tmp_path / "ray.npz") as ray:
        assert sorted(local.files) == sorted(ray.files) and len(local.files) > 10
        for key in local.files:
            assert np.array_equal(local[key], ray[key]), key


def test_external_data_model_travels_once_per_node(tiny_onnx, tmp_path, cluster_address):
    """The model with its weights in an external data file, shipped in 16 KiB chunks (a 2 GB+ file goes the same
    way, 256 MiB a chunk): the same statistics, each node fetches it at most once, for 4 tasks on 3 nodes."""
    path = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(tiny_onnx), path, save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 32 * CHUNK
    local = calibrate(path, CONFIG, progress=False)
    with Cluster(parse_address(cluster_address), chunk_bytes=CHUNK) as cluster:
        distributed = calibrate(path, CONFIG, progress=False, cluster=cluster)
        transfers = dict(cluster.transfers)
    assert len(transfers) == 1 + WORKERS and set(transfers.values()) == {1}, transfers  # 4 tasks, 3 fetches
    assert distributed.calls == local.calls == 12 and distributed.model_hash == local.model_hash
    assert local.sites.keys() == distributed.sites.keys()
    for name, stats in local.sites.items():
        assert np.array_equal(stats.absmax, distributed.sites[name].absmax), name
        assert np.array_equal(stats.centered_absmax, distributed.sites[name].centered_absmax), name


def test_gptq_hessians_agree_and_codes_are_identical(tiny_onnx, tmp_path, cluster_address):
    """Float sums are grouped per trajectory on the cluster (one group locally): within 1e-12 relative; the GPTQ
    codes quantized from them are the same."""
    model = load_graph(tiny_onnx)
    hessians = HessianRequest.of(find_activation_sites(model, selection_for(model)))
    config = DenoiseConfig(samples=3, steps=2)
    local = calibrate(tiny_onnx, config, progress=False, hessians=hessians)
    with Cluster(parse_address(cluster_address)) as cluster:
        distributed = calibrate(tiny_onnx, config, progress=False, hessians=hessians, cluster=cluster)
    grams = [name for name, s in local.sites.items() if getattr(s, "gram", None) is not None]
    assert grams
    for name in grams:
        a, b = local.sites[name].gram, distributed.sites[name].gram
        assert a.tokens == b.tokens
        for x, y in ((a.centered, b.centered), (a.raw(), b.raw())):
            assert np.abs(x - y).max() <= 1e-12 * np.abs(x).max(), name
    quant = QuantConfig(4, 4, format=OutputFormat.NBITS, weight_range=WeightRange.GPTQ)
    codes = []
    for name, stats in (("local", local), ("ray", distributed)):
        run_quantize(QuantizeJob(tiny_onnx, tmp_path / f"{name}.onnx", TransformOptions(), quant, stats=stats,
                                 progress=False))
        codes.append({t.name: t.raw_data for t in onnx.load(tmp_path / f"{name}.onnx").graph.initializer
                      if t.data_type == onnx.TensorProto.UINT8})
    assert codes[0] and codes[0] == codes[1]


def test_killed_worker_is_retried_and_the_model_unchanged(tiny_onnx, tmp_path, local_run, cluster_address,
                                                          monkeypatch):
    monkeypatch.setenv(FAULT_ENV, f"calibration:2:1:{tmp_path / 'attempts'}")
    quantize(tiny_onnx, tmp_path / "ray.onnx", "--ray", cluster_address)
    assert [p.name for p in (tmp_path / "attempts").iterdir()] == ["calibration-2-0"]  # one worker was killed
    assert (tmp_path / "ray.onnx").read_bytes() == (local_run / "local.onnx").read_bytes()


def test_task_that_cannot_finish_is_one_line(hn_cli, tiny_onnx, tmp_path, cluster_address, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, f"calibration:1:99:{tmp_path / 'attempts'}")
    result = hn_cli(tiny_onnx, "--w4a4", "--calib-samples", "2", "--calib-steps", "1", "--no-progress", "-o",
                    tmp_path / "ray.onnx", "--ray", cluster_address)
    assert result.exit_code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    assert lines[0].startswith(f"error: cluster task calibration trajectory 1 failed after {TASK_RETRIES + 1} "
                               "attempts: "), lines[0]
    assert len(list((tmp_path / "attempts").iterdir())) == TASK_RETRIES + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attempts"]  # nothing written


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_compare_on_the_cluster_equals_the_local_run(hn_cli, tiny_onnx, tmp_path, cluster_address):
    args = ["compare", tiny_onnx, "--methods", "none,hadanorm", "--bits", "w4a4", "--steps", "3", "--samples", "2",
            "--calib-samples", "2", "--calib-steps", "3", "--no-progress"]
    for name, extra in (("local", []), ("ray", ["--ray", cluster_address])):
        result = hn_cli(*args, "--out", tmp_path / name, *extra)
        assert result.exit_code == 0, result.err
    _same_files(tmp_path / "local", tmp_path / "ray", ["results.json", "table.md", "sqnr.png"])


def test_sensitivity_and_diff_on_the_cluster_equal_the_local_run(hn_cli, tiny_onnx, tmp_path, local_run,
                                                                  cluster_address):
    for name, extra in (("local", []), ("ray", ["--ray", cluster_address])):
        result = hn_cli("sensitivity", tiny_onnx, "--methods", "none", "--steps", "1", "--samples", "1",
                        "--no-progress", "--out", tmp_path / name, *extra)
        assert result.exit_code == 0, result.err
        result = hn_cli("diff", local_run / "local.onnx", tiny_onnx, "--steps", "1", "--samples", "2",
                        "--json", tmp_path / f"{name}.json", *extra)
        assert result.exit_code == 0, result.err
    _same_files(tmp_path / "local", tmp_path / "ray", ["sensitivity.json", "sensitivity.png"])
    assert (tmp_path / "local.json").read_bytes() == (tmp_path / "ray.json").read_bytes()

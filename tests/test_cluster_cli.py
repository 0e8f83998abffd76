"""``--ray`` without a cluster: the option on every command, its checks before any work, the calibration's
map-reduce on this machine (split shards reduce like one), and that nothing imports ray without ``--ray``."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graph_passes.gptq import ActivationGram
from graph_passes.linears import find_activation_sites
from hn_export.calibration import HessianRequest, ShardStats, calibrate, reduce_shards
from hn_export.cli import cli
from hn_export.cluster.address import parse_address
from hn_export.denoise import DenoiseConfig
from hn_export.errors import UserError
from hn_export.families import selection_for
from hn_export.graph_import import load_graph
from tests.local_shards import LocalShards

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("quantize", "compare", "sensitivity", "diff", "bundle")


@pytest.mark.parametrize("text,parsed", [("local", "local"), ("AUTO", "auto"), ("10.0.0.5:6379", "10.0.0.5:6379"),
                                         ("head.example:6379", "head.example:6379"), ("[::1]:6379", "[::1]:6379")])
def test_addresses(text, parsed):
    assert parse_address(text).text == parsed
    assert parse_address(text).init_address == (None if parsed == "local" else parsed)


@pytest.mark.parametrize("text", ["", "head", "head:", ":6379", "head:port", "head:70000", "a b:1"])
def test_bad_address_is_refused(text):
    with pytest.raises(UserError, match="is not a cluster address; pass HOST:PORT"):
        parse_address(text)


def test_every_command_takes_the_same_ray_options():
    options = ("--ray", "--ray-shared-files", "--ray-task-cpus")
    seen = []
    for name in COMMANDS:
        params = {p.opts[0]: p for p in cli.commands[name].params}
        seen.append([(params[o].help, params[o].default, params[o].is_flag) for o in options])
    assert all(s == seen[0] for s in seen) and seen[0][0][0].startswith("Run on a Ray cluster")


def _one_line(result, start: str) -> None:
    assert result.exit_code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), result.err


def test_bad_ray_options_fail_before_any_work(hn_cli, tiny_onnx, tmp_path):
    out = tmp_path / "q.onnx"
    _one_line(hn_cli(tiny_onnx, "--w4a4", "--ray", "nowhere", "-o", out), "error: --ray 'nowhere' is not a cluster")
    _one_line(hn_cli(tiny_onnx, "--w4a4", "--ray-task-cpus", "2", "-o", out),
              "error: --ray-shared-files / --ray-task-cpus apply to a Ray cluster; add --ray ADDRESS")
    _one_line(hn_cli("compare", tiny_onnx, "--ray", "local", "--keep-models", tmp_path / "kept", "--out",
                     tmp_path / "cmp"), "error: --keep-models with --ray")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_cluster_is_one_line(hn_cli, tiny_onnx, tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    result = hn_cli(tiny_onnx, "--w4a4", "--ray", f"127.0.0.2:{port}", "-o", tmp_path / "q.onnx", "--no-progress")
    _one_line(result, f"error: cannot connect to the Ray cluster at 127.0.0.2:{port}: ")
    assert list(tmp_path.iterdir()) == []


BLOCKED = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'ray':
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
from hn_export.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not [m for m in sys.modules if m.split('.')[0] == 'ray'], 'ray was imported'
    raise
"""


def _blocked(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_without_ray_nothing_imports_ray(tiny_onnx, tmp_path):
    """ray is an optional extra: with it unimportable, quantizing works and ``--ray`` is one line naming the fix."""
    proc = _blocked(tiny_onnx, "--w4a4", "--calib-samples", "1", "--calib-steps", "2", "--no-progress", "-o",
                    tmp_path / "q.onnx")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "q.onnx").is_file()
    proc = _blocked(tiny_onnx, "--w4a4", "--ray", "local", "--no-progress", "-o", tmp_path / "r.onnx")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --ray needs the ray package, which is not installed; pip install -e "
                                   "'.[cluster]' (or pip install 'ray>=2.9')")
    assert not (tmp_path / "r.onnx").exists()


# ---- the map-reduce on this machine ---------------------------------------------------------------------------

def test_split_shards_reduce_like_one_shard(tiny_onnx):
    model = load_graph(tiny_onnx)
    hessians = HessianRequest.of(find_activation_sites(model, selection_for(model)))
    config = DenoiseConfig(samples=3, steps=2)
    one = calibrate(tiny_onnx, config, progress=False, hessians=hessians)
    split = calibrate(tiny_onnx, config, progress=False, hessians=hessians, cluster=LocalShards())
    assert one.calls == split.calls == 6 and one.sites.keys() == split.sites.keys()
    for name, stats in one.sites.items():
        other = split.sites[name]
        assert np.array_equal(stats.absmax, other.absmax) and np.array_equal(stats.centered_absmax,
                                                                             other.centered_absmax), name
        if getattr(stats, "gram", None) is not None:
            assert stats.gram.tokens == other.gram.tokens
            assert np.abs(stats.gram.raw() - other.gram.raw()).max() <= 1e-12 * np.abs(stats.gram.raw()).max()


def _call(rng: np.random.Generator, d: int) -> dict[str, np.ndarray]:
    """One call's outputs for activation x [2, 5, d] (as the calibration graph returns them)."""
    x = rng.standard_normal((2, 5, d)).astype(np.float32) + rng.standard_normal(d).astype(np.float32)
    mean = x.mean(axis=1, keepdims=True)
    centered = (x - mean).reshape(-1, d)
    return {"p.absmax": np.abs(x).reshape(-1, d).max(0), "p.centered_absmax": np.abs(centered).max(0),
            "p.gram": centered.T @ centered, "p.mean": mean[None], "p.shape": np.array([1, 2, 5, d]),
            "p.patch:w|conv": np.ones((3, 3), np.float32)}


@pytest.mark.parametrize("cuts", [(1, 2), (3,), (2, 5, 9), (5,)], ids=str)
def test_merge_of_shards_equals_one_accumulation(cuts):
    """Maxima bit for bit and the Gram sums within 1e-12, whichever calls each shard holds: mean rows still
    listed, rows collapsed into the dense sum inside a shard (more rows than the width) or only when merged."""
    d, rng = 8, np.random.default_rng(0)
    calls = [_call(rng, d) for _ in range(12)]  # 2 mean rows a call: 24 rows > d
    owners = {"p": "x"}
    whole = ShardStats()
    for outputs in calls:
        whole.add(outputs, owners)
    shards = []
    for start, end in zip((0, *cuts), (*cuts, len(calls))):
        shard = ShardStats()
        for outputs in calls[start:end]:
            shard.add(outputs, owners)
        shards.append(shard)
    merged = reduce_shards(shards)
    assert merged.calls == 12
    for stat in ("absmax", "centered_absmax"):
        assert np.array_equal(merged.values["x"][stat], whole.values["x"][stat])
    a, b = whole.grams["x"], merged.grams["x"]
    assert isinstance(b, ActivationGram) and a.tokens == b.tokens == 120
    for x, y in ((a.centered, b.centered), (a.raw(), b.raw()), (a.patches["w|conv"], b.patches["w|conv"])):
        assert np.abs(x - y).max() <= 1e-12 * np.abs(x).max()

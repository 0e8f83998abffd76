"""Calibration: per-channel activation statistics of every linear's input, from the FP graph in onnxruntime.

Shapes: an activation ``X`` read by a linear may have any rank. Channels are the last axis; every other axis indexes
tokens. The hadanorm ops center over axis -2, separately for each index ``l`` of the axes before it, so the
statistics do the same: for ``X`` of shape ``[..., N, d]`` with leading index ``l``

    absmax_j          = max_{l,n} |X_lnj|
    centered_absmax_j = max_{l,n} |X_lnj - mean_n X_lnj|     (the mean over axis -2 per leading index, as centering does)

A rank-3 input ``[B, N, d]`` is centered per batch element; a rank-2 input ``[T, d]`` (e.g. a MatMul on ``[B, d]``)
has its tokens on axis 0 and is centered over them; a rank-1 input ``[d]`` is one token (centered statistic 0).
A convolution's input ``[B, C, H, W]`` is first viewed as its tokens ``[B, H*W, C]`` (the pixels, as the conv sites
are transformed: `graph_passes.conv_sites`). In the graph the input is viewed as ``[1, ..., N, d]`` (one Unsqueeze, so no rank is special-cased) and flattened
to ``[tokens, d]`` for the max. The reductions run inside onnxruntime, so only ``d``-sized vectors leave the
session per call (the full model has 196 sites; activations are never held); the host takes the max over calls.

Hessians for GPTQ (``--weight-range gptq``, `graph_passes.gptq`; only when asked, for the job's sites): per activation
the same run also returns its centered Gram ``sum_{l,n} (x_ln - mu_l)(x_ln - mu_l)^T`` ([d, d] float32, one Gemm on
the centered tokens computed for ``centered_absmax``), its means ``mu_l`` and its shape; per k x k conv of those
sites the Gram of its input's im2col patches (a depthwise one-hot Conv with the conv's pads, strides and dilations
unfolds them, rows ``c * taps + t``). The host sums them in float64 (`graph_passes.gptq.ActivationGram`): the
activations are still never held, but every call returns d x d floats per activation. Memory, the 28-block
PixArt-Sigma (141 distinct 1152-wide block activations: 5 per block + the caption all blocks share; 28 4608-wide
FFN-out ones): the float64 sums 141 x 1152^2 x 8 + 28 x 4608^2 x 8 = 1.50 + 4.76 = 6.25 GB, held until the
weights are planned (plus the mean rows: 2 x 1152 float64 per call and activation, dense d x d past d rows), and
each call's float32 Grams, 3.13 GB, alive while the host adds them.

Token samples for ``--alpha auto`` (`graph_passes.alpha_search`; only when asked, for the job's sites): per call and
activation, ``k`` rows of the flattened tokens ``[T, d]`` (``T`` = every index but the channel), gathered inside the
graph so only ``k x d`` floats leave the session, and for centering methods the same rows of the centered tokens
``x - mu_l``. Rows are stratified: row ``i`` is ``floor(f_i T)`` with ``f_i = (i + u_i) / k`` (clamped to ``T - 1``),
``u_i`` uniform from a generator seeded by (seed, trajectory, step) or (seed, ``--calib`` batch), fed as one graph
input per call; so the rows are distinct when ``k <= T`` and cover the batch, and the same seed picks the same rows
whichever shard or node runs the call. ``k = max(1, 256 // calls)`` (`SampleRequest.for_calls`): at most 256 rows per
activation when there are at most 256 calls (the default 40 calls: 6 rows each, 240), one per call beyond. Memory,
the 28-block PixArt-Sigma with a centering method (x and x - mu rows, float32): 240 x (141 x 1152 + 28 x 4608) x 4 x 2
= 560 MB, held until the alphas are chosen (a non-centering method: half).

A map-reduce: `ShardCalibrator` runs a shard of the calls (trajectories, or batches of the ``--calib`` file) and
returns its reductions (`ShardStats`), `reduce_shards` merges them in shard order. On this machine all calls are
one shard, summed call by call as ever; with ``--ray`` (`hn_export.cluster`) each trajectory (each batch) is a shard
run by a task on some node, reduced in shard order whatever order the tasks finish in. Maxima do not depend on the
grouping (the model is the same bytes); the float64 Gram sums are grouped per shard (measured: within 1e-12
relative of the local sums, the same GPTQ codes; `tests/test_cluster_tasks.py`).

Default inputs walk denoising trajectories of the FP graph itself (see `hn_export.denoise`); ``--calib FILE.npz``
supplies inputs instead. Statistics are saved with a hash of the model files, so a file made for another model is
refused. Files written before the per-channel ``mean`` was dropped (it was never used) still load; the mean is
ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graph_passes.alpha_search import TokenSample
from graph_passes.conv_sites import pixel_tokens
from graph_passes.gptq import ActivationGram, CalibratedStats, conv_key
from graph_passes.graph_utils import NodeSequence, add_initializer
from graph_passes.linears import ActivationSite, LinearLayer, SiteSelection, find_activation_sites
from graph_passes.site_transforms import SiteStats
from hn_export.denoise import (
    DenoiseConfig,
    ModelSignature,
    family_of,
    load_input_file,
    trajectory,
)
from hn_export.errors import UserError
from hn_export.input_arrays import call_rows
from hn_export.model_files import write_atomic
from hn_export.ort_models import open_session

logger = logging.getLogger(__name__)

ALL_LINEARS = SiteSelection(include=("",))
_STATS = ("absmax", "centered_absmax")
_DROPPED_STATS = ("mean",)  # written by older versions, never used: ignored on load


def model_hash(path: str | os.PathLike) -> str:
    """sha256 of the model file and its external data files (streamed)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] + sorted(p for p in path.parent.glob(path.name + ".data*"))
    for file in files:
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class CalibrationStats:
    model_hash: str
    sites: dict[str, SiteStats]  # keyed by activation tensor name
    calls: int
    source: str  # "trajectories(samples=..., steps=..., seed=...)" or "file:NAME"
    # token rows for --alpha auto (`SampleRequest`), keyed by activation tensor name; never saved
    samples: dict[str, TokenSample] = dataclasses.field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics (.npz) atomically (`hn_export.model_files.write_atomic`)."""
        arrays = {f"{name}/{key}": getattr(st, key) for name, st in sorted(self.sites.items()) for key in _STATS}
        meta = json.dumps({"model_hash": self.model_hash, "calls": self.calls, "source": self.source})
        buffer = io.BytesIO()
        np.savez(buffer, __meta__=np.array(meta), **arrays)
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike, expected_hash: str | None = None,
             sites: list[ActivationSite] | None = None) -> CalibrationStats:
        """Read a --save-stats file: its metadata, one finite, non-negative vector per statistic; with `sites`
        (the graph's activation sites), one entry of the site's width for every site's activation."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"calibration statistics file {path} does not exist", "check the path")
        not_stats = UserError(f"{path} is not a calibration statistics file written by hn-export",
                              "recalibrate with --save-stats")
        if not path.is_file():
            raise not_stats
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["__meta__"]))
                arrays = {key: np.asarray(data[key]) for key in data.files if key != "__meta__"}
        except Exception:
            raise not_stats from None
        if not (isinstance(meta, dict) and isinstance(meta.get("model_hash"), str)
                and isinstance(meta.get("calls"), int) and isinstance(meta.get("source"), str)):
            raise UserError(f"calibration statistics {path}: broken __meta__ (model_hash, calls, source)",
                            "recalibrate with --save-stats")
        found: dict[str, dict[str, np.ndarray]] = {}
        for key, array in arrays.items():
            name, _, stat = key.rpartition("/")  # tensor names may hold "/" too
            if stat in _DROPPED_STATS:
                continue
            if stat not in _STATS or not name:
                raise UserError(f"calibration statistics {path} hold an unknown entry {key!r}",
                                "recalibrate with --save-stats")
            if array.ndim != 1 or array.dtype.kind not in "fiu" or array.size == 0:
                raise UserError(f"calibration statistics {path}: {key} has shape {array.shape} and dtype "
                                f"{array.dtype}; each statistic is one float per channel",
                                "recalibrate with --save-stats")
            values = array.astype(np.float64)
            if not np.all(np.isfinite(values)) or np.any(values < 0):
                raise UserError(f"calibration statistics {path}: {key} holds a negative or non-finite value",
                                "recalibrate with --save-stats")
            found.setdefault(name, {})[stat] = values
        for name, values in found.items():
            missing = [stat for stat in _STATS if stat not in values]
            if missing:
                raise UserError(f"calibration statistics {path} lack {'/'.join(missing)} for activation {name}",
                                "recalibrate with --save-stats")
            if values["absmax"].shape != values["centered_absmax"].shape:
                raise UserError(f"calibration statistics {path}: the statistics of {name} differ in width",
                                "recalibrate with --save-stats")
        if expected_hash is not None and meta["model_hash"] != expected_hash:
            raise UserError(f"calibration statistics {path} were made for another model",
                            "recalibrate for this model (omit --stats, or pass --save-stats to keep them)")
        for site in sites or ():
            values = found.get(site.activation.name)
            if values is None:
                raise UserError(f"calibration statistics {path} have no entry for activation {site.activation.name} "
                                f"(site {site.name})", "recalibrate with --save-stats")
            if values["absmax"].shape != (site.width,):
                raise UserError(f"calibration statistics {path}: activation {site.activation.name} has "
                                f"{values['absmax'].size} channels, the graph {site.width}",
                                "recalibrate with --save-stats")
        return cls(meta["model_hash"], {n: SiteStats(**s) for n, s in found.items()}, meta["calls"], meta["source"])


@dataclasses.dataclass(frozen=True)
class HessianRequest:
    """Which Grams the calibration run collects for GPTQ: the activations of these sites, and their k x k convs'
    patch Grams (keys `graph_passes.gptq.conv_key`)."""

    activations: frozenset[str]
    convs: frozenset[str]

    @classmethod
    def of(cls, sites: Iterable[ActivationSite]) -> HessianRequest:
        sites = list(sites)
        return cls(frozenset(site.activation.name for site in sites),
                   frozenset(conv_key(lin.node.name, lin.weight.name) for site in sites for lin in site.linears
                             if lin.is_conv and not lin.is_pointwise))


SAMPLE_BUDGET = 256  # token rows per activation (at most, while calls <= budget: `SampleRequest.for_calls`)


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """Which token samples the calibration run collects for ``--alpha auto``: rows of these activations, also
    centered for those in `centered`, `per_call` rows per call (`for_calls` sets it from the run's call count)."""

    activations: frozenset[str]
    centered: frozenset[str]
    per_call: int = 1
    budget: int = SAMPLE_BUDGET

    @classmethod
    def of(cls, sites: Iterable[ActivationSite], center: bool) -> SampleRequest:
        """The samples of `sites`; `center`: the method centers (sites that can be centered also get x - mu)."""
        sites = list(sites)
        return cls(frozenset(site.activation.name for site in sites),
                   frozenset(site.activation.name for site in sites if center and site.can_center))

    def for_calls(self, calls: int) -> SampleRequest:
        return dataclasses.replace(self, per_call=max(1, self.budget // max(calls, 1)))

    def fractions(self, seed: int, *call: int) -> np.ndarray:
        """The row fractions ``(i + u_i) / k`` of one call (float32 [k]), keyed by the call (trajectory and step, or
        ``--calib`` batch): the same call gets the same rows in any shard."""
        u = np.random.default_rng([seed, *call]).random(self.per_call)
        return ((np.arange(self.per_call) + u) / self.per_call).astype(np.float32)


_GRAM, _MEAN, _SHAPE, _PATCH = "gram", "mean", "shape", "patch:"  # output suffixes of the Gram outputs
_ROWS, _CENTERED_ROWS = "rows", "centered_rows"  # output suffixes of the token samples
SAMPLE_INPUT = "hn_calib.sample_fractions"  # the graph input of the sample rows' fractions (float [k])


def _unfold_patches(graph: ir.Graph, seq: NodeSequence, x: ir.Value, conv: LinearLayer,
                    name: str) -> tuple[ir.Value, list[ir.Value]]:
    """The Gram of the im2col patches of a k x k conv's input x [B, C, H, W] (float): a depthwise Conv with one-hot
    kernels [C * taps, 1, kh, kw] (output channel ``c * taps + t`` = channel c at tap t, the row order of the
    quantized weight matrix), the conv's own pads / strides / dilations, then [pixels, C * taps] and ``P^T P``."""
    weight = conv.weight.const_value
    cin, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
    taps = kh * kw
    onehot = np.zeros((cin * taps, 1, kh, kw), dtype=np.float32)
    onehot.reshape(cin, taps, taps)[:, np.arange(taps), np.arange(taps)] = 1.0
    kernel = add_initializer(graph, f"{name}.onehot", onehot)
    rows = add_initializer(graph, f"{name}.rows", np.array([-1, cin * taps], dtype=np.int64))
    attrs = {key: attr.value for key, attr in conv.node.attributes.items()
             if key in ("pads", "strides", "dilations", "auto_pad")}
    unfolded = seq.op("Conv", [x, kernel], group=cin, kernel_shape=[kh, kw], **attrs)
    flat = pixel_tokens(seq, unfolded, rows)[0]
    return seq.op("Gemm", [flat, flat], transA=1), [kernel, rows]


def _add_stat_outputs(model: ir.Model, hessians: HessianRequest | None = None, samples: SampleRequest | None = None
                      ) -> tuple[dict[str, str], list[ir.Node], list[ir.Value]]:
    """Append the reductions of every linear input (and the Grams of `hessians`, the token rows of `samples`: one
    more graph input, `SAMPLE_INPUT`); returns output prefix -> activation name, and the nodes and initializers
    added (to take them out again). The session runs them in onnxruntime's priority-based order
    (`hn_export.ort_models.open_session`), which frees each activation once reduced."""
    graph = model.graph
    all_sites = find_activation_sites(model, ALL_LINEARS)
    activations = {site.activation.name: (site.activation, site.is_conv, site.width) for site in all_sites}
    convs: dict[str, list[LinearLayer]] = {}
    if hessians is not None:
        missing = sorted(hessians.activations - set(activations))
        if missing:
            raise ValueError(f"no linear reads activation {missing[0]}: cannot collect its Hessian")
        for site in all_sites:
            for lin in site.linears:
                if conv_key(lin.node.name, lin.weight.name) in hessians.convs:
                    convs.setdefault(site.activation.name, []).append(lin)
    if samples is not None:
        missing = sorted(samples.activations - set(activations))
        if missing:
            raise ValueError(f"no linear reads activation {missing[0]}: cannot sample its tokens")
    owners: dict[str, str] = {}
    seq = NodeSequence("hn_calib")
    first = add_initializer(graph, "hn_calib.axis0", np.array([0], dtype=np.int64))
    tokens = add_initializer(graph, "hn_calib.axis_tokens", np.array([-2], dtype=np.int64))
    added = [first, tokens]
    fractions = None
    if samples is not None:
        fractions = ir.Value(name=SAMPLE_INPUT, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None]))
        graph.inputs.append(fractions)
        one = add_initializer(graph, "hn_calib.one", np.array([1], dtype=np.int64))
        added.append(one)

    def sample_rows(flats: list[ir.Value]) -> list[ir.Value]:
        """The rows ``min(floor(f T), T - 1)`` of each [T, d] tensor of `flats` (all with the same T)."""
        count = seq.op("Shape", [flats[0]], start=0, end=1)  # [1]: T
        scaled = seq.op("Mul", [fractions, seq.op("Cast", [count], to=ir.DataType.FLOAT)])
        index = seq.op("Cast", [seq.op("Floor", [scaled])], to=ir.DataType.INT64)
        index = seq.op("Min", [index, seq.op("Sub", [count, one])])
        return [seq.op("Gather", [flat, index], axis=0) for flat in flats]

    def channel_absmax(value: ir.Value) -> ir.Value:
        """max |value| over every axis but the last: flatten to [tokens, d], reduce axis 0."""
        flat = seq.op("Flatten", [seq.op("Abs", [value])], axis=-1)
        return seq.op("ReduceMax", [flat, first], keepdims=0)

    def output(value: ir.Value, name: str, dtype: ir.DataType = ir.DataType.FLOAT) -> None:
        value.name = name
        value.type = ir.TensorType(dtype)
        graph.outputs.append(value)

    for i, (name, (x, is_conv, width)) in enumerate(activations.items()):
        image = x
        if is_conv:  # [B, C, H, W] -> [B, H*W, C]
            pixels = add_initializer(graph, f"hn_calib.{i}.pixels", np.array([0, -1, width], dtype=np.int64))
            added.append(pixels)
            x = pixel_tokens(seq, x, pixels)[0]
        # [..., N, d] -> [1, ..., N, d]: rank >= 2 for every input, the same token axis -2 and leading indices
        xf = seq.op("Unsqueeze", [seq.op("Cast", [x], to=ir.DataType.FLOAT), first])
        mean_tok = seq.op("ReduceMean", [xf, tokens], keepdims=1)
        centered = seq.op("Sub", [xf, mean_tok])
        values = (channel_absmax(xf), channel_absmax(centered))
        for value, stat in zip(values, _STATS):
            output(value, f"hn_calib.{i}.{stat}")
        owners[f"hn_calib.{i}"] = name
        flat = None
        if samples is not None and name in samples.activations:
            flats = [seq.op("Flatten", [xf], axis=-1)]  # [tokens, d]
            if name in samples.centered:
                flat = seq.op("Flatten", [centered], axis=-1)
                flats.append(flat)
            for value, suffix in zip(sample_rows(flats), (_ROWS, _CENTERED_ROWS)):
                output(value, f"hn_calib.{i}.{suffix}")
        if hessians is None or name not in hessians.activations:
            continue
        flat = flat if flat is not None else seq.op("Flatten", [centered], axis=-1)  # [tokens, d]
        output(seq.op("Gemm", [flat, flat], transA=1), f"hn_calib.{i}.{_GRAM}")
        output(mean_tok, f"hn_calib.{i}.{_MEAN}")
        output(seq.op("Shape", [xf]), f"hn_calib.{i}.{_SHAPE}", ir.DataType.INT64)
        for j, conv in enumerate(convs.get(name, ())):
            image_f = seq.op("Cast", [image], to=ir.DataType.FLOAT)
            gram, inits = _unfold_patches(graph, seq, image_f, conv, f"hn_calib.{i}.{j}")
            added.extend(inits)
            output(gram, f"hn_calib.{i}.{_PATCH}{conv_key(conv.node.name, conv.weight.name)}")
    graph.extend(seq.nodes)
    return owners, seq.nodes, added


def _remove_stat_outputs(model: ir.Model, inputs: int, outputs: int, nodes: list[ir.Node],
                         initializers: list[ir.Value]) -> None:
    """Undo `_add_stat_outputs`: the graph is as it was loaded."""
    graph = model.graph
    del graph.outputs[outputs:]
    graph.remove(nodes, safe=True)
    del graph.inputs[inputs:]
    for init in initializers:
        graph.initializers.pop(init.name)


def npz_batches(path: Path, sig: ModelSignature, batch: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Calls from a user file, `batch` samples at a time (default: the graph's static batch, else 2)."""
    data = load_input_file(path, sig, "calibration input file")
    batched = sig.batched
    batch = batch or call_rows(sig)
    count = max((data[k].shape[0] for k in data if k in batched), default=1)
    for start in range(0, count, batch):
        yield {k: (v[start:start + batch] if k in batched else v).astype(sig.dtypes.get(k, v.dtype))
               for k, v in data.items()}


@dataclasses.dataclass(frozen=True)
class CalibrationShard:
    """One unit of the map step: seeded denoising trajectories (`samples`, the sample indices) or batches of a
    ``--calib`` file (`batches`, the feeds of each call). Shards are reduced in `index` order."""

    index: int
    samples: tuple[int, ...] = ()
    batches: tuple[dict[str, np.ndarray], ...] = ()

    def calls(self, config: DenoiseConfig) -> int:
        return len(self.samples) * config.steps + len(self.batches)

    @property
    def label(self) -> str:
        # split: shard i holds batch i alone; unsplit: shard 0 holds batches 0, 1, ...
        what, items = (("trajectory", self.samples) if self.samples
                       else ("--calib batch", range(self.index, self.index + len(self.batches))))
        return f"{what} {items[0]}" if len(items) == 1 else f"shard {self.index} ({len(items)} {what}s)"


def calibration_shards(config: DenoiseConfig, inputs: Path | None, sig: ModelSignature,
                       split: bool = False) -> list[CalibrationShard]:
    """The calibration's work: one shard holding every trajectory (or every batch of the ``--calib`` file), or with
    `split` one shard per trajectory (per batch), the map-reduce of `hn_export.cluster`."""
    if inputs is not None:
        batches = tuple(npz_batches(inputs, sig))
        if split:
            return [CalibrationShard(i, batches=(b,)) for i, b in enumerate(batches)]
        return [CalibrationShard(0, batches=batches)]
    if split:
        return [CalibrationShard(i, samples=(i,)) for i in range(config.samples)]
    return [CalibrationShard(0, samples=tuple(range(config.samples)))]


@dataclasses.dataclass
class ShardStats:
    """The per-site reductions of some calls (one shard, or several merged), keyed by activation name: the channel
    maxima (float64), for the Hessian request's activations the float64 Gram sums, and for the sample request's
    the token rows of each call (float32, in call order)."""

    values: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    grams: dict[str, ActivationGram] = dataclasses.field(default_factory=dict)
    calls: int = 0
    samples: dict[str, list[TokenSample]] = dataclasses.field(default_factory=dict)

    def add(self, outputs: dict[str, np.ndarray], owners: dict[str, str]) -> None:
        """One call's outputs (output prefix -> activation name: `owners`)."""
        self.calls += 1
        for prefix, name in owners.items():
            new = {stat: outputs[f"{prefix}.{stat}"].astype(np.float64) for stat in _STATS}
            if not all(np.all(np.isfinite(v)) for v in new.values()):
                raise _nonfinite(name)
            self._max(name, new)
            gram = outputs.get(f"{prefix}.{_GRAM}")
            if gram is not None:
                self._add_gram(prefix, name, gram, outputs)
            rows = outputs.get(f"{prefix}.{_ROWS}")
            if rows is not None:
                centered = outputs.get(f"{prefix}.{_CENTERED_ROWS}")
                if not (np.all(np.isfinite(rows)) and (centered is None or np.all(np.isfinite(centered)))):
                    raise _nonfinite(name)
                self.samples.setdefault(name, []).append(TokenSample(rows, centered))

    def _max(self, name: str, new: dict[str, np.ndarray]) -> None:
        old = self.values.get(name)
        if old is None:
            self.values[name] = {stat: new[stat].copy() for stat in _STATS}
        else:
            for stat in _STATS:
                np.maximum(old[stat], new[stat], out=old[stat])

    def _add_gram(self, prefix: str, name: str, gram: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """Sum one call's Gram outputs into float64 (`graph_passes.gptq.ActivationGram`), in place."""
        mean, shape = outputs[f"{prefix}.{_MEAN}"], outputs[f"{prefix}.{_SHAPE}"]
        patches = {key[len(prefix) + len(_PATCH) + 1:]: value for key, value in outputs.items()
                   if key.startswith(f"{prefix}.{_PATCH}")}
        if not (np.all(np.isfinite(gram)) and np.all(np.isfinite(mean))
                and all(np.all(np.isfinite(p)) for p in patches.values())):
            raise _nonfinite(name)
        acc = self.grams.get(name)
        if acc is None:
            acc = self.grams[name] = ActivationGram(gram.shape[0], np.zeros(gram.shape))
        acc.centered += gram  # float32 -> float64
        acc.add_means(mean.reshape(-1, gram.shape[0]) * np.sqrt(float(shape[-2])))
        acc.tokens += int(np.prod(shape[:-1]))
        _add_patches(acc, patches)

    def merge(self, later: ShardStats) -> ShardStats:
        """Fold the reductions of a later shard into these (in place; returns self): maxima are exact, so any
        grouping of the calls gives the same bits; the float64 Gram sums are added in this fixed order."""
        self.calls += later.calls
        for name, values in later.values.items():
            self._max(name, values)
        for name, rows in later.samples.items():  # the later shard's calls come after this one's
            self.samples.setdefault(name, []).extend(rows)
        for name, gram in later.grams.items():
            acc = self.grams.get(name)
            if acc is None:
                self.grams[name] = _writable(gram)  # a task's result arrives read-only (Ray's object store)
                continue
            acc.centered += gram.centered
            acc.tokens += gram.tokens
            for rows in gram.mean_rows:
                acc.add_means(rows)
            if gram.mean_dense is not None:
                if acc.mean_dense is None:
                    factor = acc.mean_factor()
                    acc.mean_dense, acc.mean_rows = factor.T @ factor, []
                acc.mean_dense += gram.mean_dense
            _add_patches(acc, gram.patches)
        return self

    def sites(self) -> dict[str, SiteStats]:
        return {name: SiteStats(**values) if name not in self.grams else
                CalibratedStats(**values, gram=self.grams[name]) for name, values in self.values.items()}

    def token_samples(self) -> dict[str, TokenSample]:
        """Each sampled activation's rows over all calls, in call order (float32)."""
        return {name: TokenSample.concatenate(parts) for name, parts in self.samples.items()}


def _nonfinite(name: str) -> UserError:
    return UserError(f"activation {name} became NaN or inf during calibration",
                     "check the model (an FP16 graph may overflow: calibrate the FP32 graph)")


def _writable(gram: ActivationGram) -> ActivationGram:
    """`gram` with arrays that can be added to: read-only ones copied (exactly), the others kept."""
    def own(a: np.ndarray | None) -> np.ndarray | None:
        return a if a is None or a.flags.writeable else a.copy()

    return dataclasses.replace(gram, centered=own(gram.centered), mean_rows=list(gram.mean_rows),
                               mean_dense=own(gram.mean_dense), patches={k: own(p) for k, p in gram.patches.items()})


def _add_patches(acc: ActivationGram, patches: dict[str, np.ndarray]) -> None:
    for key, patch in patches.items():
        if key in acc.patches:
            acc.patches[key] += patch
        else:
            acc.patches[key] = patch.astype(np.float64)  # a copy


def reduce_shards(results: Iterable[ShardStats]) -> ShardStats:
    """The reduce step: the shards' reductions merged in the order given (the shards' index order)."""
    total = ShardStats()
    for result in results:
        total.merge(result)
    return total


class ShardCalibrator:
    """The map step: the FP graph with the reductions of every linear input (and the Grams of `hessians`, the token
    rows of `samples`) in one onnxruntime session; `run` calibrates one shard. A context manager: the reductions are
    taken out of `model` again on exit."""

    def __init__(self, model: ir.Model, config: DenoiseConfig, hessians: HessianRequest | None = None,
                 threads: int | None = None, samples: SampleRequest | None = None):
        self.model, self.config, self.hessians, self.threads = model, config, hessians, threads
        self.samples = samples
        self.sig = ModelSignature.of(model)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ShardCalibrator:
        model = self.model
        inputs, outputs = len(model.graph.inputs), len(model.graph.outputs)
        self.output = model.graph.outputs[0].name
        self.owners, nodes, inits = _add_stat_outputs(model, self.hessians, self.samples)
        self._stack.callback(_remove_stat_outputs, model, inputs, outputs, nodes, inits)
        self.names = [value.name for value in model.graph.outputs[outputs:]]
        try:
            self.session = self._stack.enter_context(open_session(model, threads=self.threads, fuse_attention=True))
        except BaseException:
            self._stack.close()  # the caller's model without the reductions again
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.session = None
        self._stack.close()

    def run(self, shard: CalibrationShard, on_call: Callable[[], None] = lambda: None) -> ShardStats:
        stats = ShardStats()
        call: list[int] = []  # the current call's key: (0, trajectory, step) or (1, --calib batch)

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            if self.samples is not None:
                feeds = {**feeds, SAMPLE_INPUT: self.samples.fractions(self.config.seed, *call)}
            results = self.session.run([self.output, *self.names], feeds)
            stats.add(dict(zip(self.names, results[1:])), self.owners)
            on_call()
            if call[0] == 0:
                call[2] += 1
            return results[0]

        for j, feeds in enumerate(shard.batches):
            call[:] = [1, shard.index + j]  # batch i of the file is shard.index + j split or not
            run(feeds)
        for index in shard.samples:
            call[:] = [0, index, 0]
            for _ in trajectory(run, self.sig, self.config, index):
                pass
        return stats


def _local_shards(model: ir.Model, config: DenoiseConfig, shards: list[CalibrationShard],
                  hessians: HessianRequest | None, threads: int | None, progress: bool,
                  samples: SampleRequest | None = None) -> Iterator[ShardStats]:
    """The map step on this machine: every shard through one session, in order."""
    total = sum(shard.calls(config) for shard in shards)
    with ShardCalibrator(model, config, hessians, threads, samples) as calibrator, \
            tqdm(total=total, desc="calibrating", unit="call", disable=not progress) as bar:
        for shard in shards:
            yield calibrator.run(shard, lambda: bar.update(1))


class ShardMap(Protocol):
    """Runs calibration shards elsewhere (`hn_export.cluster.Cluster`): yields each shard's `ShardStats` in the
    order of `shards`, whatever order they finish in."""

    def calibration_shards(self, model_path: Path, config: DenoiseConfig, shards: list[CalibrationShard],
                           hessians: HessianRequest | None, progress: bool,
                           samples: SampleRequest | None = None) -> Iterator[ShardStats]: ...


def calibrate(
    model_path: Path,
    config: DenoiseConfig,
    inputs: Path | None = None,
    progress: bool = True,
    threads: int | None = None,
    model: ir.Model | None = None,
    hessians: HessianRequest | None = None,
    cluster: ShardMap | None = None,
    samples: SampleRequest | None = None,
) -> CalibrationStats:
    """Statistics of every linear input of the FP graph at `model_path`. `model`: that graph already loaded (the
    quantize job's); the reductions are added for the run and taken out again, so it comes back unchanged.
    `hessians`: also the Grams GPTQ needs (its activations' statistics are then `CalibratedStats`). `samples`: also
    token rows of these activations (``--alpha auto``; `CalibrationStats.samples`), `per_call` set from the calls.

    A map-reduce (`ShardCalibrator`, `reduce_shards`): on this machine all calls are one shard; with `cluster`
    (`hn_export.cluster`) each trajectory (each ``--calib`` batch) is a shard run by a task on the graph at
    `model_path`, and the shards are merged in index order, so the result does not depend on scheduling. The maxima
    are the same bits either way; the float64 Gram sums are grouped per shard (relative ~1e-16 apart)."""
    from hn_export.graph_import import load_graph

    model = model if model is not None else load_graph(model_path)
    sig = ModelSignature.of(model)
    if inputs is None:
        family_of(sig)  # trajectories need the model's family: fail before any work
    shards = calibration_shards(config, inputs, sig, split=cluster is not None)
    if samples is not None:
        samples = samples.for_calls(sum(shard.calls(config) for shard in shards))
    if cluster is None:
        results = _local_shards(model, config, shards, hessians, threads, progress, samples)
    else:
        results = cluster.calibration_shards(model_path, config, shards, hessians, progress, samples=samples)
    try:
        total = reduce_shards(results)
    finally:  # a failed reduce stops the map (its session, its queued tasks) at once
        getattr(results, "close", lambda: None)()
    source = f"file:{inputs.name}" if inputs is not None else \
        f"trajectories(samples={config.samples}, steps={config.steps}, seed={config.seed})"
    result = total.sites()
    grams = sum(g.nbytes for g in total.grams.values())
    rows = total.token_samples()
    sampled = sum(sample.nbytes for sample in rows.values())
    logger.info("calibrated %d sites over %d calls%s%s", len(result), total.calls,
                f"; Hessians of {len(total.grams)} activations, {grams / 1e6:.1f} MB" if total.grams else "",
                f"; token samples of {len(rows)} activations ({samples.per_call} rows per call), {sampled / 1e6:.1f} MB"
                if samples is not None else "")
    return CalibrationStats(model_hash(model_path), result, total.calls, source, rows)

"""Static per-tensor symmetric activation quantizers with one scale per sampling timestep (HQ-DM's temporal steps).

HQ-DM quantizes each activation with one symmetric step size per tensor and per sampling timestep (learned by QAT,
initialised from calibration). Here the table comes from calibration (`hn_export.act_scales`) or from the user:
for every site, ``absmax[k]`` = max |x| of the tensor the quantizer reads (after the site's transform) at step
``k``, and the timestep value ``timesteps[k]`` fed to the graph at that step. In the graph, with ``t`` the timestep
input (its first element: the batch of one denoising call shares its timestep):

    k     = argmin_k |timesteps[k] - t|                 (one ArgMin, shared by every site)
    s     = absmax[k] / qmax,  qmax = 2^(b-1) - 1       (b = activation bits; Gather from the site's table)
    x^    = s * clip(round(x / s), -qmax, qmax)          (Clip, QuantizeLinear / DequantizeLinear, zero point 0)

The grid is symmetric and narrow (``-qmax..qmax``: 15 levels at 4 bits, 7 at 3 bits) in an INT4 (b <= 4) or INT8
container. A step whose table entry is 0 gets the smallest normal float as its scale.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graph_passes.errors import GraphInputError
from graph_passes.graph_utils import NodeSequence, add_initializer, shared_constant, tensor_name
from graph_passes.quantization import container


class ActGranularity(enum.Enum):
    """How activations are quantized: per token, dynamic, asymmetric (default), or HQ-DM's static per-tensor
    symmetric scales with one scale per sampling timestep."""

    TOKEN = "token"
    TIMESTEP = "timestep"


@dataclasses.dataclass(frozen=True)
class ActScaleTable:
    """Per-site, per-timestep activation ranges (float64). `absmax[site]` has one entry per `timesteps` entry."""

    timestep_input: str
    timesteps: np.ndarray  # [K]
    absmax: Mapping[str, np.ndarray]  # site name -> [K]

    def __post_init__(self) -> None:
        steps = len(self.timesteps)
        for site, values in self.absmax.items():
            if len(values) != steps:
                raise GraphInputError(f"the activation scale table has {len(values)} values for site {site} but "
                                      f"{steps} timesteps; give one value per timestep")


class TimestepIndex:
    """The shared ``argmin_k |timesteps[k] - t|`` of one graph (built on first use)."""

    def __init__(self, graph: ir.Graph, timestep_input: str, timesteps: np.ndarray):
        self.graph, self.timestep_input, self.timesteps = graph, timestep_input, timesteps
        self.value: ir.Value | None = None

    def get(self) -> ir.Value:
        if self.value is not None:
            return self.value
        graph = self.graph
        t = next((v for v in graph.inputs if v.name == self.timestep_input), None)
        if t is None:
            raise GraphInputError(f"static per-timestep activation scales need the timestep input "
                                  f"{self.timestep_input!r}, which this graph does not have")
        seq = NodeSequence("hadanorm.timestep_index")
        flat = seq.op("Reshape", [seq.op("Cast", [t], to=ir.DataType.FLOAT),
                                  add_initializer(graph, "hadanorm.flat", np.array([-1], np.int64))])
        first = seq.op("Gather", [flat, add_initializer(graph, "hadanorm.first", np.array(0, np.int64))], axis=0)
        table = add_initializer(graph, "hadanorm.step_timesteps", np.asarray(self.timesteps, np.float32))
        self.value = seq.op("ArgMin", [seq.op("Abs", [seq.op("Sub", [table, first])])], axis=0, keepdims=0)
        graph.insert_before(graph.node(0), seq.nodes)
        return self.value


def static_qdq(graph: ir.Graph, before: ir.Node, x: ir.Value, bits: int, site: str, scales: np.ndarray,
               index: TimestepIndex) -> ir.Value:
    """Insert the static quantizer of `x` (site `site`; `scales` [K] float64, one per timestep) before `before`;
    returns the DequantizeLinear output."""
    dtype = x.dtype.numpy() if x.dtype is not None else np.dtype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    scales = np.where(scales > 0, scales, np.finfo(dtype).tiny).astype(dtype)
    zp_type, zp_np = container(bits, signed=True)
    name = tensor_name(f"{site}.act_static")
    seq = NodeSequence(name)
    scale = seq.op("Gather", [add_initializer(graph, f"{name}.scales", scales), index.get()], axis=0)
    high = seq.op("Mul", [scale, shared_constant(graph, f"hadanorm.qmax_s{bits}_{dtype}", np.array(qmax, dtype))])
    low = seq.op("Neg", [high])
    zero = shared_constant(graph, f"hadanorm.zero_{zp_type.name.lower()}", np.array(0, dtype=zp_np))
    q = seq.op("QuantizeLinear", [seq.op("Clip", [x, low, high]), scale, zero])
    dq = seq.op("DequantizeLinear", [q, scale, zero])
    dq.type, dq.shape = x.type, x.shape
    graph.insert_before(before, seq.nodes)
    return dq

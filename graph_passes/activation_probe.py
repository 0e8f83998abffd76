"""Calibration emitter: one graph output per site with max |x| of the tensor its activation quantizer would read.

Writes the transformed (not quantized) graph (`graph_passes.emit.TransformEmitter`) plus the output
``hn_probe.<i>`` (site ``i`` in plan order) = ``max |x~|`` over the whole tensor for one call, where ``x~`` is what
the quantizer reads at that site (the transform's output, ``[x~; mu~]`` for quantized-token corrections, the back
rotation's input of a single-Hadamard site, a conv site's tokens). The static per-timestep activation scales
(`graph_passes.static_act_quant`) are calibrated from these.
"""

from __future__ import annotations

import onnx_ir as ir

from graph_passes.emit import TransformEmitter
from graph_passes.graph_utils import NodeSequence
from graph_passes.site_plan import SitePlan

PROBE_PREFIX = "hn_probe"


def probe_name(index: int) -> str:
    return f"{PROBE_PREFIX}.{index}"


class ProbeEmitter(TransformEmitter):
    def quantize(self, index: int, plan: SitePlan, x: ir.Value, before: ir.Node) -> ir.Value:
        seq = NodeSequence(probe_name(index))
        value = seq.op("ReduceMax", [seq.op("Abs", [seq.op("Cast", [x], to=ir.DataType.FLOAT)])], keepdims=0)
        value.name = probe_name(index)
        value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([])
        self.graph.extend(seq.nodes)
        self.graph.outputs.append(value)
        return x

"""Calibration pass: one graph output per site with max |x| of the tensor its activation quantizer would read.

Run on the transformed (not quantized) graph: the output ``hn_probe.<i>`` (site ``i`` in `site_order`) is
``max |x~|`` over the whole tensor for one call, where ``x~`` is what `QuantizePass` quantizes at that site (the
transform's output, the back rotation's input of a single-Hadamard site, a conv site's tokens). The static
per-timestep activation scales (`graph_passes.static_act_quant`) are calibrated from these.
"""

from __future__ import annotations

import onnx_ir as ir

from graph_passes import tags
from graph_passes.graph_utils import NodeSequence, quantization_point, tagged_matmuls

PROBE_PREFIX = "hn_probe"


def probe_name(index: int) -> str:
    return f"{PROBE_PREFIX}.{index}"


class ActivationProbePass(ir.passes.InPlacePass):
    def __init__(self, site_order: list[str]):
        super().__init__()
        self.site_order = site_order

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        index = {name: i for i, name in enumerate(self.site_order)}
        groups = tagged_matmuls(graph, tags.ROLE_MAIN)
        for site, nodes in groups.items():
            x, _, _ = quantization_point(nodes[0])
            seq = NodeSequence(f"{PROBE_PREFIX}.{index[site]}")
            value = seq.op("ReduceMax", [seq.op("Abs", [seq.op("Cast", [x], to=ir.DataType.FLOAT)])], keepdims=0)
            value.name = probe_name(index[site])
            value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([])
            graph.extend(seq.nodes)
            graph.outputs.append(value)
        return ir.passes.PassResult(model, modified=bool(groups))

"""Sensitivity pass: every site's activation quantizer behind a runtime switch; weights stay in float.

For site ``i`` (in the order of `find_activation_sites`) the MatMuls read ``x + m_i (QDQ(x) - x)`` where ``m`` is a new
graph input ``hn_quant_mask`` of shape [S]: ``m = e_i`` turns on quantizer ``i`` alone (the paper's sensitivity
study), ``m = 0`` gives the float graph, ``m = 1`` every activation quantizer. One graph serves all S runs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes import tags
from graph_passes.graph_utils import (
    make_node,
    quantization_point,
    shared_constant,
    site_width,
    tagged_matmuls,
    tensor_name,
)
from graph_passes.quantize import activation_qdq

MASK_INPUT = "hn_quant_mask"


class GatedActivationQuantPass(ir.passes.InPlacePass):
    def __init__(self, act_bits: int, site_order: list[str]):
        super().__init__()
        self.act_bits = act_bits
        self.site_order = site_order

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        mask = ir.Value(name=MASK_INPUT, shape=ir.Shape([len(self.site_order)]),
                        type=ir.TensorType(graph.inputs[0].dtype or ir.DataType.FLOAT))
        graph.inputs.append(mask)
        index = {name: i for i, name in enumerate(self.site_order)}
        groups = tagged_matmuls(graph, tags.ROLE_MAIN)
        for site, matmuls in groups.items():
            x, consumer, _ = quantization_point(matmuls[0])
            dq = activation_qdq(graph, consumer, x, self.act_bits, site_width(matmuls[0]), site)
            name = tensor_name(f"{site}.gate")
            position = shared_constant(graph, f"hadanorm.site_index_{index[site]}", np.array(index[site], np.int64))
            gate = make_node("Gather", [mask, position], f"{name}.m", axis=0)
            delta = make_node("Sub", [dq, x], f"{name}.delta")
            scaled = make_node("Mul", [delta.outputs[0], gate.outputs[0]], f"{name}.scaled")
            gated = make_node("Add", [x, scaled.outputs[0]], f"{name}.out")
            gated.outputs[0].type, gated.outputs[0].shape = x.type, x.shape
            graph.insert_before(consumer, [gate, delta, scaled, gated])
            readers = {(id(c), i): (c, i) for c, i in (quantization_point(m)[1:] for m in matmuls)}
            for reader, index_in in readers.values():  # every MatMul of the site (or its shared view / rotation)
                reader.replace_input_with(index_in, gated.outputs[0])
        return ir.passes.PassResult(model, modified=bool(groups))

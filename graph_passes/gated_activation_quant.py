"""Sensitivity emitter: every site's activation quantizer behind a runtime switch; weights stay in float.

For site ``i`` (in plan order, the order of `find_activation_sites`) the linears read ``x + m_i (QDQ(x) - x)``
where ``m`` is a new graph input ``hn_quant_mask`` of shape [S]: ``m = e_i`` turns on quantizer ``i`` alone (the
paper's sensitivity study), ``m = 0`` gives the float graph, ``m = 1`` every activation quantizer. One graph serves
all S runs. The weights are the transformed float ones (`graph_passes.emit.TransformEmitter`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.emit import TransformEmitter
from graph_passes.emit_qdq import activation_qdq
from graph_passes.graph_utils import make_node, shared_constant, tensor_name
from graph_passes.site_plan import SitePlan

MASK_INPUT = "hn_quant_mask"


class GatedEmitter(TransformEmitter):
    def start(self) -> None:
        self.mask = ir.Value(name=MASK_INPUT, shape=ir.Shape([len(self.plans)]),
                             type=ir.TensorType(self.graph.inputs[0].dtype or ir.DataType.FLOAT))
        self.graph.inputs.append(self.mask)

    def quantize(self, index: int, plan: SitePlan, x: ir.Value, before: ir.Node) -> ir.Value:
        dq = activation_qdq(self.graph, before, x, plan.act.bits, plan.width, plan.name)
        name = tensor_name(f"{plan.name}.gate")
        position = shared_constant(self.graph, f"hadanorm.site_index_{index}", np.array(index, np.int64))
        gate = make_node("Gather", [self.mask, position], f"{name}.m", axis=0)
        delta = make_node("Sub", [dq, x], f"{name}.delta")
        scaled = make_node("Mul", [delta.outputs[0], gate.outputs[0]], f"{name}.scaled")
        gated = make_node("Add", [x, scaled.outputs[0]], f"{name}.out")
        gated.outputs[0].type, gated.outputs[0].shape = x.type, x.shape
        self.graph.insert_before(before, [gate, delta, scaled, gated])
        return gated.outputs[0]

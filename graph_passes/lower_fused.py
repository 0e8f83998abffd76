"""Pass: lower the ``qdq`` graph to the ``fused`` format (integer execution by the hadanorm kernel library).

Per activation quantizer of ``x`` (bits ``b``):

* ``x`` made by a transform op used only by the quantizer: ``<Transform>Quantize(x_in, ...)`` replaces both
  (``codes, scale, zero_point[, mean_y]`` from one pass over the tokens); otherwise ``Quantize(x)``.

Per site MatMul ``MatMul(DQ_act, DQ_w)``:

* ``IntMatMul{4,8}(codes, scale, zero_point, b, scales, zero_points, bias)`` with the weight repacked
  (`graph_passes.int_packing`, the same integers and scales as the qdq graph) and ``bias`` folded from what
  follows: the linear's ``Add(·, bias[N])``, and for centered sites (``float-token``/``exact``) the correction
  ``mean~ @ W~`` as ``FloatMatMul{4,8}(mean~, ...)`` (the same packed weight, or the ``exact`` mode's per-channel
  int8 copy packed as one block) added to it: ``bias' = mean~ W~ + bias`` is ``[B, 1, N]``.
* ``quantized-token`` sites keep their Concat / Slice / Add around the IntMatMul (the mean token is a quantized row).

Node names end in their op type (onnxruntime's run-time errors name the node, also inside an inlined function body,
so `runtime.denoiser` can say which packed weight is broken). Maths unchanged: ``y = (codes - zp) scale @ w + bias`` is what the qdq graph computes; only the summation order of
the float epilogue differs (the integer sums are exact).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes import tags
from graph_passes.graph_utils import add_initializer, make_node, redirect_uses, shared_constant
from graph_passes.hadanorm_ops import TransformOp
from graph_passes.int_ops import MatMulOp, QuantizeOp, ensure_function
from graph_passes.int_packing import PackedWeight
from graph_passes.lowering import (
    ActivationQuantizer,
    activation_quantizer,
    constant_bias,
    repack,
    single_use,
    weight_dq,
)
from graph_passes.domain import HADANORM_DOMAIN

_TRANSFORMS = {TransformOp(c, r).op_type: TransformOp(c, r) for c in (False, True) for r in (False, True)}


def _safe(name: str) -> str:
    return name.replace("#", "_")


class LowerToFusedPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        quantized: dict[int, list[ir.Value]] = {}  # id(DQ_act node) -> outputs of the quantize op
        packed: dict[int, dict[str, ir.Value]] = {}  # id(DQ_w node) -> packed initializers
        modified = False
        for node in list(graph):
            if node.op_type != "MatMul" or tags.role_of(node) != tags.ROLE_MAIN:
                continue
            act = activation_quantizer(node.inputs[0])
            w_dq = weight_dq(node.inputs[1])
            if act is None or w_dq is None:
                continue
            if id(act.dq) not in quantized:
                quantized[id(act.dq)] = self._quantize(model, act, node)
            codes, scale, zero_point = quantized[id(act.dq)][:3]
            weights = self._packed(model, w_dq, packed)
            self._int_matmul(model, node, codes, scale, zero_point, weights, packed)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    # -- activations --------------------------------------------------------------------------------------------

    def _quantize(self, model: ir.Model, act: ActivationQuantizer, before: ir.Node) -> list[ir.Value]:
        graph = model.graph
        producer = act.x.producer()
        fusable = (
            producer is not None and producer.domain == HADANORM_DOMAIN and producer.op_type in _TRANSFORMS
            and producer.outputs[0] is act.x and not act.x.is_graph_output()
            and all(tags.ACT_QUANT in user.metadata_props for user, _ in act.x.uses())
        )
        transform = _TRANSFORMS[producer.op_type] if fusable else None
        spec = QuantizeOp(transform)
        inputs = list(producer.inputs) if fusable else [act.x]
        node = make_node(spec.op_type, inputs, f"{_safe(act.site)}.quantize", domain=HADANORM_DOMAIN,
                         num_outputs=spec.num_outputs, metadata={tags.SITE: act.site}, bits=act.bits)
        codes, scale, zp = node.outputs[:3]
        codes.type, codes.shape = ir.TensorType(ir.DataType.UINT8), act.x.shape
        scale.type = act.x.type
        zp.type = ir.TensorType(ir.DataType.UINT8)
        if spec.num_outputs == 4:
            node.outputs[3].type = producer.outputs[1].type
            redirect_uses(producer.outputs[1], node.outputs[3])
        ensure_function(model, spec)
        graph.insert_before(producer if fusable else before, node)
        return list(node.outputs)

    # -- weights ------------------------------------------------------------------------------------------------

    def _packed(self, model: ir.Model, dq: ir.Node, cache: dict[int, dict[str, ir.Value]]) -> dict[str, ir.Value]:
        if id(dq) in cache:
            return cache[id(dq)]
        weight: PackedWeight = repack(dq)
        graph = model.graph
        name = _safe(dq.inputs[0].name or "w")
        dtype = dq.inputs[1].const_value.numpy().dtype
        entry = {
            "b": add_initializer(graph, f"{name}.packed{weight.bits}", weight.b),
            "scales": add_initializer(graph, f"{name}.scales", weight.scales.astype(dtype)),
            "zero_points": add_initializer(graph, f"{name}.zero_points", weight.zero_points),
            "bits": weight.bits,
            "block_size": weight.block_size,
            "n": weight.n,
        }
        cache[id(dq)] = entry
        return entry

    # -- the matmul and its epilogue ----------------------------------------------------------------------------

    def _int_matmul(self, model: ir.Model, matmul: ir.Node, codes: ir.Value, scale: ir.Value, zero_point: ir.Value,
                    weights: dict, packed: dict) -> None:
        graph = model.graph
        out = matmul.outputs[0]
        n = weights["n"]
        dtype = scale.dtype
        extra: list[ir.Node] = []
        last = out
        bias_terms: list[ir.Value] = []
        follower = single_use(out)
        if follower is not None and follower.op_type == "Add":
            other = follower.inputs[1] if follower.inputs[0] is out else follower.inputs[0]
            correction = other.producer()
            if correction is not None and tags.role_of(correction) == tags.ROLE_BIAS_CORRECTION:
                corr_dq = weight_dq(correction.inputs[1])
                corr_weights = self._packed(model, corr_dq, packed)
                spec = MatMulOp(corr_weights["bits"], integer_input=False)
                node = make_node(spec.op_type, [correction.inputs[0], corr_weights["b"], corr_weights["scales"],
                                                corr_weights["zero_points"]],
                                 f"{_safe(matmul.name)}.{spec.op_type}", domain=HADANORM_DOMAIN,
                                 metadata={tags.SITE: tags.site_of(matmul) or ""},
                                 block_size=corr_weights["block_size"])
                node.outputs[0].type = out.type
                ensure_function(model, spec)
                extra.append(node)
                bias_terms.append(node.outputs[0])
                last = follower.outputs[0]
                follower = single_use(last)
        if follower is not None:
            bias = constant_bias(follower, last, n)
            if bias is not None:
                bias_terms.append(bias)
                last = follower.outputs[0]
        if not bias_terms:
            np_dtype = dtype.numpy() if dtype is not None else np.float32
            bias_terms.append(shared_constant(graph, f"hadanorm.zeros{n}_{np_dtype}", np.zeros(n, dtype=np_dtype)))
        bias = bias_terms[0]
        if len(bias_terms) == 2:
            add = make_node("Add", bias_terms, f"{_safe(matmul.name)}.bias")
            add.outputs[0].type = out.type
            extra.append(add)
            bias = add.outputs[0]
        spec = MatMulOp(weights["bits"], integer_input=True)
        node = make_node(spec.op_type, [codes, scale, zero_point, weights["b"], weights["scales"],
                                        weights["zero_points"], bias],
                         f"{_safe(matmul.name)}.{spec.op_type}", domain=HADANORM_DOMAIN,
                         metadata={tags.SITE: tags.site_of(matmul) or "", tags.ROLE: tags.ROLE_MAIN},
                         block_size=weights["block_size"])
        ensure_function(model, spec)
        extra.append(node)
        graph.insert_before(matmul, extra)
        redirect_uses(last, node.outputs[0], keep=extra)

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

Single-Hadamard (HQ-DM) sites: ``MatMul(RotateBack(DQ_act(Q_act(x~))), DQ_w)`` becomes the sum of one
``IntMatMul8`` per int8 part of the rotated integer weight (`graph_passes.single_hadamard_weights`), reading the
codes of ``x~`` (``ScaleRotateQuantize``): the integer form ``Q(x H^T) (H_raw W_int^T) s_x s_w / sqrt(n)``.

Node names end in their op type (onnxruntime's run-time errors name the node, also inside an inlined function body,
so `runtime.denoiser` can say which packed weight is broken). Maths unchanged: ``y = (codes - zp) scale @ w + bias`` is what the qdq graph computes; only the summation order of
the float epilogue differs (the integer sums are exact).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes import tags
from graph_passes.graph_utils import add_initializer, make_node, redirect_uses, shared_constant, tensor_name
from graph_passes.hadanorm_ops import TransformOp
from graph_passes.int_ops import MatMulOp, QuantizeOp, ensure_function
from graph_passes.int_packing import PackedWeight, pack
from graph_passes.lowering import (
    ActivationQuantizer,
    activation_quantizer,
    constant_bias,
    repack,
    single_use,
    weight_codes,
    weight_dq,
)
from graph_passes.domain import HADANORM_DOMAIN
from graph_passes.single_hadamard_weights import int8_parts, rotated_integer_weight

_TRANSFORMS = {TransformOp(c, r).op_type: TransformOp(c, r) for c in (False, True) for r in (False, True)}



def _register(graph: ir.Graph, b_name: str, prefix: str, weight: PackedWeight, dtype) -> dict:
    """The packed weight's initializers (scales in the weight's float `dtype`) and layout, as the IntMatMul nodes
    read them."""
    return {
        "b": add_initializer(graph, b_name, weight.b),
        "scales": add_initializer(graph, f"{prefix}scales", weight.scales.astype(dtype)),
        "zero_points": add_initializer(graph, f"{prefix}zero_points", weight.zero_points),
        "bits": weight.bits,
        "block_size": weight.block_size,
        "n": weight.n,
    }


class LowerToFusedPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        quantized: dict[int, list[ir.Value]] = {}  # id(DQ_act node) -> outputs of the quantize op
        packed: dict[int, dict[str, ir.Value]] = {}  # id(DQ_w node) -> packed initializers
        modified = False
        for node in list(graph):
            if node.op_type != "MatMul" or tags.role_of(node) != tags.ROLE_MAIN:
                continue
            back = node.inputs[0].producer()
            rotated = back is not None and tags.ROTATE_BACK in back.metadata_props
            act = activation_quantizer(back.inputs[0] if rotated else node.inputs[0])
            w_dq = weight_dq(node.inputs[1])
            if act is None or w_dq is None:
                continue
            if id(act.dq) not in quantized:
                quantized[id(act.dq)] = self._quantize(model, act, node)
            codes, scale, zero_point = quantized[id(act.dq)][:3]
            parts = self._rotated_parts(model, w_dq, back, packed) if rotated else [self._packed(model, w_dq, packed)]
            self._int_matmul(model, node, codes, scale, zero_point, parts, packed)
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
        node = make_node(spec.op_type, inputs, f"{tensor_name(act.site)}.quantize", domain=HADANORM_DOMAIN,
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
        name = tensor_name(dq.inputs[0].name or "w")
        dtype = dq.inputs[1].const_value.numpy().dtype
        entry = _register(model.graph, f"{name}.packed{weight.bits}", f"{name}.", weight, dtype)
        cache[id(dq)] = entry
        return entry

    def _rotated_parts(self, model: ir.Model, dq: ir.Node, back: ir.Node, cache: dict) -> list[dict[str, ir.Value]]:
        """The int8 parts of ``R_raw W_int^T`` (HQ-DM's integer form), packed for IntMatMul8."""
        key = (id(dq), id(back.inputs[2].const_value), id(back.inputs[3].const_value))
        if key in cache:
            return cache[key]
        q, scale, zp, block, _ = weight_codes(dq)
        rows = q.shape[0]
        w_int = q - (0 if zp is None else np.repeat(zp, block, axis=0)[:rows])
        left = back.inputs[2].const_value.numpy().T  # the back rotation holds the transposed factors
        right = back.inputs[3].const_value.numpy().T
        m, c = rotated_integer_weight(w_int, left, right, block)
        if block >= rows:
            block = rows + (-rows) % 4  # one block per output channel, padded for the 8-bit layout
        name = tensor_name(dq.inputs[0].name or "w")
        entries = []
        for p, part in enumerate(int8_parts(m)):
            scales = scale.astype(np.float64) * c * 128.0**p
            weight = pack(part.astype(np.int64), scales, np.zeros(scale.shape, np.int64), 8, block)
            entries.append(_register(model.graph, f"{name}.hqdm_part{p}", f"{name}.hqdm_part{p}.", weight,
                                     scale.dtype))
        cache[key] = entries
        return entries

    # -- the matmul and its epilogue ----------------------------------------------------------------------------

    def _int_matmul(self, model: ir.Model, matmul: ir.Node, codes: ir.Value, scale: ir.Value, zero_point: ir.Value,
                    parts: list[dict], packed: dict) -> None:
        """One IntMatMul per weight part (one, or HQ-DM's int8 parts), the bias folded into the first."""
        graph = model.graph
        out = matmul.outputs[0]
        weights = parts[0]
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
                                 f"{tensor_name(matmul.name)}.{spec.op_type}", domain=HADANORM_DOMAIN,
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
            add = make_node("Add", bias_terms, f"{tensor_name(matmul.name)}.bias")
            add.outputs[0].type = out.type
            extra.append(add)
            bias = add.outputs[0]
        np_dtype = dtype.numpy() if dtype is not None else np.float32
        zeros = shared_constant(graph, f"hadanorm.zeros{n}_{np_dtype}", np.zeros(n, dtype=np_dtype))
        result = None
        for p, part in enumerate(parts):
            spec = MatMulOp(part["bits"], integer_input=True)
            suffix = f".part{p}" if len(parts) > 1 else ""
            node = make_node(spec.op_type, [codes, scale, zero_point, part["b"], part["scales"],
                                            part["zero_points"], bias if p == 0 else zeros],
                             f"{tensor_name(matmul.name)}{suffix}.{spec.op_type}", domain=HADANORM_DOMAIN,
                             metadata={tags.SITE: tags.site_of(matmul) or "", tags.ROLE: tags.ROLE_MAIN},
                             block_size=part["block_size"])
            node.outputs[0].type = out.type
            ensure_function(model, spec)
            extra.append(node)
            if result is None:
                result = node.outputs[0]
            else:
                add = make_node("Add", [result, node.outputs[0]], f"{tensor_name(matmul.name)}{suffix}.sum")
                add.outputs[0].type = out.type
                extra.append(add)
                result = add.outputs[0]
        graph.insert_before(matmul, extra)
        redirect_uses(last, result, keep=extra)

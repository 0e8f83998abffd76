"""The ``fused`` format: integer execution by the hadanorm kernel library (`graph_passes.int_ops`).

Per site whose linears are all MatMuls (linears, 1x1 convs) with per-token activation quantizers:

* the quantizer: ``<Transform>Quantize(x, mul[, h_left, h_right])`` when the site has a transform and no
  quantized-token correction (``codes, scale, zero_point[, mean_y]`` from one pass over the tokens); otherwise
  ``Quantize(a)`` of what the ``qdq`` graph quantizes (the raw activation, or ``[x~; mu~]``), shared like its
  quantizer;
* per linear ``IntMatMul{4,8}(codes, scale, zero_point, b, scales, zero_points, bias)`` with the plan's integers
  packed (`graph_passes.int_packing.repack`: the ``qdq`` format's integers and scales) and ``bias`` folded from the
  linear's ``Add(·, bias[N])`` and, for centered sites (``float-token``/``exact``), the correction ``mu~ W~^T`` as
  ``FloatMatMul{4,8}(mu~, ...)`` (the same packed weight, or the ``exact`` mode's per-channel int8 copy packed as
  one block) added to it: ``bias' = mu~ W~^T + bias`` is ``[B, 1, N]``;
* ``quantized-token`` sites: the IntMatMul, then the mean row's Slice / Add (the mean is a quantized row; the bias
  stays an Add after them).

Single-Hadamard (HQ-DM) sites: the sum of one ``IntMatMul8`` per int8 part of the rotated integer weight
(`graph_passes.single_hadamard_weights`) reading the codes of ``x~`` (``ScaleRotateQuantize``): the integer form
``Q(x H^T) (H_raw W_int^T) s_x s_w / sqrt(n)``; the factors are taken in the activation's dtype, as the ``qdq``
graph's back rotation holds them. Other sites (k x k convs, static per-timestep quantizers) are written as in
``qdq``.

Node names end in their op type (onnxruntime's run-time errors name the node, also inside an inlined function body,
so `runtime.denoiser` can say which packed weight is broken). ``y = (codes - zp) scale @ w + bias`` is what the qdq
graph computes; only the summation order of the float epilogue differs (the integer sums are exact).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graph_passes.bias_correction import add_mean_row, with_mean_token
from graph_passes.conv_sites import ConvTokens
from graph_passes.domain import HADANORM_DOMAIN
from graph_passes.emit import MatMulSlot, SiteInput
from graph_passes.emit_qdq import QdqEmitter
from graph_passes.function_ops import ensure_function
from graph_passes.graph_utils import add_initializer, make_node, redirect_uses, shared_constant, tensor_name
from graph_passes.insert_transforms import float_dtype, insert_transform, transform_inputs
from graph_passes.int_ops import MatMulOp, QuantizeOp
from graph_passes.int_packing import PackedWeight, pack, repack
from graph_passes.methods import BiasCorrection
from graph_passes.single_hadamard_weights import int8_parts, rotated_integer_weight
from graph_passes.site_plan import LinearPlan, SitePlan, WeightPlan


@dataclasses.dataclass(frozen=True)
class StoredWeight:
    """A packed weight's initializers and layout, as the IntMatMul / FloatMatMul nodes read them."""

    b: ir.Value
    scales: ir.Value
    zero_points: ir.Value
    bits: int
    block_size: int
    n: int


class FusedEmitter(QdqEmitter):
    @staticmethod
    def _integer(plan: SitePlan) -> bool:
        return plan.integer_matmuls and plan.act.static is None

    # -- activations --------------------------------------------------------------------------------------------

    def site_input(self, index: int, plan: SitePlan, tokens: ir.Value, view: ConvTokens | None,
                   before: ir.Node) -> SiteInput:
        """The quantize op (fused with the site's transform where it can be); its codes are what the linears read."""
        if not self._integer(plan):
            return super().site_input(index, plan, tokens, view, before)
        transform, mode = plan.transform, plan.bias_correction
        if transform.op is not None and mode is not BiasCorrection.QUANTIZED_TOKEN:  # one op for both
            inputs = [tokens, *transform_inputs(self.graph, plan.name, transform, float_dtype(tokens))]
            outputs = self._quantize_op(plan, QuantizeOp(transform.op), inputs, tokens, before)
            return SiteInput(None, outputs[3] if transform.center else None, view, tuple(outputs[:3]))
        value, mean = tokens, None
        if transform.op is not None:
            node = insert_transform(self.model, plan.name, transform, tokens, before)
            value, mean = node.outputs[0], node.outputs[1]  # quantized-token: a centered site
            value = with_mean_token(self.graph, plan.name, value, mean, before)
        if id(value) not in self.quantized:  # sites without a transform share their activation's quantizer
            self.quantized[id(value)] = self._quantize_op(plan, QuantizeOp(None), [value], value, before)
        return SiteInput(None, mean, view, tuple(self.quantized[id(value)][:3]))

    def _quantize_op(self, plan: SitePlan, spec: QuantizeOp, inputs: list[ir.Value], x: ir.Value,
                     before: ir.Node) -> list[ir.Value]:
        node = make_node(spec.op_type, inputs, f"{tensor_name(plan.name)}.quantize", domain=HADANORM_DOMAIN,
                         num_outputs=spec.num_outputs, bits=plan.act.bits)
        codes, scale, zp = node.outputs[:3]
        codes.type, codes.shape = ir.TensorType(ir.DataType.UINT8), x.shape
        scale.type = x.type
        zp.type = ir.TensorType(ir.DataType.UINT8)
        if spec.num_outputs == 4:
            node.outputs[3].type = x.type
        ensure_function(self.model, spec)
        self.graph.insert_before(before, node)
        return list(node.outputs)

    # -- weights ------------------------------------------------------------------------------------------------

    def _store(self, b_name: str, prefix: str, weight: PackedWeight, dtype: np.dtype) -> StoredWeight:
        """Initializers ``<b_name>``, ``<prefix>scales`` (in the weight's float `dtype`), ``<prefix>zero_points``."""
        return StoredWeight(add_initializer(self.graph, b_name, weight.b),
                            add_initializer(self.graph, f"{prefix}scales", weight.scales.astype(dtype)),
                            add_initializer(self.graph, f"{prefix}zero_points", weight.zero_points),
                            weight.bits, weight.block_size, weight.n)

    def _packed(self, plan: SitePlan, weight: WeightPlan, node: ir.Node, exact: bool = False) -> StoredWeight:
        """The plan's weight (`exact`: its int8 correction copy) packed for IntMatMul / FloatMatMul."""
        key = ("q8" if exact else "packed", id(weight))
        if key not in self.weights:
            qw = weight.correction if exact else weight.quantized
            name = tensor_name(f"{self.weight_name(plan, weight, node)}.q{qw.bits}")
            packed = repack(qw)
            self.weights[key] = self._store(f"{name}.packed{packed.bits}", f"{name}.", packed, qw.scale.dtype)
        return self.weights[key]

    def _rotated_parts(self, plan: SitePlan, weight: WeightPlan, node: ir.Node, dtype: np.dtype) -> list[StoredWeight]:
        """The int8 parts of ``R_raw W_int^T`` (HQ-DM's integer form), packed for IntMatMul8."""
        key = ("hqdm", id(weight))
        if key not in self.weights:
            qw, hadamard = weight.quantized, plan.transform.hadamard
            q = qw.q.astype(np.int64)
            rows, block = q.shape[0], qw.block
            w_int = q - (0 if qw.zero_point is None else
                         np.repeat(qw.zero_point.astype(np.int64), block, axis=0)[:rows])
            m, c = rotated_integer_weight(w_int, hadamard.left.astype(dtype), hadamard.right.astype(dtype), block)
            if block >= rows:
                block = rows + (-rows) % 4  # one block per output channel, padded for the 8-bit layout
            name = tensor_name(f"{self.weight_name(plan, weight, node)}.q{qw.bits}")
            parts = []
            for p, part in enumerate(int8_parts(m)):
                scales = qw.scale.astype(np.float64) * c * 128.0**p
                packed = pack(part.astype(np.int64), scales, np.zeros(qw.scale.shape, np.int64), 8, block)
                parts.append(self._store(f"{name}.hqdm_part{p}", f"{name}.hqdm_part{p}.", packed, qw.scale.dtype))
            self.weights[key] = parts
        return self.weights[key]

    # -- the matmul and its epilogue ----------------------------------------------------------------------------

    def matmul(self, plan: SitePlan, i: int, lp: LinearPlan, slot: MatMulSlot, site_in: SiteInput) -> None:
        """One IntMatMul per weight part (one, or HQ-DM's int8 parts), the bias folded into the first."""
        if site_in.codes is None:
            return super().matmul(plan, i, lp, slot, site_in)
        graph, node = self.graph, slot.node
        codes, scale, zero_point = site_in.codes
        name, out, mode = tensor_name(node.name), node.outputs[0], plan.bias_correction
        np_dtype = scale.dtype.numpy() if scale.dtype is not None else np.dtype(np.float32)
        if plan.transform.rotate_back:
            parts = self._rotated_parts(plan, lp.weight, node, np_dtype)  # the activation's dtype
        else:
            parts = [self._packed(plan, lp.weight, node)]
        n = parts[0].n
        extra: list[ir.Node] = []
        bias_terms: list[ir.Value] = []
        if mode in (BiasCorrection.FLOAT_TOKEN, BiasCorrection.EXACT):
            weight = self._packed(plan, lp.weight, node, exact=mode is BiasCorrection.EXACT)
            spec = MatMulOp(weight.bits, integer_input=False)
            correction = make_node(spec.op_type, [site_in.mean, weight.b, weight.scales, weight.zero_points],
                                   f"{name}.{spec.op_type}", domain=HADANORM_DOMAIN, block_size=weight.block_size)
            correction.outputs[0].type = out.type
            ensure_function(self.model, spec)
            extra.append(correction)
            bias_terms.append(correction.outputs[0])
        last, folded = out, []
        uses = list(out.uses())
        if (mode is not BiasCorrection.QUANTIZED_TOKEN and slot.bias_add is not None and len(uses) == 1
                and uses[0][0] is slot.bias_add and not out.is_graph_output()):
            bias_terms.append(slot.bias)
            last, folded = slot.bias_add.outputs[0], [slot.bias_add]
        zeros = None
        if not bias_terms or len(parts) > 1:
            zeros = shared_constant(graph, f"hadanorm.zeros{n}_{np_dtype}", np.zeros(n, dtype=np_dtype))
        bias = bias_terms[0] if bias_terms else zeros
        if len(bias_terms) == 2:
            add = make_node("Add", bias_terms, f"{name}.bias")
            add.outputs[0].type = out.type
            extra.append(add)
            bias = add.outputs[0]
        result = None
        for p, part in enumerate(parts):
            spec = MatMulOp(part.bits, integer_input=True)
            suffix = f".part{p}" if len(parts) > 1 else ""
            matmul = make_node(spec.op_type, [codes, scale, zero_point, part.b, part.scales, part.zero_points,
                                              bias if p == 0 else zeros],
                               f"{name}{suffix}.{spec.op_type}", domain=HADANORM_DOMAIN, block_size=part.block_size)
            matmul.outputs[0].type = out.type
            ensure_function(self.model, spec)
            extra.append(matmul)
            if result is None:
                result = matmul.outputs[0]
            else:
                add = make_node("Add", [result, matmul.outputs[0]], f"{name}{suffix}.sum")
                add.outputs[0].type = out.type
                extra.append(add)
                result = add.outputs[0]
        if mode is BiasCorrection.QUANTIZED_TOKEN:
            extra += add_mean_row(graph, result, f"{tensor_name(plan.name)}.{i}")
        graph.insert_before(node, extra)
        redirect_uses(last, extra[-1].outputs[0], keep=extra)
        graph.remove([node, *folded], safe=True)


"""Site emitters: passes that write the `SitePlan` of every site into the graph, one output format each.

For each site, in plan order (the graph order of the sites' first linears), an emitter writes

    t       = x                        (a conv site: its pixels as tokens, `graph_passes.conv_sites`)
    x~, mu~ = T(t)                     the transform op, when the site has one (`graph_passes.insert_transforms`)
    a       = x~  or  [x~; mu~]        (quantized-token bias correction: the mean as one more token)
    r       = Q(a)  or  Q(a) H         `quantize` (the format's quantizer, or none); HQ-DM rotates back after it
    y       = r W~^T [+ mu~ W~^T]      per linear: `matmul` (and `weight`, `conv_weight`, `correction_weight`)

with ``W~`` and its integers from the plan (`graph_passes.site_plan`), so the graph computes ``y = x W^T`` up to the
quantization (``W~ x~ = W (x - mu)``, and `graph_passes.bias_correction` adds ``W mu`` back). Everything an emitter
reads is the plan and the FP graph's own nodes; the activation a site reads is taken from its first linear when the
site is written, so a site that an earlier site's output feeds reads what that site wrote.

`SiteEmitter` is the format-independent part; `TransformEmitter` writes float weights (``--transform-only``); the
others: `graph_passes.emit_qdq.QdqEmitter`, `graph_passes.emit_nbits.NBitsEmitter`,
`graph_passes.emit_fused.FusedEmitter`, `graph_passes.activation_probe.ProbeEmitter`,
`graph_passes.gated_activation_quant.GatedEmitter`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from graph_passes.bias_correction import add_mean_product, add_mean_row, with_mean_token
from graph_passes.conv_sites import ConvTokens, conv_tokens, pointwise_matmul, read_view
from graph_passes.graph_utils import add_initializer, make_node, redirect_uses, tensor_name
from graph_passes.insert_transforms import insert_rotate_back, insert_transform
from graph_passes.methods import BiasCorrection
from graph_passes.site_plan import LinearPlan, SitePlan, WeightPlan


@dataclasses.dataclass(frozen=True)
class SiteInput:
    """What the linears of one site read, as the emitter wrote it."""

    read: ir.Value | None  # the tokens the linears multiply (quantized, rotated back); None: `codes` instead
    mean: ir.Value | None  # mu~ of a centered site (float)
    view: ConvTokens | None  # a conv site's pixels as tokens
    codes: tuple[ir.Value, ir.Value, ir.Value] | None = None  # fused: the quantize op's codes, scale, zero point


@dataclasses.dataclass(frozen=True)
class MatMulSlot:
    """One MatMul linear in the graph: the FP graph's (or a 1x1 conv's replacement) and its bias Add."""

    node: ir.Node
    bias_add: ir.Node | None
    bias: ir.Value | None


class SiteEmitter(ir.passes.InPlacePass):
    """Writes `plans` (made for this model by `graph_passes.site_plan.plan_sites`); subclasses give the format."""

    quantizes: bool | None = None  # True: writes quantized weights (plans made with a QuantConfig); False: float
    # weights (the transform only; activation quantizers may still be asked for, as the sensitivity emitter does)

    def __init__(self, plans: Sequence[SitePlan]):
        super().__init__()
        self.plans = tuple(plans)

    def requires(self, model: ir.Model) -> None:
        for plan in self.plans:
            if any(lp.layer.node.graph is not model.graph for lp in plan.linears):
                raise ir.passes.PreconditionError(f"the plan of site {plan.name} was made for another graph")
            quantized = all(lp.weight.quantized is not None for lp in plan.linears)
            floating = all(lp.weight.quantized is None for lp in plan.linears)
            if self.quantizes is True and not quantized:
                raise ir.passes.PreconditionError(
                    f"site {plan.name}: {type(self).__name__} writes quantized plans, this one is float (plan the "
                    "sites with a QuantConfig)")
            if self.quantizes is False and not floating:
                raise ir.passes.PreconditionError(
                    f"site {plan.name}: {type(self).__name__} writes float plans, this one is quantized (plan the "
                    "sites without a QuantConfig)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.model, self.graph = model, model.graph
        self.weights: dict[tuple[str, int], Any] = {}  # (kind, id(WeightPlan)) -> what the format stored for it
        self.start()
        for index, plan in enumerate(self.plans):
            self.emit_site(index, plan)
        return ir.passes.PassResult(model, modified=bool(self.plans))

    def start(self) -> None:
        """Per-call state of a subclass."""

    def emit_site(self, index: int, plan: SitePlan) -> None:
        first = plan.linears[0].layer.node
        view = conv_tokens(self.graph, first, plan.name) if plan.site.is_conv else None
        raw = view.tokens if view is not None else first.inputs[0]  # the activation before the transform
        site_in = self.site_input(index, plan, raw, view, first)
        for i, lp in enumerate(plan.linears):
            node = lp.layer.node
            if lp.layer.is_conv and not lp.layer.is_pointwise:
                read_view(self.graph, node, site_in.read, view, plan.name)
                node.replace_input_with(1, self.conv_weight(plan, lp.weight, node))
                continue
            if lp.layer.is_pointwise:
                slot = MatMulSlot(*pointwise_matmul(self.graph, node, view), lp.layer.bias)
            else:
                slot = MatMulSlot(node, lp.layer.bias_add, lp.layer.bias)
                if lp.weight.low_rank is not None:
                    self.low_rank_branch(plan, lp.weight, raw, slot)
            self.matmul(plan, i, lp, slot, site_in)

    def low_rank_branch(self, plan: SitePlan, weight: WeightPlan, raw: ir.Value, slot: MatMulSlot) -> None:
        """``y' = y + (raw @ left) @ right`` after the linear's output (its bias Add's, when it has one), written
        before the format rewrites the linear: the rewrite redirects every reader of that output, the branch's Add
        included (`graph_passes.low_rank`)."""
        branch = weight.low_rank
        key = ("low_rank", id(weight))
        if key not in self.weights:
            stem = self.weight_name(plan, weight, slot.node)
            self.weights[key] = (add_initializer(self.graph, f"{stem}.low_rank_left", branch.left),
                                 add_initializer(self.graph, f"{stem}.low_rank_right", branch.right))
        left, right = self.weights[key]
        last = slot.bias_add if slot.bias_add is not None else slot.node
        out, name = last.outputs[0], tensor_name(slot.node.name)
        down = make_node("MatMul", [raw, left], f"{name}.low_rank.down")
        up = make_node("MatMul", [down.outputs[0], right], f"{name}.low_rank.up")
        add = make_node("Add", [out, up.outputs[0]], f"{name}.low_rank.add")
        add.outputs[0].type = out.type
        redirect_uses(out, add.outputs[0], keep=[add])
        self.graph.insert_after(last, [down, up, add])

    def site_input(self, index: int, plan: SitePlan, tokens: ir.Value, view: ConvTokens | None,
                   before: ir.Node) -> SiteInput:
        """Transform, quantize (`quantize`) and rotate back the site's tokens, inserted before `before`."""
        value, mean = tokens, None
        if plan.transform.op is not None:
            node = insert_transform(self.model, plan.name, plan.transform, tokens, before)
            value = node.outputs[0]
            mean = node.outputs[1] if plan.transform.center else None
        if plan.bias_correction is BiasCorrection.QUANTIZED_TOKEN:
            value = with_mean_token(self.graph, plan.name, value, mean, before)
        read = self.quantize(index, plan, value, before)
        if plan.transform.rotate_back:
            read = insert_rotate_back(self.model, plan.name, plan.transform, read, before)
        return SiteInput(read, mean, view)

    def matmul(self, plan: SitePlan, i: int, lp: LinearPlan, slot: MatMulSlot, site_in: SiteInput) -> None:
        """``MatMul(r, weight)`` and the bias correction of linear `i` of the site."""
        node, mode = slot.node, plan.bias_correction
        weight = self.weight(plan, lp.weight, node)
        product = mode in (BiasCorrection.FLOAT_TOKEN, BiasCorrection.EXACT)
        correction = self.correction_weight(plan, lp.weight, weight, node) if product else None
        node.replace_input_with(0, site_in.read)
        node.replace_input_with(1, weight)
        if mode is None:
            return
        out, prefix = node.outputs[0], f"{tensor_name(plan.name)}.{i}"
        if mode is BiasCorrection.QUANTIZED_TOKEN:
            new = add_mean_row(self.graph, out, prefix)
        else:
            new = add_mean_product(out, site_in.mean, correction, prefix)
        redirect_uses(out, new[-1].outputs[0], keep=new)
        if mode is BiasCorrection.QUANTIZED_TOKEN:
            out.shape = None  # now N + 1 tokens
        self.graph.insert_after(node, new)

    # -- the format ---------------------------------------------------------------------------------------------

    def quantize(self, index: int, plan: SitePlan, x: ir.Value, before: ir.Node) -> ir.Value:
        """The value the site's linears read instead of `x` (its quantizer's output)."""
        raise NotImplementedError

    def weight(self, plan: SitePlan, weight: WeightPlan, node: ir.Node) -> ir.Value:
        """The weight `node` (a MatMul) multiplies."""
        raise NotImplementedError

    def conv_weight(self, plan: SitePlan, weight: WeightPlan, node: ir.Node) -> ir.Value:
        """The kernel the k x k conv `node` uses."""
        raise NotImplementedError

    def correction_weight(self, plan: SitePlan, weight: WeightPlan, main: ir.Value, node: ir.Node) -> ir.Value:
        """The weight the mean token ``mu~`` is multiplied with (float-token, exact); `main` is `weight`'s."""
        return main

    @staticmethod
    def weight_name(plan: SitePlan, weight: WeightPlan, node: ir.Node) -> str:
        """The name of the stored weight: the initializer `node` reads, or its copy ``<weight>.<site>``."""
        name = node.inputs[1].name or "w"
        return f"{name}.{plan.name}" if weight.copy else name


class TransformEmitter(SiteEmitter):
    """Float weights (``--transform-only``): the transform ops and ``W~`` (in place, or a copy when the weight is
    read outside the site); activations are not quantized."""

    quantizes = False

    def quantize(self, index: int, plan: SitePlan, x: ir.Value, before: ir.Node) -> ir.Value:
        return x

    def weight(self, plan: SitePlan, weight: WeightPlan, node: ir.Node) -> ir.Value:
        value = node.inputs[1]
        if weight.fused is None:  # no transform: the weight as it is
            return value
        key = ("float", id(weight))
        if key not in self.weights:
            if weight.copy:
                self.weights[key] = add_initializer(self.graph, self.weight_name(plan, weight, node), weight.fused)
            else:
                value.const_value = ir.tensor(weight.fused, name=value.name)
                self.weights[key] = value
        return self.weights[key]

    conv_weight = weight

"""Pass: replace every softmax attention ``MatMul -> [scale] -> [Add mask] -> Softmax -> MatMul`` by one
``hadanorm::Attention(q, k, v[, mask])`` (`graph_passes.attention_op`).

The sites are found from graph structure, whatever the family: a ``Softmax`` over the last axis whose input is
``MatMul(a, b)`` (through an optional ``Mul``/``Div`` by a constant scalar and an optional ``Add`` of a mask) and
whose only consumer is ``MatMul(softmax, v)``. Then ``scores = scale * q k^T + mask`` with

* ``q``: ``a`` without scalar ``Mul``s (constant factors go into ``scale``; others stay, applied to ``q``);
* ``k``: ``b = k^T`` read back through scalar ``Mul``s and a transposition: ``Transpose(x, perm)`` gives
  ``k = Transpose(x, perm with its last two axes swapped)`` (or ``x`` itself); torch's dynamo form of
  ``k.transpose(-2, -1)``, ``Reshape(Transpose(Reshape(x, [-1, N, D]), [0, 2, 1]), [B, H, D, N])``, gives ``x`` when
  the two shapes provably are those of ``x`` (constants or ``Shape(x)`` slices); otherwise ``k = Transpose(b)``.

When q, k and v are all head splits ``Transpose(x, [0, 2, 1, 3])`` of ``[B, N, H, D]`` tensors and the output's only
consumer is the head merge ``Transpose(y, [0, 2, 1, 3])``, the op reads and writes the ``[B, N, H, D]`` tensors
(``layout=bnhd``): the four transposes go. The maths is unchanged: scalar factors commute with the products, and
the function body is the float maths. A
``Softmax`` that does not match (Sana's linear attention has none; other forms) stays as it is: `find_attention`
lists both, for `hn-export layers`.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from graph_passes.attention_op import BHND, BNHD, AttentionForm, AttentionPrecision, attention_node
from graph_passes.function_ops import ensure_function
from graph_passes.graph_utils import constant_array, redirect_uses

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AttentionSite:
    """One softmax attention: the nodes it replaces and the op's inputs (``k_source`` and ``k_perm``: ``k`` is
    ``Transpose(k_source, k_perm)``, or ``k_source`` itself when ``k_perm`` is None)."""

    softmax: ir.Node
    output: ir.Node  # MatMul(softmax, v)
    q: ir.Value
    q_factors: list[ir.Value]  # non-constant scalar factors of the scores
    k_source: ir.Value
    k_perm: list[int] | None
    v: ir.Value
    mask: ir.Value | None
    scale: float
    layout: str = BHND
    merge: ir.Node | None = None  # bnhd: the head-merge Transpose whose output the op's output replaces


@dataclasses.dataclass
class AttentionScan:
    sites: list[AttentionSite]
    unrecognised: list[ir.Node]  # Softmax nodes left as they are


def _is_scalar(value: ir.Value) -> bool:
    shape = value.shape
    return shape is not None and all(isinstance(d, int) and d == 1 for d in shape.dims)


def _rank(value: ir.Value) -> int | None:
    return value.shape.rank() if value.shape is not None else None


def _strip_scalars(value: ir.Value) -> tuple[ir.Value, float, list[ir.Value]]:
    """``value`` read back through ``Mul`` by scalars: (the rest, product of constant factors, other factors)."""
    scale, factors = 1.0, []
    while (node := value.producer()) is not None and node.op_type == "Mul":
        a, b = node.inputs
        if a is not None and b is not None and _is_scalar(b) and _rank(b) <= (_rank(a) or 0):
            rest, factor = a, b
        elif a is not None and b is not None and _is_scalar(a) and _rank(a) <= (_rank(b) or 0):
            rest, factor = b, a
        else:
            break
        const = constant_array(factor)
        if const is not None:
            scale *= float(const.reshape(()))
        else:
            factors.append(factor)
        value = rest
    return value, scale, factors


# --- shape expressions: a 1-D int64 value as a list of dims, each an int or (value, axis) --------------------------

def _shape_terms(value: ir.Value) -> list | None:
    const = constant_array(value)
    if const is not None:
        return [int(x) for x in np.asarray(const).reshape(-1)]
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Concat":
        out = []
        for part in node.inputs:
            terms = _shape_terms(part) if part is not None else None
            if terms is None:
                return None
            out += terms
        return out
    if node.op_type == "Shape":
        return _shape_slice(node, 0, None)
    if node.op_type == "Slice" and len(node.inputs) >= 3:
        shape = node.inputs[0].producer() if node.inputs[0] is not None else None
        starts, ends = constant_array(node.inputs[1]), constant_array(node.inputs[2])
        steps = constant_array(node.inputs[4]) if len(node.inputs) > 4 else None
        axes = constant_array(node.inputs[3]) if len(node.inputs) > 3 else None
        if (shape is None or shape.op_type != "Shape" or starts is None or ends is None or starts.size != 1
                or (steps is not None and int(steps.reshape(-1)[0]) != 1)
                or (axes is not None and int(axes.reshape(-1)[0]) != 0)):
            return None
        dims = _shape_slice(shape, 0, None)
        if dims is None:
            return None
        start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
        return dims[slice(*slice(start, end).indices(len(dims))[:2])]
    if node.op_type in ("Unsqueeze", "Squeeze", "Identity", "Cast") and node.inputs[0] is not None:
        return _shape_terms(node.inputs[0])
    if node.op_type == "Gather" and node.inputs[0] is not None:
        dims, index = _shape_terms(node.inputs[0]), constant_array(node.inputs[1])
        if dims is None or index is None:
            return None
        return [dims[int(i)] for i in np.asarray(index).reshape(-1)]
    return None


def _shape_slice(shape_node: ir.Node, start: int, end: int | None) -> list | None:
    source = shape_node.inputs[0]
    rank = _rank(source) if source is not None else None
    if rank is None:
        return None
    a = shape_node.attributes
    lo = a["start"].value if "start" in a else 0
    hi = a["end"].value if "end" in a else rank
    return [(source, axis) for axis in range(rank)][slice(lo, hi)][start:end]


def _same_dim(term, value: ir.Value, axis: int) -> bool:
    if isinstance(term, tuple):
        return term[0] is value and term[1] == axis
    dim = value.shape.dims[axis] if value.shape is not None else None
    return isinstance(dim, int) and dim == term


def _dynamo_transposed(kt: ir.Value) -> ir.Value | None:
    """x when kt is ``Reshape(Transpose(Reshape(x, [-1, N, D]), [0, 2, 1]), [B, H, D, N])`` for x [B, H, N, D]."""
    outer = kt.producer()
    if outer is None or outer.op_type != "Reshape":
        return None
    mid = outer.inputs[0].producer()
    if mid is None or mid.op_type != "Transpose" or list(mid.attributes["perm"].value) != [0, 2, 1]:
        return None
    inner = mid.inputs[0].producer()
    if inner is None or inner.op_type != "Reshape":
        return None
    x = inner.inputs[0]
    rank = _rank(x)
    if rank is None or rank < 3:
        return None
    s1, s2 = _shape_terms(inner.inputs[1]), _shape_terms(outer.inputs[1])
    if s1 is None or s2 is None or len(s1) != 3 or len(s2) != rank:
        return None
    lead_ok = s1[0] == -1 or (rank == 3 and _same_dim(s1[0], x, 0))
    if not (lead_ok and _same_dim(s1[1], x, rank - 2) and _same_dim(s1[2], x, rank - 1)):
        return None
    want = list(range(rank - 2)) + [rank - 1, rank - 2]
    if not all(_same_dim(term, x, axis) for term, axis in zip(s2, want)):
        return None
    return x


def _key(kt: ir.Value) -> tuple[ir.Value, list[int] | None, float, list[ir.Value]] | None:
    """(source, perm, constant factor, other factors) such that k = Transpose(source, perm) (perm None: source)."""
    base, scale, factors = _strip_scalars(kt)
    node = base.producer()
    if node is not None and node.op_type == "Transpose" and "perm" in node.attributes:
        perm = list(node.attributes["perm"].value)
        perm[-2], perm[-1] = perm[-1], perm[-2]
        return node.inputs[0], None if perm == list(range(len(perm))) else perm, scale, factors
    x = _dynamo_transposed(base)
    if x is not None:
        return x, None, scale, factors
    rank = _rank(base)
    if rank is None or rank < 2:
        return None
    return base, list(range(rank - 2)) + [rank - 1, rank - 2], scale, factors


def _scores_node(node: ir.Node | None) -> bool:
    """A MatMul, or a Mul/Div of a MatMul by a constant scalar."""
    if node is None:
        return False
    if node.op_type == "MatMul":
        return True
    if node.op_type not in ("Mul", "Div") or any(i is None for i in node.inputs):
        return False
    a, b = node.inputs
    inner = a.producer()
    return _is_scalar(b) and constant_array(b) is not None and inner is not None and inner.op_type == "MatMul"


def _match(softmax: ir.Node) -> AttentionSite | None:
    x = softmax.inputs[0]
    rank = _rank(x)
    axis = softmax.attributes["axis"].value if "axis" in softmax.attributes else -1
    if rank is None or axis not in (-1, rank - 1) or rank < 2:
        return None
    out_uses = list(softmax.outputs[0].uses())
    if len(out_uses) != 1 or out_uses[0][0].op_type != "MatMul" or out_uses[0][1] != 0:
        return None
    output = out_uses[0][0]
    mask, scale = None, 1.0
    node = x.producer()
    if node is not None and node.op_type == "Add":
        a, b = node.inputs
        pa, pb = a.producer() if a is not None else None, b.producer() if b is not None else None
        # the scores: the side that is a MatMul, or a scaled one (a mask may itself be made by a Mul, e.g.
        # (1 - m) * -10000)
        if _scores_node(pa):
            node, mask = pa, b
        elif _scores_node(pb):
            node, mask = pb, a
        else:
            return None
        if len(list(node.outputs[0].uses())) != 1 or _rank(mask) is None or _rank(mask) > rank:
            return None
    if node is not None and node.op_type in ("Mul", "Div"):
        a, b = node.inputs
        const = constant_array(b) if b is not None and _is_scalar(b) else None
        if const is None or len(list(node.outputs[0].uses())) != 1:
            return None
        scale = 1.0 / float(const.reshape(())) if node.op_type == "Div" else float(const.reshape(()))
        node = a.producer()
    if node is None or node.op_type != "MatMul" or len(list(node.outputs[0].uses())) != 1:
        return None
    q, q_scale, q_factors = _strip_scalars(node.inputs[0])
    key = _key(node.inputs[1])
    v = output.inputs[1]
    if key is None or _rank(q) != rank or _rank(v) != rank:
        return None
    k_source, k_perm, k_scale, k_factors = key
    k_rank = len(k_perm) if k_perm is not None else _rank(k_source)
    if k_rank != rank:
        return None
    return AttentionSite(softmax, output, q, q_factors + k_factors, k_source, k_perm, v, mask,
                         scale * q_scale * k_scale)


def _head_split(value: ir.Value) -> ir.Value | None:
    """x when value is ``Transpose(x, [0, 2, 1, 3])``."""
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and list(node.attributes["perm"].value) == [0, 2, 1, 3]:
        return node.inputs[0]
    return None


def _to_bnhd(site: AttentionSite) -> None:
    """Read q, k, v before their head splits and write y before its head merge, when all four are there."""
    uses = list(site.output.outputs[0].uses())
    merge = uses[0][0] if len(uses) == 1 else None
    if merge is None or merge.op_type != "Transpose" or list(merge.attributes["perm"].value) != [0, 2, 1, 3]:
        return
    q, v = _head_split(site.q), _head_split(site.v)
    if site.k_perm == [0, 2, 1, 3]:
        k = site.k_source
    else:
        k = _head_split(site.k_source) if site.k_perm is None else None
    if q is None or k is None or v is None:
        return
    site.q, site.k_source, site.k_perm, site.v = q, k, None, v
    site.layout, site.merge = BNHD, merge


def find_attention(graph: ir.Graph) -> AttentionScan:
    """Every Softmax of the graph's top level: the attentions the pass replaces, and the others."""
    sites, unrecognised = [], []
    for node in graph:
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            site = _match(node)
            if site is not None:
                _to_bnhd(site)
            (sites if site is not None else unrecognised).append(site if site is not None else node)
    return AttentionScan(sites, unrecognised)


class FuseAttentionPass(ir.passes.InPlacePass):
    """Replace every recognised softmax attention by ``hadanorm::Attention`` computed at `precision`."""

    def __init__(self, precision: AttentionPrecision):
        super().__init__()
        self.precision = precision

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        scan = find_attention(graph)
        replaced_by: dict[int, ir.Value] = {}  # id(output of a rewritten attention) -> the Attention node's output

        def current(value: ir.Value | None) -> ir.Value | None:
            """A value a site recorded, or what replaced it when an earlier site's output was rewritten (an
            attention whose q, k or v is the previous attention's output)."""
            return replaced_by.get(id(value), value) if value is not None else None

        for i, site in enumerate(scan.sites):
            prefix = f"attention.{i}"
            new_nodes: list[ir.Node] = []
            q = current(site.q)
            for j, factor in enumerate(map(current, site.q_factors)):
                mul = ir.Node("", "Mul", [q, factor], name=f"{prefix}.q_factor{j}_Mul")
                mul.outputs[0].name = f"{prefix}.q_factor{j}"
                new_nodes.append(mul)
                q = mul.outputs[0]
            k = current(site.k_source)
            if site.k_perm is not None:
                transpose = ir.Node("", "Transpose", [k], attributes=[ir.AttrInt64s("perm", site.k_perm)],
                                    name=f"{prefix}.k_Transpose")
                transpose.outputs[0].name = f"{prefix}.k"
                new_nodes.append(transpose)
                k = transpose.outputs[0]
            node = attention_node(q, k, current(site.v), current(site.mask), site.scale, self.precision,
                                  f"{prefix}_Attention", site.layout)
            new_nodes.append(node)
            graph.insert_before(site.output, new_nodes)
            replaced = site.merge if site.merge is not None else site.output
            redirect_uses(replaced.outputs[0], node.outputs[0])
            replaced_by[id(replaced.outputs[0])] = node.outputs[0]
            ensure_function(model, AttentionForm(site.mask is not None, site.layout))
        if scan.sites:
            logger.info("fused %d softmax attentions (%s); %d softmax left as they are", len(scan.sites),
                        self.precision.value, len(scan.unrecognised))
        return ir.passes.PassResult(model, modified=bool(scan.sites))

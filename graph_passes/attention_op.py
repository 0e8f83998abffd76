"""The fused attention op of the ``hadanorm`` domain, with an ONNX function body (its original maths).

    Attention(q [..., Nq, D], k [..., Nk, D], v [..., Nk, Dv][, mask])  ->  softmax(scale * q k^T + mask) v

``scale`` (float) and ``precision`` (``float`` | ``bf16`` | ``int8`` | ``fast``, how the kernel library computes it)
are attributes;
``layout`` ``bnhd`` takes q, k, v as ``[B, N, H, D]`` and gives y as ``[B, Nq, H, Dv]`` (the heads not split off
the tokens: no head transposes around the op; the mask still broadcasts to ``[B, H, Nq, Nk]``). The
function body is the float maths, MatMul -> Softmax -> MatMul, so stock onnxruntime runs the file (holding the
N x N scores); the kernel library (`runtime/kernels/attention.h`) computes it tiled, flash-attention style, never
holding more than one key block of scores per query row. ``mask`` (additive, broadcastable to
``[..., Nq, Nk]``) is optional. One function overload per form: ``""``, ``masked``, ``bnhd``, ``bnhd-masked``.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import onnx_ir as ir

from graph_passes.domain import HADANORM_DOMAIN
from graph_passes.function_ops import FunctionBody

OP_TYPE = "Attention"


class AttentionPrecision(enum.Enum):
    """How the kernel library computes a fused attention: fp32 throughout (the exact op); bf16 operands with fp32
    sums (AMX bf16 tiles where the CPU has them); or int8, HadaNorm's transform on attention (keys centered, queries
    and keys rotated by a block Hadamard, int8 per row; values centered, int8 per channel; p in unsigned 8 bits;
    exact int32 sums on AVX512-VNNI: `runtime/kernels/attention_int8.h`); or fast, chosen by the CPU that runs the
    graph: bf16 on AMX tiles, int8 on AVX512-VNNI without them, float elsewhere (the fastest of each, measured:
    `benchmarks/attention.md`)."""

    FLOAT = "float"
    BF16 = "bf16"
    INT8 = "int8"
    FAST = "fast"


BHND, BNHD = "bhnd", "bnhd"
_HEADS = [0, 2, 1, 3]  # bnhd <-> bhnd


def overload(masked: bool, layout: str) -> str:
    return "-".join(part for part in ("bnhd" if layout == BNHD else "", "masked" if masked else "") if part)


def build_function(masked: bool, layout: str = BHND) -> ir.Function:
    inputs = [ir.Value(name=name) for name in ("q", "k", "v", "mask")[: 4 if masked else 3]]
    body = FunctionBody()
    q, k, v = inputs[:3]
    if layout == BNHD:
        q, k, v = (body.op("Transpose", [x], perm=_HEADS) for x in (q, k, v))
    scale = body.op("CastLike", [body.ref_constant("value_float", "scale", ir.AttributeType.FLOAT), q])
    scores = body.op("Mul", [body.op("Einsum", [q, k], equation="...qd,...kd->...qk"), scale])
    if masked:
        scores = body.op("Add", [scores, inputs[3]])
    y = body.op("MatMul", [body.op("Softmax", [scores], axis=-1), v])
    if layout == BNHD:
        y = body.op("Transpose", [y], perm=_HEADS)
    attributes = [ir.Attr("scale", ir.AttributeType.FLOAT, 1.0),
                  ir.Attr("precision", ir.AttributeType.STRING, AttentionPrecision.FLOAT.value),
                  ir.Attr("layout", ir.AttributeType.STRING, layout)]
    return body.function(OP_TYPE, inputs, [y], ("y",), overload(masked, layout), attributes)


@dataclasses.dataclass(frozen=True)
class AttentionForm:
    """One form of the op (`graph_passes.function_ops.OpSpec`): masked or not, in either layout."""

    masked: bool
    layout: str = BHND
    op_type = OP_TYPE

    @property
    def overload(self) -> str:
        return overload(self.masked, self.layout)

    def function(self) -> ir.Function:
        return build_function(self.masked, self.layout)


def attention_node(q: ir.Value, k: ir.Value, v: ir.Value, mask: ir.Value | None, scale: float,
                   precision: AttentionPrecision, name: str, layout: str = BHND) -> ir.Node:
    node = ir.Node(HADANORM_DOMAIN, OP_TYPE, [q, k, v] + ([mask] if mask is not None else []),
                   attributes=[ir.AttrFloat32("scale", float(np.float32(scale))),
                               ir.AttrString("precision", precision.value), ir.AttrString("layout", layout)],
                   overload=overload(mask is not None, layout), name=name)
    node.outputs[0].name = f"{name}_out"
    return node


def fused_attentions(graph: ir.Graph) -> list[ir.Node]:
    """The graph's ``hadanorm::Attention`` nodes (top level)."""
    return [n for n in graph if n.domain == HADANORM_DOMAIN and n.op_type == OP_TYPE]


def attention_precisions(graph: ir.Graph) -> str:
    """The precisions of the graph's fused attentions, e.g. ``bf16`` (comma list when they differ), or ``none``:
    what the model metadata says and reports print (read from the nodes, whatever made them)."""
    found = sorted({n.attributes["precision"].value for n in fused_attentions(graph)})
    return ",".join(found) if found else "none"


"""`graph_passes.emit_fused.FusedEmitter`: the ``fused`` format (``hadanorm::<Transform>Quantize`` +
``IntMatMul4/8``, the bias and the float-token / exact mean correction folded into the IntMatMul's bias; HQ-DM's
int8 weight parts; static quantizers and k x k convs written as in ``qdq``).

Runs on stock onnxruntime through the ops' ONNX function bodies (no kernel library here). Numbers: the fused graph
computes what the qdq graph of the same plans computes (the same integers, the quantize op's body the same float
ops): relative L2 <= 1e-5, the README's bound for fused vs qdq; measured 0 to 2.3e-7 (HQ-DM's integer form sums in
another order). And the SQNR against the float graph at least `predicted_sqnr_db` - 1 dB (see test_emit_qdq.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.emit_fused import FusedEmitter
from graph_passes.emit_qdq import QdqEmitter
from graph_passes.errors import GraphInputError
from graph_passes.int_packing import PackedWeight, unpack_codes
from graph_passes.methods import BiasCorrection, Method
from graph_passes.quantization import QuantConfig
from graph_passes.static_act_quant import ActScaleTable
from tests.passes._helpers import (TWO_GROUPS, check, conv3x3, linear, op_counts, ops, parse_model, plans,
                                   predicted_sqnr_db, rel_l2, run, sqnr_db, tokens, two_sites_on_x)

HN = "hadanorm"
FUSED_VS_QDQ = 1e-5
SQNR_MARGIN_DB = 1.0
W4A4 = QuantConfig(4, 4, weight_block=16)


def only(graph: ir.Graph, op_type: str, domain: str = HN) -> ir.Node:
    found = ops(graph, op_type, domain)
    assert len(found) == 1, (op_type, len(found))
    return found[0]


def no_float_linears(graph: ir.Graph) -> bool:
    return not [n for n in graph if n.op_type in ("MatMul", "QuantizeLinear", "DequantizeLinear")]


def test_structure_hadanorm_float_token():
    model, _, b = linear(72, 64)
    site_plans = plans(model, {"x": tokens(72)}, W4A4)
    assert FusedEmitter(site_plans)(model).modified
    check(model)
    graph = model.graph
    assert no_float_linears(graph) and not [n for n in graph if n.name in ("lin", "lin_bias")]
    quantize = only(graph, "CenterScaleRotateQuantize")
    assert quantize.attributes["bits"].as_int() == 4 and len(quantize.outputs) == 4  # codes, scale, zp, mu~
    assert [v.name for v in quantize.inputs] == ["x", "lin.mul", "lin.h_left", "lin.h_right"]
    matmul = only(graph, "IntMatMul4")
    assert matmul.name == "lin.IntMatMul4" and matmul.attributes["block_size"].as_int() == 16
    assert list(matmul.inputs[:3]) == list(quantize.outputs[:3])
    assert [v.name for v in matmul.inputs[3:6]] == ["wt.q4.packed4", "wt.q4.scales", "wt.q4.zero_points"]
    assert matmul.outputs[0] is graph.outputs[0] and graph.outputs[0].name == "y"  # the bias Add folded in
    bias = matmul.inputs[6].producer()  # bias' = mu~ W~^T + b
    assert bias.op_type == "Add" and bias.inputs[1] is graph.initializers["b"]
    correction = bias.inputs[0].producer()
    assert correction.op_type == "FloatMatMul4" and correction.inputs[0] is quantize.outputs[3]
    assert list(correction.inputs[1:]) == list(matmul.inputs[3:6])  # the same packed weight
    assert {(f.domain, f.name) for f in model.functions.values()} == {
        (HN, "CenterScaleRotateQuantize"), (HN, "IntMatMul4"), (HN, "FloatMatMul4")}
    # the packed weight holds the plan's integers (unsigned nibbles, zero point 8)
    qw = site_plans[0].linears[0].weight.quantized
    packed = PackedWeight(*(graph.initializers[f"wt.q4.{s}"].const_value.numpy()
                            for s in ("packed4", "scales", "zero_points")), 4, 16, 72, 64)
    assert np.array_equal(unpack_codes(packed) - 8, qw.q.astype(np.int64)) and np.array_equal(packed.scales, qw.scale)


@pytest.mark.parametrize("bits", [4, 8])
def test_structure_without_transform(bits):
    model, _, _ = linear(72, 64)
    FusedEmitter(plans(model, {"x": tokens(72)}, QuantConfig(bits, bits, weight_block=16), method=Method.NONE))(model)
    check(model)
    graph = model.graph
    quantize = only(graph, "Quantize")
    assert len(quantize.outputs) == 3 and quantize.inputs[0] is graph.inputs[0]
    matmul = only(graph, f"IntMatMul{bits}")
    assert matmul.inputs[6] is graph.initializers["b"]  # the bias, nothing to add to it
    assert no_float_linears(graph)


@pytest.mark.parametrize("bias", [BiasCorrection.QUANTIZED_TOKEN, BiasCorrection.EXACT])
def test_structure_other_bias_corrections(bias):
    model, _, _ = linear(72, 64)
    FusedEmitter(plans(model, {"x": tokens(72)}, W4A4, bias=bias))(model)
    check(model)
    graph = model.graph
    matmul = only(graph, "IntMatMul4")
    if bias is BiasCorrection.QUANTIZED_TOKEN:  # transform, [x~; mu~], Quantize; y[:N] + y[N:], then the bias
        transform = only(graph, "CenterScaleRotate")
        quantize = only(graph, "Quantize")
        assert quantize.inputs[0].producer().op_type == "Concat"
        assert quantize.inputs[0].producer().inputs[1] is transform.outputs[1]
        assert matmul.inputs[6].name.startswith("hadanorm.zeros64")
        assert op_counts(graph)["", "Slice"] == 2
        assert next(n for n in graph if n.name == "lin_bias").op_type == "Add"  # the bias Add stays
    else:  # mu~ times the int8 per-channel copy, packed as one 8-bit block
        correction = only(graph, "FloatMatMul8")
        assert correction.inputs[1].name == "wt.q8.packed8" and correction.attributes["block_size"].as_int() == 72
        assert matmul.inputs[6].producer().inputs[0] is correction.outputs[0]


def test_structure_hqdm_integer_parts():
    """HQ-DM: ``Q(x R^T) (R_raw W_int^T)`` as int8 parts of the exact integer product, one IntMatMul8 each."""
    model, _, _ = linear(64, 48)
    site_plans = plans(model, {"x": tokens(64)}, QuantConfig(4, 4, weight_block=32), method=Method.HQDM,
                       hadamard_block=32)
    FusedEmitter(site_plans)(model)
    check(model)
    graph = model.graph
    quantize = only(graph, "ScaleRotateQuantize")
    parts = ops(graph, "IntMatMul8", HN)
    assert [p.name for p in parts] == ["lin.part0.IntMatMul8", "lin.part1.IntMatMul8"]  # |M| <= 32 * 7 > 63
    assert all(list(p.inputs[:3]) == list(quantize.outputs[:3]) for p in parts)
    assert [p.inputs[3].name for p in parts] == ["wt.q4.hqdm_part0", "wt.q4.hqdm_part1"]
    assert only(graph, "Add", "").inputs == (parts[0].outputs[0], parts[1].outputs[0])
    assert no_float_linears(graph)


def test_sites_without_a_transform_share_the_quantize_op():
    model = two_sites_on_x()
    FusedEmitter(plans(model, {"x": tokens(72)}, W4A4, method=Method.NONE, selection=TWO_GROUPS))(model)
    quantize = only(model.graph, "Quantize")
    matmuls = ops(model.graph, "IntMatMul4", HN)
    assert len(matmuls) == 3 and all(m.inputs[0] is quantize.outputs[0] for m in matmuls)


def test_static_quantizers_and_kxk_convs_are_written_as_in_qdq():
    _, wt, b = linear(72, 64)
    model = parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[B, N, 72] x, float[B] t) => (float[B, N, 64] y) {
          [lin] mm = MatMul(x, wt)
          [lin_bias] y = Add(mm, b)
        }""", {"wt": wt, "b": b})
    table = ActScaleTable("t", np.array([1.0, 0.0]), {"lin": np.array([3.0, 5.0])})
    FusedEmitter(plans(model, {"x": tokens(72)}, W4A4, act_scales=table))(model)
    graph = model.graph
    assert not [n for n in graph if n.domain == HN and "MatMul" in n.op_type]
    assert len(ops(graph, "QuantizeLinear")) == 1 and len(ops(graph, "MatMul")) == 2  # the linear + mu~ W~^T
    conv, _, _, x = conv3x3()
    FusedEmitter(plans(conv, {"x": x}, W4A4, method=Method.NONE))(conv)
    check(conv)
    assert len(ops(conv.graph, "Conv")) == 1 and len(ops(conv.graph, "QuantizeLinear")) == 1
    assert not [n for n in conv.graph if n.domain == HN]


CASES = [(Method.NONE, BiasCorrection.FLOAT_TOKEN, 72, 8), (Method.QUAROT, BiasCorrection.FLOAT_TOKEN, 72, 8),
         (Method.HADANORM, BiasCorrection.FLOAT_TOKEN, 72, 8),
         (Method.HADANORM, BiasCorrection.QUANTIZED_TOKEN, 72, 8),
         (Method.HADANORM, BiasCorrection.EXACT, 72, 8), (Method.HQDM, BiasCorrection.FLOAT_TOKEN, 64, 32)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method,bias,width,hadamard", CASES, ids=[f"{m.value}-{b.value}" for m, b, _, _ in CASES])
def test_computes_what_qdq_computes(method, bias, width, hadamard, bits):
    x = tokens(width, outliers=method is not Method.NONE)
    config = QuantConfig(bits, bits, weight_block=32 if method is Method.HQDM else 16)
    reference = run(linear(width, 48)[0], {"x": x})[0]
    qdq, _, _ = linear(width, 48)
    qdq_plans = plans(qdq, {"x": x}, config, method=method, bias=bias, hadamard_block=hadamard)
    predicted = predicted_sqnr_db(x, qdq_plans[0], reference)
    QdqEmitter(qdq_plans)(qdq)
    fused, _, _ = linear(width, 48)
    FusedEmitter(plans(fused, {"x": x}, config, method=method, bias=bias, hadamard_block=hadamard))(fused)
    got = run(fused, {"x": x})[0]
    assert rel_l2(got, run(qdq, {"x": x})[0]) <= FUSED_VS_QDQ
    assert sqnr_db(got, reference) >= predicted - SQNR_MARGIN_DB


def test_refuses_hqdm_hadamard_wider_than_the_weight_block():
    model, _, _ = linear(64, 48)
    site_plans = plans(model, {"x": tokens(64)}, W4A4, method=Method.HQDM, hadamard_block=32)
    with pytest.raises(GraphInputError, match=r"^--method hqdm --format fused: the Hadamard mixes 32 input channels "
                                              r"but the weight blocks hold 16; use --hadamard block with a block that "
                                              r"divides --weight-block, or per-channel weights \(--weight-block at "
                                              r"least the width\)$"):
        FusedEmitter(site_plans)(model)


def test_requires_plans_of_this_graph():
    site_plans = plans(linear(72, 64)[0], {"x": tokens(72)}, W4A4)
    with pytest.raises(ir.passes.PreconditionError, match="^the plan of site lin was made for another graph$"):
        FusedEmitter(site_plans)(linear(72, 64)[0])

"""`graph_passes.emit_nbits.NBitsEmitter`: every MatMul linear as stock onnxruntime's ``com.microsoft::MatMulNBits``
reading the ``qdq`` format's A-bit activation, with the plan's integers packed (4-bit: two codes a byte).

Numbers: MatMulNBits (``accuracy_level`` 4) re-quantizes the A-bit activation rows to int8 per block inside, a second
and finer rounding, so the graph is not the qdq graph bit for bit. Bounds: at W4A4 the SQNR against the float graph
is at least `predicted_sqnr_db` - 1 dB (the qdq format's band, see test_emit_qdq.py), and the distance to the qdq
graph is at most a quarter of the qdq graph's own error (the README's stated bound; measured 0.03 to 0.06 here).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.emit_nbits import MS_DOMAIN, NBitsEmitter
from graph_passes.emit_qdq import QdqEmitter
from graph_passes.methods import BiasCorrection, Method
from graph_passes.quantization import QuantConfig
from tests.passes._helpers import (check, conv3x3, linear, op_counts, ops, plans, predicted_sqnr_db,
                                   rel_l2, run, sqnr_db, tokens)

SQNR_MARGIN_DB = 1.0
REQUANTIZATION_SHARE = 0.25


def nbits_node(model: ir.Model) -> ir.Node:
    found = ops(model.graph, "MatMulNBits", MS_DOMAIN)
    assert len(found) == 1
    return found[0]


def unpack(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits' ``B`` [N, k_blocks, bytes] -> unsigned codes [K, N] (4 bits: low nibble first)."""
    b = b.astype(np.int64)
    n = b.shape[0]
    codes = np.stack([b & 15, b >> 4], axis=-1).reshape(n, -1) if bits == 4 else b.reshape(n, -1)
    return codes.T[:k]


@pytest.mark.parametrize("weight_bits,block,packed_block", [(4, 16, 16), (4, 128, 128), (6, 16, 16)])
def test_structure(weight_bits, block, packed_block):
    """4-bit weights in blocks of 16; one block of all 72 rows (padded to 128 with the zero point); 6-bit weights
    in the 8-bit container."""
    model, _, _ = linear(72, 64)
    x = tokens(72)
    site_plans = plans(model, {"x": x}, QuantConfig(weight_bits, 4, weight_block=block), method=Method.NONE)
    assert NBitsEmitter(site_plans)(model).modified
    check(model)
    graph = model.graph
    node = nbits_node(model)
    container = 4 if weight_bits <= 4 else 8
    assert {k: a.value for k, a in node.attributes.items()} == {
        "K": 72, "N": 64, "bits": container, "block_size": packed_block, "accuracy_level": 4}
    assert node.name == "lin.nbits" and model.opset_imports[MS_DOMAIN] == 1
    assert not [n for n in graph if n.name == "lin"] and not ops(graph, "MatMul")  # the MatMul is gone
    assert node.inputs[0].producer().op_type == "DequantizeLinear"  # the A-bit activation QDQ
    assert next(n for n in graph if n.name == "lin_bias").inputs[0] is node.outputs[0]  # the bias stays an Add
    b, scales = (v.const_value.numpy() for v in node.inputs[1:])
    k_blocks = -(-72 // packed_block)
    assert len(node.inputs) == 3  # symmetric: no zero points (MatMulNBits' default 8 / 128)
    assert b.dtype == np.uint8 and b.shape == (64, k_blocks, packed_block * container // 8)
    qw = site_plans[0].linears[0].weight.quantized
    offset = 8 if container == 4 else 128
    codes = unpack(b, container, k_blocks * packed_block)
    assert np.array_equal(codes[:72] - offset, qw.q.astype(np.int64))
    assert np.all(codes[72:] == offset)  # padding rows hold the zero point
    assert np.array_equal(scales, qw.scale.T)


def test_asymmetric_weights_pack_their_zero_points():
    model, _, _ = linear(72, 64)
    site_plans = plans(model, {"x": tokens(72)}, QuantConfig(4, 4, weight_block=16, weight_symmetric=False),
                       method=Method.NONE)
    NBitsEmitter(site_plans)(model)
    node = nbits_node(model)
    zero_points = node.inputs[3].const_value.numpy()
    assert node.inputs[3].name == "wt.q4.nbits_zero_points" and zero_points.shape == (64, 3)  # 5 blocks, 2 a byte
    want = site_plans[0].linears[0].weight.quantized.zero_point.astype(np.int64).T
    got = np.stack([zero_points & 15, zero_points >> 4], axis=-1).reshape(64, -1)
    assert np.array_equal(got[:, :5], want) and np.all(got[:, 5] == 8)


@pytest.mark.parametrize("bias", list(BiasCorrection))
def test_bias_correction_structure(bias):
    model, _, _ = linear(72, 64)
    NBitsEmitter(plans(model, {"x": tokens(72)}, QuantConfig(4, 4, weight_block=16), bias=bias))(model)
    check(model)
    graph = model.graph
    node, counts = nbits_node(model), op_counts(graph)
    transform = ops(graph, "CenterScaleRotate", "hadanorm")[0]
    if bias is BiasCorrection.FLOAT_TOKEN:  # mu~ is one more row of the same MatMulNBits
        concat = node.inputs[0].producer()
        assert concat.op_type == "Concat" and concat.attributes["axis"].as_int() == -2
        assert concat.inputs[1] is transform.outputs[1]
        assert next(n for n in graph if n.name == "lin.mean_row").inputs[0] is node.outputs[0]
        assert (counts["", "Slice"], counts["", "MatMul"]) == (2, 0)
    elif bias is BiasCorrection.EXACT:  # mu~ times the int8 per-channel copy, a float MatMul
        mean_matmul = ops(graph, "MatMul")[0]
        assert mean_matmul.inputs[0] is transform.outputs[1]
        assert mean_matmul.inputs[1].producer().inputs[0].name == "wt.q8"
        assert counts["", "Slice"] == 0
    else:  # [x~; mu~] quantized together, y[:N] + y[N:]
        assert ops(graph, "QuantizeLinear")[0].inputs[0].producer().op_type == "Concat"
        assert (counts["", "Slice"], counts["", "MatMul"]) == (2, 0)


CASES = [(Method.NONE, BiasCorrection.FLOAT_TOKEN, False), (Method.HADANORM, BiasCorrection.FLOAT_TOKEN, True),
         (Method.HADANORM, BiasCorrection.QUANTIZED_TOKEN, True), (Method.HADANORM, BiasCorrection.EXACT, True),
         (Method.HQDM, BiasCorrection.FLOAT_TOKEN, True)]


@pytest.mark.parametrize("method,bias,outliers", CASES, ids=[f"{m.value}-{b.value}" for m, b, _ in CASES])
def test_w4a4_numbers(method, bias, outliers):
    x = tokens(72, outliers=outliers)
    config = QuantConfig(4, 4, weight_block=16)
    reference_model, _, _ = linear(72, 64)
    reference = run(reference_model, {"x": x})[0]
    qdq, _, _ = linear(72, 64)
    qdq_plans = plans(qdq, {"x": x}, config, method=method, bias=bias)
    predicted = predicted_sqnr_db(x, qdq_plans[0], reference)
    QdqEmitter(qdq_plans)(qdq)
    nbits, _, _ = linear(72, 64)
    NBitsEmitter(plans(nbits, {"x": x}, config, method=method, bias=bias))(nbits)
    want, got = run(qdq, {"x": x})[0], run(nbits, {"x": x})[0]
    assert sqnr_db(got, reference) >= predicted - SQNR_MARGIN_DB
    assert rel_l2(got, want) <= REQUANTIZATION_SHARE * rel_l2(want, reference)


def test_kxk_conv_is_written_as_in_qdq():
    model, _, _, x = conv3x3()
    NBitsEmitter(plans(model, {"x": x}, QuantConfig(4, 4, weight_block=16), method=Method.NONE))(model)
    check(model)
    assert not ops(model.graph, "MatMulNBits", MS_DOMAIN) and len(ops(model.graph, "Conv")) == 1
    assert len(ops(model.graph, "QuantizeLinear")) == 1


@pytest.mark.parametrize("block", [24, 8])
def test_refuses_weight_blocks_matmulnbits_cannot_hold(block):
    model, _, _ = linear(72, 64)
    site_plans = plans(model, {"x": tokens(72)}, QuantConfig(4, 4, weight_block=block))
    with pytest.raises(ValueError, match=rf"^--format nbits needs a power-of-two weight block >= 16, got {block}; "
                                         "use --weight-block 128$"):
        NBitsEmitter(site_plans)(model)


def test_requires_plans_of_this_graph():
    site_plans = plans(linear(72, 64)[0], {"x": tokens(72)}, QuantConfig(4, 4, weight_block=16))
    with pytest.raises(ir.passes.PreconditionError, match="^the plan of site lin was made for another graph$"):
        NBitsEmitter(site_plans)(linear(72, 64)[0])

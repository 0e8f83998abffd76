"""`graph_passes.emit_qdq.QdqEmitter`: the ``qdq`` format (per-token QDQ activations, blocked INT-b
``DequantizeLinear`` weights; static per-timestep quantizers; k x k conv kernels).

Numbers, two checks:

* against numpy: without a transform the graph computes ``Q(x) dequant(q) + b`` with the numpy per-token quantizer
  `per_token_qdq` and the plan's own integers: relative L2 <= 1e-6 (measured 0.9e-7 to 1.8e-7: float32 rounding;
  one flipped activation code alone would move the output by ~1e-3);
* SQNR against the float graph within 1 dB of `predicted_sqnr_db` (the uniform-noise model of a b-bit per-token
  activation quantizer plus the plan's exact weight error; measured -0.6 to +0.3 dB from it at 3 to 8 bits with a
  rotation, where the model's assumption, many levels across a Gaussian-like token, holds). One bit is 6 dB, so the
  band also proves the quantizer runs at the planned width.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.emit_fused import FusedEmitter
from graph_passes.emit_nbits import NBitsEmitter
from graph_passes.emit_qdq import QdqEmitter
from graph_passes.errors import GraphInputError
from graph_passes.methods import BiasCorrection, Method
from graph_passes.quantization import QuantConfig
from graph_passes.static_act_quant import ActScaleTable
from tests.passes._helpers import (CONV3X3_TEXT, TWO_GROUPS, check, conv3x3, linear, op_counts, ops, parse_model,
                                   per_token_qdq, plans, predicted_sqnr_db, rel_l2, run, sqnr_db, tokens,
                                   two_sites_on_x)

SQNR_BAND_DB = 1.0
NUMPY_TOLERANCE = 1e-6


def quant(bits: int, **kwargs) -> QuantConfig:
    return QuantConfig(bits, bits, weight_block=16, **kwargs)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_structure(bits):
    model, _, _ = linear(72, 64)
    x = tokens(72)
    site_plans = plans(model, {"x": x}, quant(bits), method=Method.NONE)
    assert QdqEmitter(site_plans)(model).modified
    check(model)
    graph = model.graph
    lin = next(n for n in graph if n.name == "lin")
    # the activation: per-token QDQ (one block of the whole width per token), zero point in the unsigned container
    act = [n for n in graph if n.name.startswith("lin.act_q.")]
    assert len(act) == (14 if bits in (4, 8) else 20)  # 3 bits: a per-token clip first (the container holds 4)
    q, dq = ops(graph, "QuantizeLinear"), [n for n in ops(graph, "DequantizeLinear") if n in act]
    assert len(q) == len(dq) == 1 and lin.inputs[0] is dq[0].outputs[0]
    assert (q[0].attributes["axis"].as_int(), q[0].attributes["block_size"].as_int()) == (-1, 72)
    zero_point = q[0].inputs[2].producer()
    assert zero_point.op_type == "Cast"
    assert zero_point.attributes["to"].as_int() == (ir.DataType.UINT4 if bits <= 4 else ir.DataType.UINT8)
    # the weight: the plan's integers, DequantizeLinear along the input axis in blocks of 16 rows
    w_dq = lin.inputs[1].producer()
    assert w_dq.op_type == "DequantizeLinear" and w_dq.name == f"wt.q{bits}.dq"
    assert (w_dq.attributes["axis"].as_int(), w_dq.attributes["block_size"].as_int()) == (0, 16)
    codes, scale = w_dq.inputs
    assert (codes.name, scale.name) == (f"wt.q{bits}", f"wt.q{bits}.scale")
    assert codes.dtype == (ir.DataType.INT4 if bits <= 4 else ir.DataType.INT8)
    plan_weight = site_plans[0].linears[0].weight.quantized
    assert np.array_equal(codes.const_value.numpy(), plan_weight.q) and scale.shape == ir.Shape([5, 64])
    assert np.array_equal(scale.const_value.numpy(), plan_weight.scale)
    assert not list(graph.initializers["wt"].uses())  # the float weight is left for the clean-up passes
    assert next(n for n in graph if n.name == "lin_bias").inputs[0] is lin.outputs[0]


def test_asymmetric_weights_carry_zero_points():
    model, _, _ = linear(72, 64)
    x = tokens(72)
    QdqEmitter(plans(model, {"x": x}, quant(4, weight_symmetric=False), method=Method.NONE))(model)
    w_dq = next(n for n in model.graph if n.name == "lin").inputs[1].producer()
    assert [v.name for v in w_dq.inputs] == ["wt.q4", "wt.q4.scale", "wt.q4.zero_point"]
    assert w_dq.inputs[0].dtype == w_dq.inputs[2].dtype == ir.DataType.UINT4


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_equals_the_numpy_quantizer(bits):
    model, _, b = linear(72, 64)
    x = tokens(72)
    site_plans = plans(model, {"x": x}, quant(bits), method=Method.NONE)
    QdqEmitter(site_plans)(model)
    want = per_token_qdq(x, bits).astype(np.float64) @ site_plans[0].linears[0].weight.quantized.dequantize() + b
    assert rel_l2(run(model, {"x": x})[0], want) <= NUMPY_TOLERANCE


CASES = [(Method.NONE, BiasCorrection.FLOAT_TOKEN, False), (Method.QUAROT, BiasCorrection.FLOAT_TOKEN, True),
         (Method.HADANORM, BiasCorrection.FLOAT_TOKEN, True), (Method.HADANORM, BiasCorrection.QUANTIZED_TOKEN, True),
         (Method.HADANORM, BiasCorrection.EXACT, True), (Method.HQDM, BiasCorrection.FLOAT_TOKEN, True)]


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("method,bias,outliers", CASES, ids=[f"{m.value}-{b.value}" for m, b, _ in CASES])
def test_sqnr_is_the_one_of_the_bits(method, bias, outliers, bits):
    """Without a rotation the test data has no outlier channels (with them most of a token rounds to zero and
    the uniform model overestimates the noise: the SQNR is then higher, never lower)."""
    model, _, _ = linear(72, 64)
    x = tokens(72, outliers=outliers)
    reference = run(model, {"x": x})[0]
    site_plans = plans(model, {"x": x}, quant(bits), method=method, bias=bias)
    predicted = predicted_sqnr_db(x, site_plans[0], reference)
    QdqEmitter(site_plans)(model)
    measured = sqnr_db(run(model, {"x": x})[0], reference)
    assert abs(measured - predicted) <= SQNR_BAND_DB, (measured, predicted)


@pytest.mark.parametrize("bias", list(BiasCorrection))
def test_bias_correction_structure(bias):
    model, _, _ = linear(72, 64)
    x = tokens(72)
    QdqEmitter(plans(model, {"x": x}, quant(4), bias=bias))(model)
    check(model)
    graph = model.graph
    transform = ops(graph, "CenterScaleRotate", "hadanorm")[0]
    lin = next(n for n in graph if n.name == "lin")
    counts = op_counts(graph)
    if bias is BiasCorrection.QUANTIZED_TOKEN:  # the quantizer reads [x~; mu~]; y[:N] + y[N:]
        concat = ops(graph, "Concat")[0]
        assert [v.producer() for v in concat.inputs] == [transform, transform]
        assert ops(graph, "QuantizeLinear")[0].inputs[0] is concat.outputs[0]
        assert (counts["", "Slice"], counts["", "MatMul"]) == (2, 1)
        return
    mean_matmul = next(n for n in graph if n.name == "lin.0.mean_matmul")
    assert mean_matmul.inputs[0] is transform.outputs[1]  # mu~ stays float
    if bias is BiasCorrection.FLOAT_TOKEN:  # times the same dequantized weight
        assert mean_matmul.inputs[1] is lin.inputs[1]
    else:  # exact: an int8 per-output-channel copy
        q8 = mean_matmul.inputs[1].producer()
        assert q8.op_type == "DequantizeLinear" and q8.attributes["axis"].as_int() == 1
        assert q8.inputs[0].name == "wt.q8" and q8.inputs[0].dtype == ir.DataType.INT8
    assert (counts["", "Slice"], counts["", "MatMul"], counts["", "QuantizeLinear"]) == (0, 2, 1)


def test_sites_without_a_transform_share_their_activation_quantizer():
    model = two_sites_on_x()
    x = tokens(72)
    site_plans = plans(model, {"x": x}, quant(4), method=Method.NONE, selection=TWO_GROUPS)
    assert [p.name for p in site_plans] == ["blocks.0.a.in", "blocks.0.b.in"]
    QdqEmitter(site_plans)(model)
    dq = [n for n in ops(model.graph, "DequantizeLinear") if n.attributes["axis"].as_int() == -1]
    assert len(ops(model.graph, "QuantizeLinear")) == 1 and len(dq) == 1
    assert all(n.inputs[0] is dq[0].outputs[0] for n in ops(model.graph, "MatMul"))
    transformed = two_sites_on_x()
    QdqEmitter(plans(transformed, {"x": x}, quant(4), selection=TWO_GROUPS))(transformed)
    assert len(ops(transformed.graph, "QuantizeLinear")) == 2  # one per transform


# -- static per-timestep activation scales -----------------------------------------------------------------------

STEP_TEXT = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[B, N, 72] x, float[B] t) => (float[B, N, 64] y) {
      [lin] mm = MatMul(x, wt)
      [lin_bias] y = Add(mm, b)
    }"""
TIMESTEPS = np.array([999.0, 500.0, 0.0])


def step_model() -> tuple[ir.Model, np.ndarray]:
    _, wt, b = linear(72, 64)
    return parse_model(STEP_TEXT, {"wt": wt, "b": b}), b


def test_static_per_timestep_quantizer():
    model, b = step_model()
    x = tokens(72, outliers=False)
    absmax = np.array([4.0, 6.0, 8.0])
    table = ActScaleTable("t", TIMESTEPS, {"lin": absmax})
    site_plans = plans(model, {"x": x}, quant(4), method=Method.NONE, act_scales=table)
    assert np.allclose(site_plans[0].act.static.scales, absmax / 7)
    QdqEmitter(site_plans)(model)
    check(model)
    graph = model.graph
    assert not ops(graph, "ReduceMax") and len(ops(graph, "ArgMin")) == 1
    q = ops(graph, "QuantizeLinear")[0]
    assert q.inputs[0].producer().op_type == "Clip" and q.inputs[1].producer().op_type == "Gather"
    assert q.inputs[2].dtype == ir.DataType.INT4 and q.inputs[2].const_value.numpy() == 0
    weight = site_plans[0].linears[0].weight.quantized.dequantize()
    for t, k in ((990.0, 0), (480.0, 1), (3.0, 2)):  # the nearest table timestep picks the scale
        s = np.float32(absmax[k] / 7)
        x_q = np.clip(np.round(x / s), -7, 7) * s
        got = run(model, {"x": x, "t": np.full(2, t, np.float32)})[0]
        assert rel_l2(got, x_q.astype(np.float64) @ weight + b) <= NUMPY_TOLERANCE, t


def test_static_scales_need_the_timestep_input():
    model, _ = step_model()
    x = tokens(72)
    table = ActScaleTable("timestep", TIMESTEPS, {"lin": np.ones(3)})
    site_plans = plans(model, {"x": x}, quant(4), method=Method.NONE, act_scales=table)
    with pytest.raises(GraphInputError, match="^static per-timestep activation scales need the timestep input "
                                              "'timestep', which this graph does not have$"):
        QdqEmitter(site_plans)(model)


def test_static_scales_plan_needs_every_site():
    model, _ = step_model()
    table = ActScaleTable("t", TIMESTEPS, {"other": np.ones(3)})
    with pytest.raises(GraphInputError, match="^the activation scale table has no entry for site lin; "
                                              "recalibrate, or add the site to the table file$"):
        plans(model, {"x": tokens(72)}, quant(4), act_scales=table)


# -- k x k convolutions ------------------------------------------------------------------------------------------

def test_conv_kernel_is_dequantized_from_its_matrix():
    model, w, b, x = conv3x3()
    site_plans = plans(model, {"x": x}, quant(4), method=Method.NONE)
    weight = site_plans[0].linears[0].weight
    assert weight.layout == "conv" and weight.quantized.q.shape == (72, 16) and weight.quantized.block == 8 * 9
    QdqEmitter(site_plans)(model)
    check(model)
    conv = ops(model.graph, "Conv")[0]
    reshape = conv.inputs[1].producer()
    transpose = reshape.inputs[0].producer()
    assert reshape.op_type == "Reshape" and transpose.op_type == "Transpose"
    assert transpose.inputs[0].producer().op_type == "DequantizeLinear"
    # numbers: the original conv on the quantized pixels with the plan's dequantized kernel
    x_q = per_token_qdq(x.transpose(0, 2, 3, 1), 4).transpose(0, 3, 1, 2)
    kernel = weight.quantized.dequantize().T.reshape(16, 8, 3, 3).astype(np.float32)
    want = run(parse_model(CONV3X3_TEXT, {"w": kernel, "b": b}), {"x": x_q})[0]
    assert rel_l2(run(model, {"x": x})[0], want) <= NUMPY_TOLERANCE


# -- refusals ----------------------------------------------------------------------------------------------------

def test_requires_plans_of_this_graph():
    model, _, _ = linear(72, 64)
    site_plans = plans(model, {"x": tokens(72)}, quant(4))
    with pytest.raises(ir.passes.PreconditionError, match="^the plan of site lin was made for another graph$"):
        QdqEmitter(site_plans)(linear(72, 64)[0])


@pytest.mark.parametrize("emitter", [QdqEmitter, NBitsEmitter, FusedEmitter])
def test_requires_quantized_plans(emitter):
    model, _, _ = linear(72, 64)
    site_plans = plans(model, {"x": tokens(72)}, None)
    with pytest.raises(ir.passes.PreconditionError, match="lin"):
        emitter(site_plans)(model)

"""`graph_passes.gated_activation_quant.GatedEmitter`: every site's activation quantizer behind a runtime switch,
``x + m_i (QDQ(x) - x)`` with ``m`` the new graph input ``hn_quant_mask`` [S]; weights stay float.

Numbers: ``m = 0`` is the float graph (relative L2 <= 1e-5, as `TransformEmitter`); ``m = e_i`` quantizes site ``i``
alone and equals the numpy per-token quantizer `per_token_qdq` applied there (relative L2 <= 1e-6: float32 rounding,
measured ~1.5e-7; one flipped code would be ~1e-3); the switch is linear in ``m`` (``m = 1/2`` is the mean of the two
ends, 1e-6).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.gated_activation_quant import MASK_INPUT, GatedEmitter
from graph_passes.methods import Method
from tests.passes._helpers import check, linear, ops, parse_model, per_token_qdq, plans, rel_l2, run, tokens

FLOAT_TOLERANCE = 1e-5
NUMPY_TOLERANCE = 1e-6
BITS = 4

TWO_LINEARS = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[B, N, 72] x) => (float[B, N, 72] y) {
      [up] h = MatMul(x, w1)
      [up_bias] hb = Add(h, b1)
      r = Relu(hb)
      [down] y = MatMul(r, w2)
    }"""


def two_linears() -> tuple[ir.Model, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    inits = {"w1": (rng.standard_normal((72, 72)) / 9).astype(np.float32),
             "b1": rng.standard_normal(72).astype(np.float32),
             "w2": (rng.standard_normal((72, 72)) / 9).astype(np.float32)}
    return parse_model(TWO_LINEARS, inits), inits


def mask(*values: float) -> dict[str, np.ndarray]:
    return {MASK_INPUT: np.array(values, np.float32)}


def test_structure():
    model, _ = two_linears()
    x = tokens(72)
    site_plans = plans(model, {"x": x}, None, act_bits=BITS)
    assert [p.act.bits for p in site_plans] == [BITS, BITS]
    assert GatedEmitter(site_plans)(model).modified
    check(model)
    graph = model.graph
    assert graph.inputs[-1].name == MASK_INPUT and graph.inputs[-1].shape == ir.Shape([2])
    assert graph.inputs[-1].dtype == ir.DataType.FLOAT
    for i, name in enumerate(("up", "down")):
        matmul = next(n for n in graph if n.name == name)
        gated = matmul.inputs[0].producer()
        assert gated.op_type == "Add" and gated.name == f"{name}.gate.out"
        scaled = gated.inputs[1].producer()
        delta, gate = (v.producer() for v in scaled.inputs)
        assert gate.op_type == "Gather" and gate.inputs[0] is graph.inputs[-1]
        assert gate.inputs[1].const_value.numpy() == i
        assert delta.op_type == "Sub" and delta.inputs[0].producer().op_type == "DequantizeLinear"
        assert delta.inputs[1] is gated.inputs[0]  # x~, the transform's output
        assert gated.inputs[0].producer().op_type == "CenterScaleRotate"
        assert matmul.inputs[1].const_value.dtype == ir.DataType.FLOAT  # float weights (fused)
    assert len(ops(graph, "QuantizeLinear")) == 2 and len(ops(graph, "DequantizeLinear")) == 2


@pytest.mark.parametrize("method", [Method.NONE, Method.HADANORM])
def test_mask_zero_is_the_float_graph(method):
    model, _ = two_linears()
    x = tokens(72)
    expected = run(model, {"x": x})[0]
    GatedEmitter(plans(model, {"x": x}, None, method=method, act_bits=BITS))(model)
    assert rel_l2(run(model, {"x": x, **mask(0, 0)})[0], expected) <= FLOAT_TOLERANCE


def test_each_switch_quantizes_its_site_alone():
    model, inits = two_linears()
    x = tokens(72)
    probe, _ = two_linears()
    probe.graph.outputs.append(next(n for n in probe.graph if n.op_type == "Relu").outputs[0])
    r = run(probe, {"x": x})[1]  # the second site's input, as onnxruntime computes it
    GatedEmitter(plans(model, {"x": x}, None, method=Method.NONE, act_bits=BITS))(model)
    w1, b1, w2 = (inits[k].astype(np.float64) for k in ("w1", "b1", "w2"))
    first = np.maximum(per_token_qdq(x, BITS) @ w1 + b1, 0).astype(np.float32)
    cases = {(1, 0): first @ w2, (0, 1): per_token_qdq(r, BITS) @ w2,
             (1, 1): per_token_qdq(first, BITS) @ w2}
    for m, want in cases.items():
        assert rel_l2(run(model, {"x": x, **mask(*m)})[0], want) <= NUMPY_TOLERANCE, m


def test_switch_is_linear_in_the_mask():
    model, _, _ = linear(72, 64)
    x = tokens(72)
    GatedEmitter(plans(model, {"x": x}, None, act_bits=BITS))(model)
    off, on, half = (run(model, {"x": x, **mask(m)})[0] for m in (0.0, 1.0, 0.5))
    assert rel_l2(half, (off.astype(np.float64) + on) / 2) <= NUMPY_TOLERANCE
    assert rel_l2(on, off) > 1e-2  # the quantizer does something at 4 bits


def test_requires_plans_of_this_graph():
    site_plans = plans(linear(72, 64)[0], {"x": tokens(72)}, None, act_bits=BITS)
    with pytest.raises(ir.passes.PreconditionError, match="^the plan of site lin was made for another graph$"):
        GatedEmitter(site_plans)(linear(72, 64)[0])

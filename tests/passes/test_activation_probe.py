"""`graph_passes.activation_probe.ProbeEmitter`: the transformed float graph plus one output ``hn_probe.<i>`` per
site, ``max |a|`` over the tensor site ``i``'s activation quantizer would read (calibrating static scales).

Numbers: the original outputs are the float graph's (relative L2 <= 1e-5, as `TransformEmitter`); each probe equals
``max |a|`` of the numpy transform (`quantizer_input`) within a relative 1e-5 (one float32 element after a rotation
of 72 terms; measured below 1e-6).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.activation_probe import PROBE_PREFIX, ProbeEmitter, probe_name
from graph_passes.methods import BiasCorrection, Method
from tests.passes._helpers import check, linear, parse_model, plans, quantizer_input, rel_l2, run, tokens

TOLERANCE = 1e-5


def two_linears(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    return parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[B, N, 72] x) => (float[B, N, 72] y) {
          [up] h = MatMul(x, w1)
          r = Relu(h)
          [down] y = MatMul(r, w2)
        }""", {"w1": (rng.standard_normal((72, 72)) / 9).astype(np.float32),
               "w2": (rng.standard_normal((72, 72)) / 9).astype(np.float32)})


def test_one_probe_output_per_site_in_plan_order():
    model = two_linears()
    x = tokens(72)
    expected = run(model, {"x": x})[0]
    site_plans = plans(model, {"x": x}, None)
    assert ProbeEmitter(site_plans)(model).modified
    check(model)
    graph = model.graph
    assert [v.name for v in graph.outputs] == ["y", "hn_probe.0", "hn_probe.1"] and probe_name(1) == "hn_probe.1"
    transforms = [n for n in graph if n.op_type == "CenterScaleRotate"]
    for i, output in enumerate(graph.outputs[1:]):
        assert output.dtype == ir.DataType.FLOAT and output.shape == ir.Shape([])
        reduce = output.producer()
        assert reduce.op_type == "ReduceMax" and reduce.attributes["keepdims"].as_int() == 0
        cast = reduce.inputs[0].producer().inputs[0].producer()
        assert cast.op_type == "Cast" and cast.inputs[0] is transforms[i].outputs[0]  # x~ of site i
        assert all(n.name.startswith(f"{PROBE_PREFIX}.{i}.") for n in (reduce, cast))
    outs = run(model, {"x": x})
    assert rel_l2(outs[0], expected) <= TOLERANCE
    assert all(o > 0 for o in outs[1:])


CASES = [(Method.NONE, BiasCorrection.FLOAT_TOKEN), (Method.HADANORM, BiasCorrection.FLOAT_TOKEN),
         (Method.HADANORM, BiasCorrection.QUANTIZED_TOKEN), (Method.HQDM, BiasCorrection.FLOAT_TOKEN)]


@pytest.mark.parametrize("method,bias", CASES, ids=[f"{m.value}-{b.value}" for m, b in CASES])
def test_probe_is_max_abs_of_what_the_quantizer_reads(method, bias):
    """x (no transform), x~, [x~; mu~] (quantized-token), x R^T before HQ-DM's back rotation."""
    model, _, _ = linear(72, 64)
    x = tokens(72)
    expected = run(model, {"x": x})[0]
    site_plans = plans(model, {"x": x}, None, method=method, bias=bias)
    a, m = quantizer_input(x, site_plans[0])
    want = np.abs(a).max()
    if bias is BiasCorrection.QUANTIZED_TOKEN:
        want = max(want, np.abs(m - a).max())
    ProbeEmitter(site_plans)(model)
    y, probe = run(model, {"x": x})
    assert rel_l2(y, expected) <= TOLERANCE
    assert abs(float(probe) - want) <= TOLERANCE * want


def test_requires_plans_of_this_graph():
    site_plans = plans(linear(72, 64)[0], {"x": tokens(72)}, None)
    with pytest.raises(ir.passes.PreconditionError, match="^the plan of site lin was made for another graph$"):
        ProbeEmitter(site_plans)(linear(72, 64)[0])

"""`graph_passes.emit`: `SiteEmitter` (the format-independent part: its `requires`) and `TransformEmitter`
(``--transform-only``: the transform ops and the fused float weights, no quantizer).

Numbers: the transformed graph computes the original one up to float32 rounding (``W~ x~ = W (x - mu)`` and the
bias correction adds ``W mu`` back). Tolerance: relative L2 <= 1e-5, the README's contract for ``--transform-only``;
measured 0 to 2.5e-7 on these graphs (float32 unit roundoff 6e-8 times a rotation and a 72-term sum).
"""

from __future__ import annotations


import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.activation_probe import ProbeEmitter
from graph_passes.emit import SiteEmitter, TransformEmitter
from graph_passes.gated_activation_quant import GatedEmitter
from graph_passes.linears import SiteSelection
from graph_passes.methods import BiasCorrection, Method
from graph_passes.quantization import QuantConfig
from tests.passes._helpers import check, linear, op_counts, ops, parse_model, plans, rel_l2, run, tokens

TOLERANCE = 1e-5
HN = "hadanorm"
TRANSFORM_OP = {  # the hadanorm op(s) of one linear site, per method
    Method.NONE: [],
    Method.SMOOTHQUANT: ["Scale"],
    Method.QUAROT: ["ScaleRotate"],
    Method.SDCB: ["ScaleRotate"],
    Method.DYNCENTER: ["CenterScale"],
    Method.HADANORM: ["CenterScaleRotate"],
    Method.HQDM: ["ScaleRotate", "ScaleRotate"],  # the rotation and the back rotation
}
MODES = [(m, b) for m in Method for b in (BiasCorrection if m.recipe.center else [BiasCorrection.FLOAT_TOKEN])]


@pytest.mark.parametrize("method,bias", MODES, ids=[f"{m.value}-{b.value}" for m, b in MODES])
def test_transform_only_linear(method, bias):
    model, wt, b = linear(72, 64)
    x = tokens(72)
    expected = run(model, {"x": x})[0]
    site_plans = plans(model, {"x": x}, None, method=method, bias=bias)
    plan = site_plans[0]
    result = TransformEmitter(site_plans)(model)
    assert result.modified and result.model is model
    graph = model.graph
    check(model)

    # structure: the transform op(s) before the MatMul, their function bodies, the weight fused in place
    hn_ops = [n.op_type for n in graph if n.domain == HN]
    assert sorted(hn_ops) == sorted(TRANSFORM_OP[method])
    assert {f.name for f in model.functions.values()} == set(TRANSFORM_OP[method])
    matmul = next(n for n in graph if n.name == "lin")
    producer = matmul.inputs[0].producer()
    if producer is not None and producer.op_type == "Concat":  # quantized-token: [x~; mu~] of the transform
        transform = producer.inputs[0].producer()
        assert [v.producer() for v in producer.inputs] == [transform, transform]
        assert [v.index() for v in producer.inputs] == [0, 1]
        producer = transform
    if method is Method.NONE:
        assert matmul.inputs[0] is graph.inputs[0] and graph.initializers["wt"].const_value.numpy() is not None
        assert np.array_equal(matmul.inputs[1].const_value.numpy(), wt)
    else:
        assert producer.domain == HN and producer.op_type == TRANSFORM_OP[method][-1]
        assert matmul.inputs[1] is graph.initializers["wt"]  # fused in place (nothing else reads it)
        assert np.array_equal(graph.initializers["wt"].const_value.numpy(), plan.linears[0].weight.fused)
        mul = graph.initializers["lin.mul"].const_value.numpy()
        assert np.allclose(mul, plan.transform.channel_mul().astype(np.float32))
    if method is Method.HQDM:  # the back rotation reads the rotated tensor, with the transposed factors
        assert producer.inputs[0].producer().op_type == "ScaleRotate"
        assert np.array_equal(producer.inputs[2].const_value.numpy(), plan.transform.hadamard.left.T.astype(np.float32))
        assert np.array_equal(graph.initializers["wt"].const_value.numpy(), wt)  # not rotated (and no S)
    centered = method.recipe.center
    counts = op_counts(graph)
    if centered and bias is BiasCorrection.QUANTIZED_TOKEN:  # [x~; mu~], then y[:N] + y[N:]
        assert (counts["", "Concat"], counts["", "Slice"], counts["", "MatMul"]) == (1, 2, 1)
    elif centered:  # y + mu~ W~^T
        mean_matmul = next(n for n in graph if n.name == "lin.0.mean_matmul")
        assert mean_matmul.inputs[0] is producer.outputs[1] and mean_matmul.inputs[1] is matmul.inputs[1]
        assert (counts["", "Concat"], counts["", "Slice"], counts["", "MatMul"]) == (0, 0, 2)
    else:
        assert counts["", "MatMul"] == 1 and counts["", "Concat"] == counts["", "Slice"] == 0

    # numbers: the float graph's output
    assert rel_l2(run(model, {"x": x})[0], expected) <= TOLERANCE


def test_weight_read_outside_the_site_is_fused_into_a_copy():
    rng = np.random.default_rng(0)
    wt = (rng.standard_normal((72, 72)) / 9).astype(np.float32)
    model = parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[B, N, 72] x) => (float[B, N, 72] y, float[B, N, 72] z) {
          [lin] y = MatMul(x, wt)
          r = Relu(x)
          [other] z = MatMul(r, wt)
        }""", {"wt": wt})
    x = tokens(72)
    expected = run(model, {"x": x})
    selection = SiteSelection(include=("^lin$",))
    site_plans = plans(model, {"x": x}, None, selection=selection)
    assert site_plans[0].linears[0].weight.copy
    TransformEmitter(site_plans)(model)
    graph = model.graph
    lin, other = (next(n for n in graph if n.name == name) for name in ("lin", "other"))
    assert lin.inputs[1].name == "wt.lin" and other.inputs[1] is graph.initializers["wt"]
    assert np.array_equal(graph.initializers["wt"].const_value.numpy(), wt)  # the other reader's weight unchanged
    for got, want in zip(run(model, {"x": x}), expected):
        assert rel_l2(got, want) <= TOLERANCE


CONVS = """
    <ir_version: 10, opset_import: ["" : 21]>
    convs (float[2, 8, 4, 4] x) => (float[2, 8, 4, 4] y) {
      [pw] h = Conv <kernel_shape = [1, 1]> (x, w1, b1)
      r = Relu(h)
      [k3] y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2, b2)
    }"""


def conv_model(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    return parse_model(CONVS, {"w1": (rng.standard_normal((16, 8, 1, 1)) / 3).astype(np.float32),
                               "b1": rng.standard_normal(16).astype(np.float32),
                               "w2": (rng.standard_normal((8, 16, 3, 3)) / 12).astype(np.float32),
                               "b2": rng.standard_normal(8).astype(np.float32)})


def test_transform_only_conv_sites():
    """A 1x1 conv becomes a MatMul on the pixels as tokens (centered like a linear); a padded 3x3 conv keeps its
    kernel, fused tap by tap, and reads the transformed tokens back as pixels (not centered: the padding)."""
    model = conv_model()
    x = np.random.default_rng(1).standard_normal((2, 8, 4, 4)).astype(np.float32) + 1.5
    expected = run(model, {"x": x})[0]
    site_plans = plans(model, {"x": x}, None)
    assert [(p.name, p.transform.center) for p in site_plans] == [("pw", True), ("k3", False)]
    TransformEmitter(site_plans)(model)
    check(model)
    graph = model.graph
    assert [n.op_type for n in graph if n.domain == HN] == ["CenterScaleRotate", "ScaleRotate"]
    assert [n.name for n in ops(graph, "Conv")] == ["k3"]
    pw = next(n for n in graph if n.name == "pw")
    assert pw.op_type == "MatMul" and pw.inputs[1].name == "w1.matmul" and "w1" not in graph.initializers
    tokens_view = pw.inputs[0].producer().inputs[0].producer()  # transform <- Reshape(Transpose(x)) tokens
    assert tokens_view.op_type == "Reshape" and tokens_view.inputs[0].producer().attributes["perm"].as_ints() == (
        0, 2, 3, 1)
    k3 = ops(graph, "Conv")[0]
    assert k3.inputs[0].producer().op_type == "Transpose"  # the inverse view of the transformed tokens
    assert np.array_equal(k3.inputs[1].const_value.numpy(), site_plans[1].linears[0].weight.fused)
    assert rel_l2(run(model, {"x": x})[0], expected) <= TOLERANCE


# -- SiteEmitter: what it requires ---------------------------------------------------------------------------------

def test_requires_plans_of_this_graph():
    model, _, _ = linear(72, 64)
    site_plans = plans(model, {"x": tokens(72)}, None)
    other, _, _ = linear(72, 64)
    with pytest.raises(ir.passes.PreconditionError, match="^the plan of site lin was made for another graph$"):
        TransformEmitter(site_plans)(other)


def test_no_plans_no_change():
    model, _, _ = linear(72, 64)
    before = len(model.graph)
    assert not TransformEmitter([])(model).modified and len(model.graph) == before


def test_site_emitter_leaves_the_format_to_subclasses():
    model, _, _ = linear(72, 64)
    with pytest.raises(NotImplementedError):
        SiteEmitter(plans(model, {"x": tokens(72)}, None))(model)


@pytest.mark.parametrize("emitter", [TransformEmitter, ProbeEmitter, GatedEmitter])
def test_requires_float_plans(emitter):
    model, _, _ = linear(72, 64)
    site_plans = plans(model, {"x": tokens(72)}, QuantConfig(4, 4, weight_block=16))
    with pytest.raises(ir.passes.PreconditionError):
        emitter(site_plans)(model)


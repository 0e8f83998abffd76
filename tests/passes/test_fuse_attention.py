"""`graph_passes.fuse_attention.FuseAttentionPass`: ``MatMul(q, k^T) [-> scale] [-> + mask] -> Softmax -> MatMul(., v)``
becomes one ``hadanorm::Attention(q, k, v[, mask])``.

The pass only redirects the consumers; the replaced nodes are left dead for the pipeline's clean-up, so each test
runs the pass alone, checks what it wrote, then runs onnx-ir's `RemoveUnusedNodesPass` (the first clean-up pass of
`graph_passes.pipeline`) and checks what is left. Numbers: the op's function body is the float maths (Einsum
instead of MatMul: another summation order), so onnxruntime's outputs before and after agree within relative L2
1e-6 (float32 unit roundoff 6e-8 over a softmax and two 8-term products; measured below 2e-7).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass

from graph_passes.attention_op import AttentionPrecision
from graph_passes.fuse_attention import FuseAttentionPass, find_attention
from tests.passes import _helpers
from tests.passes._helpers import check, rel_l2, run

TOLERANCE = 1e-6
HN = "hadanorm"
RNG = np.random.default_rng(0)

BHND_MASKED = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 3, 8, 4] q, float[2, 3, 8, 4] k, float[2, 3, 8, 4] v, float[2, 1, 8, 8] mask) => (float[2, 3, 8, 4] y) {
      kt = Transpose <perm = [0, 1, 3, 2]> (k)
      s = MatMul(q, kt)
      scaled = Mul(s, c)
      masked = Add(scaled, mask)
      p = Softmax <axis = -1> (masked)
      y = MatMul(p, v)
    }"""


def parse_model(text: str, initializers: dict[str, np.ndarray] | None = None) -> ir.Model:
    """With the shapes of every value recorded (the pass reads ranks; exporters record them)."""
    return _helpers.parse_model(text, initializers, infer=True)


def feeds(*names: str, shape=(2, 3, 8, 4)) -> dict[str, np.ndarray]:
    out = {name: RNG.standard_normal(shape).astype(np.float32) for name in names}
    if "mask" in names:
        out["mask"] = np.where(RNG.random((2, 1, 8, 8)) < 0.2, -1e4, 0).astype(np.float32)
    return out


def counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def fuse(model: ir.Model, precision: AttentionPrecision = AttentionPrecision.FLOAT) -> ir.Node:
    """Run the pass alone, return its one Attention node; then the pipeline's dead-node removal."""
    assert FuseAttentionPass(precision)(model).modified
    found = [n for n in model.graph if n.domain == HN and n.op_type == "Attention"]
    assert len(found) == 1
    assert found[0].outputs[0] is model.graph.outputs[0] or found[0].outputs[0].uses()
    RemoveUnusedNodesPass()(model)
    check(model)
    return found[0]


@pytest.mark.parametrize("precision", list(AttentionPrecision))
def test_masked_scaled_attention(precision):
    model = parse_model(BHND_MASKED, {"c": np.array(0.5, np.float32)})
    inputs = feeds("q", "k", "v", "mask")
    expected = run(model, inputs)[0]
    node = fuse(model, precision)
    q, k, v, mask = model.graph.inputs
    assert list(node.inputs) == [q, k, v, mask]  # k read back through its transpose
    assert {name: a.value for name, a in node.attributes.items()} == {
        "scale": 0.5, "precision": precision.value, "layout": "bhnd"}
    assert node.overload == "masked" and node.name == "attention.0_Attention"
    assert (HN, "Attention", "masked") in model.functions and model.opset_imports[HN] == 1
    assert counts(model) == {"Attention": 1}  # MatMul, Transpose, Mul, Add, Softmax, MatMul gone
    assert model.graph.outputs[0].name == "y"
    assert rel_l2(run(model, inputs)[0], expected) <= TOLERANCE


def test_head_split_inputs_give_the_bnhd_layout():
    """q, k, v head splits ``Transpose(x, [0, 2, 1, 3])`` of [B, N, H, D] tensors and a head merge after: the op
    reads and writes [B, N, H, D] and the transposes go. The scale is a Div by a constant."""
    model = parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 8, 3, 4] xq, float[2, 8, 3, 4] xk, float[2, 8, 3, 4] xv) => (float[2, 8, 3, 4] y) {
          q = Transpose <perm = [0, 2, 1, 3]> (xq)
          kt = Transpose <perm = [0, 2, 3, 1]> (xk)
          v = Transpose <perm = [0, 2, 1, 3]> (xv)
          s = MatMul(q, kt)
          scaled = Div(s, c)
          p = Softmax <axis = -1> (scaled)
          o = MatMul(p, v)
          y = Transpose <perm = [0, 2, 1, 3]> (o)
        }""", {"c": np.array(2.0, np.float32)})
    inputs = feeds("xq", "xk", "xv", shape=(2, 8, 3, 4))
    expected = run(model, inputs)[0]
    node = fuse(model)
    assert list(node.inputs) == list(model.graph.inputs)
    assert node.attributes["layout"].value == "bnhd" and node.attributes["scale"].value == 0.5
    assert node.overload == "bnhd" and counts(model) == {"Attention": 1}
    assert rel_l2(run(model, inputs)[0], expected) <= TOLERANCE


def test_dynamo_key_transpose_is_read_back():
    """torch dynamo's ``k.transpose(-2, -1)``: Reshape(Transpose(Reshape(k, [-1, N, D]), [0, 2, 1]), [B, H, D, N])
    with constant shapes: the op reads k itself."""
    model = parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3, 8, 4] q, float[2, 3, 8, 4] k, float[2, 3, 8, 4] v) => (float[2, 3, 8, 4] y) {
          k3 = Reshape(k, flat)
          kt3 = Transpose <perm = [0, 2, 1]> (k3)
          kt = Reshape(kt3, back)
          s = MatMul(q, kt)
          p = Softmax <axis = -1> (s)
          y = MatMul(p, v)
        }""", {"flat": np.array([-1, 8, 4], np.int64), "back": np.array([2, 3, 4, 8], np.int64)})
    inputs = feeds("q", "k", "v")
    expected = run(model, inputs)[0]
    node = fuse(model)
    assert list(node.inputs) == list(model.graph.inputs) and node.overload == ""
    assert node.attributes["scale"].value == 1.0 and counts(model) == {"Attention": 1}
    assert rel_l2(run(model, inputs)[0], expected) <= TOLERANCE


def test_computed_scalar_factor_stays_on_q_and_plain_k_is_transposed():
    """A scalar factor that is not a constant is applied to q by a Mul; a k^T with no transpose to read back
    through (here a graph input) is transposed for the op."""
    model = parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3, 8, 4] q, float[2, 3, 4, 8] kt, float[2, 3, 8, 4] v, float[1] t) => (float[2, 3, 8, 4] y) {
          f = Sqrt(t)
          qf = Mul(q, f)
          s = MatMul(qf, kt)
          p = Softmax <axis = -1> (s)
          y = MatMul(p, v)
        }""")
    inputs = {**feeds("q", "v"), "kt": RNG.standard_normal((2, 3, 4, 8)).astype(np.float32),
              "t": np.array([0.7], np.float32)}
    expected = run(model, inputs)[0]
    node = fuse(model)
    q_factor, k = (v.producer() for v in node.inputs[:2])
    assert q_factor.op_type == "Mul" and q_factor.name == "attention.0.q_factor0_Mul"
    assert k.op_type == "Transpose" and k.attributes["perm"].as_ints() == (0, 1, 3, 2)
    assert counts(model) == {"Sqrt": 1, "Mul": 1, "Transpose": 1, "Attention": 1}
    assert rel_l2(run(model, inputs)[0], expected) <= TOLERANCE


UNRECOGNISED = {
    "softmax over another axis": """
        s = MatMul(q, kt)
        p = Softmax <axis = 2> (s)
        y = MatMul(p, v)""",
    "probabilities read twice": """
        s = MatMul(q, kt)
        p = Softmax <axis = -1> (s)
        o = MatMul(p, v)
        extra = ReduceSum <keepdims = 1> (p)
        y = Add(o, extra)""",
    "scores not a product": """
        s = Add(q8, kt8)
        p = Softmax <axis = -1> (s)
        y = MatMul(p, v)""",
    "softmax output not multiplied by v": """
        s = MatMul(q, kt)
        p = Softmax <axis = -1> (s)
        y = MatMul(v8, p)""",
}


@pytest.mark.parametrize("body", UNRECOGNISED.values(), ids=UNRECOGNISED.keys())
def test_unrecognised_softmax_is_left_as_it_is(body):
    text = f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3, 8, 4] q, float[2, 3, 4, 8] kt, float[2, 3, 8, 4] v, float[2, 3, 8, 8] q8, float[2, 3, 8, 8] kt8,
           float[2, 3, 8, 8] v8) => (float[2, 3, 8, 4] y) {{ {body} }}"""
    model = parse_model(text.replace("float[2, 3, 8, 4] y", "float[2, 3, 8, 8] y") if "v8, p" in body else text)
    before = [(n.op_type, n.name) for n in model.graph]
    scan = find_attention(model.graph)
    assert not scan.sites and [n.op_type for n in scan.unrecognised] == ["Softmax"]
    assert not FuseAttentionPass(AttentionPrecision.FLOAT)(model).modified
    assert [(n.op_type, n.name) for n in model.graph] == before and not model.functions


def test_two_attentions_one_function_per_form():
    model = parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3, 8, 4] q, float[2, 3, 4, 8] kt, float[2, 3, 8, 4] v) => (float[2, 3, 8, 4] y) {
          s1 = MatMul(q, kt)
          p1 = Softmax <axis = -1> (s1)
          o1 = MatMul(p1, v)
          s2 = MatMul(v, kt)
          p2 = Softmax <axis = -1> (s2)
          o2 = MatMul(p2, q)
          y = Add(o1, o2)
        }""")
    inputs = {**feeds("q", "v"), "kt": RNG.standard_normal((2, 3, 4, 8)).astype(np.float32)}
    expected = run(model, inputs)[0]
    assert FuseAttentionPass(AttentionPrecision.BF16)(model).modified
    RemoveUnusedNodesPass()(model)
    names = [n.name for n in model.graph if n.op_type == "Attention"]
    assert names == ["attention.0_Attention", "attention.1_Attention"]
    assert list(model.functions) == [(HN, "Attention", "")]
    assert counts(model) == {"Transpose": 2, "Attention": 2, "Add": 1}
    assert rel_l2(run(model, inputs)[0], expected) <= TOLERANCE


CHAINED = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 3, 8, 4] q, float[2, 3, 4, 8] kt, float[2, 3, 8, 4] v) => (float[2, 3, 8, 4] y) {
      s1 = MatMul(q, kt)
      p1 = Softmax <axis = -1> (s1)
      o1 = MatMul(p1, v)
      s2 = MatMul(o1, kt)
      p2 = Softmax <axis = -1> (s2)
      y = MatMul(p2, v)
    }"""


def test_chained_attentions_are_both_fused():
    model = parse_model(CHAINED)
    inputs = {**feeds("q", "v"), "kt": RNG.standard_normal((2, 3, 4, 8)).astype(np.float32)}
    expected = run(model, inputs)[0]
    FuseAttentionPass(AttentionPrecision.FLOAT)(model)
    RemoveUnusedNodesPass()(model)
    assert rel_l2(run(model, inputs)[0], expected) <= TOLERANCE  # the numbers hold either way
    assert not [n for n in model.graph if n.op_type == "Softmax"]
    assert [n.name for n in model.graph if n.op_type == "Attention"] == ["attention.0_Attention",
                                                                        "attention.1_Attention"]


def test_needs_recorded_ranks():
    """The pattern is checked on ranks (the Softmax axis, q / k / v of one rank): without recorded shapes (no
    value_info, no shape inference) nothing is recognised and the graph is left as it is."""
    model = _helpers.parse_model(CHAINED)
    assert not FuseAttentionPass(AttentionPrecision.FLOAT)(model).modified
    assert len(find_attention(model.graph).unrecognised) == 2

"""`graph_passes.gemm_to_matmul.GemmToMatMulPass`: ``Gemm`` linears (constant 2-D weight, ``transA = 0``) become
``MatMul(x, alpha W^T)`` + ``Add(beta C)``; the output keeps its name, the MatMul the Gemm's module path and
metadata; everything else is left alone.

Numbers: the same products and sums (alpha and beta folded into the constants in float64, cast back to float32):
onnxruntime's outputs before and after agree within relative L2 1e-6 (float32 unit roundoff 6e-8 over 8-term dot
products; measured below 1e-7).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.gemm_to_matmul import GemmToMatMulPass
from graph_passes.linears import find_linears, module_path_of
from tests.passes._helpers import check, op_counts, parse_model, rel_l2, run

TOLERANCE = 1e-6
RNG = np.random.default_rng(0)
W_OUT_IN = (RNG.standard_normal((16, 8)) / 3).astype(np.float32)  # [out, in]: transB = 1
C_VEC = RNG.standard_normal(16).astype(np.float32)
X = RNG.standard_normal((4, 8)).astype(np.float32)


def gemm_model(attrs: str = "<transB = 1>", inputs: str = "x, w, c", inits: dict | None = None,
               extra_inputs: str = "", name: str = "/blocks.0/mlp/fc/Gemm") -> ir.Model:
    inits = {"w": W_OUT_IN, "c": C_VEC} if inits is None else inits
    model = parse_model(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[4, 8] x{extra_inputs}) => (float[4, 16] y) {{
          [gemm] y = Gemm {attrs} ({inputs})
        }}""", inits)
    node = next(iter(model.graph))
    node.name = name  # the TorchScript exporter's scoped name (the parser takes no '/' in node names)
    node.metadata_props["namespace"] = "note: kept"
    return model


def rewrite(model: ir.Model, feeds: dict[str, np.ndarray] | None = None, **kwargs) -> tuple[ir.Node, ir.Node | None]:
    """Run the pass alone; check the numbers; return the MatMul and the Add (or None)."""
    feeds = {"x": X} if feeds is None else feeds
    expected = run(model, feeds)[0]
    path = module_path_of(next(iter(model.graph)))
    assert GemmToMatMulPass(**kwargs)(model).modified
    check(model)
    graph = model.graph
    assert not [n for n in graph if n.op_type == "Gemm"]
    matmul = next(n for n in graph if n.op_type == "MatMul")
    add = next((n for n in graph if n.op_type == "Add"), None)
    assert module_path_of(matmul) == path and matmul.metadata_props["namespace"] == "note: kept"
    assert graph.outputs[0].name == "y" and (add or matmul).outputs[0] is graph.outputs[0]
    assert rel_l2(run(model, feeds)[0], expected) <= TOLERANCE
    return matmul, add


def test_trans_b_with_alpha_and_beta():
    model = gemm_model("<transB = 1, alpha = 0.5, beta = 2.0>")
    matmul, add = rewrite(model)
    graph = model.graph
    assert [n.name for n in graph] == ["/blocks.0/mlp/fc/MatMul", "/blocks.0/mlp/fc/Add"]
    assert matmul.inputs[0] is graph.inputs[0] and matmul.inputs[1].name == "w.T"
    assert np.array_equal(matmul.inputs[1].const_value.numpy(), (W_OUT_IN.T.astype(np.float64) * 0.5).astype(
        np.float32))
    assert add.inputs[0] is matmul.outputs[0] and add.inputs[1].name == "c.bias"
    assert np.array_equal(add.inputs[1].const_value.numpy(), (C_VEC.astype(np.float64) * 2).astype(np.float32))
    assert set(graph.initializers) == {"w.T", "c.bias"}  # the originals are dropped: nothing else reads them
    assert [lin.module_path for lin in find_linears(model)] == ["blocks.0.mlp.fc"]  # now a MatMul linear


def test_plain_weight_and_bias_are_used_as_they_are():
    model = gemm_model("", inits={"w": W_OUT_IN.T.copy(), "c": C_VEC})
    matmul, add = rewrite(model)
    assert matmul.inputs[1] is model.graph.initializers["w"] and add.inputs[1] is model.graph.initializers["c"]


@pytest.mark.parametrize("shape", [(1, 16), (1,), ()], ids=["row", "one", "scalar"])
def test_broadcast_bias_becomes_a_vector(shape):
    c = (C_VEC[: int(np.prod(shape))] if shape else C_VEC[:1]).reshape(shape)
    model = gemm_model(inits={"w": W_OUT_IN, "c": c})
    _, add = rewrite(model)
    bias = add.inputs[1].const_value.numpy()
    assert add.inputs[1].name == "c.bias" and bias.shape == (16,)
    assert np.array_equal(bias, np.broadcast_to(c.reshape(-1), (16,)))


def test_bias_that_is_not_constant_is_added_as_it_is():
    model = gemm_model(extra_inputs=", float[4, 16] c", inits={"w": W_OUT_IN})
    _, add = rewrite(model, {"x": X, "c": RNG.standard_normal((4, 16)).astype(np.float32)})
    assert add.inputs[1] is model.graph.inputs[1]


def test_no_bias_no_add():
    model = gemm_model(inputs="x, w", inits={"w": W_OUT_IN})
    matmul, add = rewrite(model)
    assert add is None and op_counts(model.graph) == {("", "MatMul"): 1}


def test_weight_read_elsewhere_is_kept():
    model = parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[4, 8] x) => (float[4, 16] y, float[16, 8] z) {
          [gemm] y = Gemm <transB = 1> (x, w, c)
          z = Identity(w)
        }""", {"w": W_OUT_IN, "c": C_VEC})
    expected = run(model, {"x": X})
    assert GemmToMatMulPass()(model).modified
    assert set(model.graph.initializers) == {"w", "w.T", "c"}
    for got, want in zip(run(model, {"x": X}), expected):
        assert rel_l2(got, want) <= TOLERANCE


LEFT_ALONE = {
    "transA": dict(attrs="<transA = 1, transB = 1>", inits={"w": W_OUT_IN, "c": C_VEC}),
    "weight not constant": dict(inputs="x, wi, c", extra_inputs=", float[16, 8] wi", inits={"c": C_VEC}),
    "beta on a computed bias": dict(attrs="<transB = 1, beta = 2.0>", extra_inputs=", float[4, 16] c",
                                    inits={"w": W_OUT_IN}),
    "beta on a matrix bias": dict(attrs="<transB = 1, beta = 2.0>",
                                  inits={"w": W_OUT_IN, "c": np.ones((4, 16), np.float32)}),
}


@pytest.mark.parametrize("case", LEFT_ALONE.values(), ids=LEFT_ALONE.keys())
def test_other_gemms_are_left_alone(case):
    case = dict(case)
    if "transA" in case.get("attrs", ""):  # x^T: a [8, 4] input
        model = parse_model("""
            <ir_version: 10, opset_import: ["" : 21]>
            g (float[8, 4] x) => (float[4, 16] y) {
              [gemm] y = Gemm <transA = 1, transB = 1> (x, w, c)
            }""", case["inits"])
    else:
        model = gemm_model(**case)
    before = [(n.op_type, [v.name for v in n.inputs]) for n in model.graph]
    assert not GemmToMatMulPass()(model).modified
    assert [(n.op_type, [v.name for v in n.inputs]) for n in model.graph] == before


def test_selects_limits_the_rewrite_to_some_linears():
    model = parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[4, 8] x) => (float[4, 16] y, float[4, 16] z) {
          [a] y = Gemm <transB = 1> (x, w, c)
          [b] z = Gemm <transB = 1> (x, w2, c)
        }""", {"w": W_OUT_IN, "w2": W_OUT_IN * 2, "c": C_VEC})
    assert GemmToMatMulPass(selects=lambda path: path == "b")(model).modified
    assert [n.op_type for n in model.graph] == ["Gemm", "MatMul", "Add"]
    assert [n.name for n in model.graph][1:] == ["b_MatMul", "b_Add"]
    assert not GemmToMatMulPass(selects=lambda path: False)(model).modified

"""`graph_passes.fix_noop_squeeze.FixNoopSqueezePass`: ``Squeeze`` of a static dimension that is not 1 (torch's
no-op ``squeeze(dim)``, which onnxruntime refuses to load) becomes ``Identity``; mixed axes keep the size-1 ones;
the TorchScript exporter's ``If(Shape(x)[1] == 1)`` around it folds to ``Identity``; unknown sizes are left alone.

Numbers: onnxruntime refuses the graph before (the error is matched) and runs it after; an Identity or a Squeeze of
size-1 axes moves no value, so the outputs equal the numpy expectation bit for bit (tolerance 0).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.fix_noop_squeeze import FixNoopSqueezePass
from runtime.session import create_session
from tests.passes._helpers import check, parse_model, run, to_bytes

X = np.random.default_rng(0).standard_normal((2, 16, 8)).astype(np.float32)
REFUSED = r"Dimension of input 1 must be 1 instead of 16"


def refused_by_onnxruntime(model: ir.Model) -> None:
    with pytest.raises(Exception, match=REFUSED):
        create_session(to_bytes(model))


def squeeze_model(axes: list[int], shape: str = "2, 16, 8", out: str = "2, 16, 8") -> ir.Model:
    return parse_model(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[{shape}] x) => (float[{out}] y) {{
          [squeeze] y = Squeeze(x, axes)
        }}""", {"axes": np.array(axes, np.int64)})


def test_noop_squeeze_becomes_identity():
    model = squeeze_model([1])
    refused_by_onnxruntime(model)
    result = FixNoopSqueezePass()(model)
    assert result.modified and result.model is model
    check(model)
    (node,) = list(model.graph)
    assert (node.op_type, node.name, node.inputs[0].name) == ("Identity", "squeeze", "x")
    assert node.outputs[0] is model.graph.outputs[0] and node.outputs[0].name == "y"
    assert node.outputs[0].shape == ir.Shape([2, 16, 8])
    assert "axes" not in model.graph.initializers  # nothing reads the axes any more
    assert np.array_equal(run(model, {"x": X})[0], X)


def test_mixed_axes_keep_the_size_one_ones():
    model = squeeze_model([1, 2], shape="2, 16, 1", out="2, 16")
    x = X[:, :, :1]
    refused_by_onnxruntime(model)
    assert FixNoopSqueezePass()(model).modified
    check(model)
    squeeze = next(n for n in model.graph if n.op_type == "Squeeze")
    assert ir.convenience.get_const_tensor(squeeze.inputs[1]).numpy().tolist() == [2]
    assert squeeze.inputs[1].producer().op_type == "Constant" and "axes" not in model.graph.initializers
    assert np.array_equal(run(model, {"x": x})[0], x[:, :, 0])


def test_axes_attribute_before_opset_13():
    model = parse_model("""
        <ir_version: 8, opset_import: ["" : 11]>
        g (float[2, 16, 1] x) => (float[2, 16] y, float[2, 16, 1] z) {
          [both] y = Squeeze <axes = [1, 2]> (x)
          [noop] z = Squeeze <axes = [1]> (x)
        }""")
    x = X[:, :, :1]
    assert FixNoopSqueezePass()(model).modified
    check(model)
    both, noop = list(model.graph)
    assert both.op_type == "Squeeze" and both.attributes["axes"].as_ints() == (2,)
    assert noop.op_type == "Identity" and noop.name == "noop"
    y, z = run(model, {"x": x})
    assert np.array_equal(y, x[:, :, 0]) and np.array_equal(z, x)


def test_torchscript_if_is_folded():
    """``If(Shape(x)[1] == 1) then Squeeze(x, [1]) else Identity(x)`` on a value with no recorded shape (the pass
    asks onnx's shape inference): the Squeeze becomes Identity, the If whose two branches then return ``x``
    becomes Identity, and its condition's Shape / Gather / Equal go."""
    model = parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 16, 8] x) => (float[2, 16, 8] y) {
          r = Relu(x)
          s = Shape(r)
          d = Gather <axis = 0> (s, one)
          c = Equal(d, one)
          y = If (c) <then_branch = then_g () => (float[2, 8] t) { t = Squeeze(r, ax) },
                      else_branch = else_g () => (float[2, 16, 8] e) { e = Identity(r) }>
        }""", {"one": np.array(1, np.int64), "ax": np.array([1], np.int64)})
    assert next(n for n in model.graph if n.op_type == "Relu").outputs[0].shape is None
    with pytest.raises(Exception, match=REFUSED):  # the untaken branch is shape-checked at load
        create_session(to_bytes(model))
    assert FixNoopSqueezePass()(model).modified
    check(model)
    assert [n.op_type for n in model.graph] == ["Relu", "Identity"]
    assert model.graph.outputs[0].name == "y" and model.graph.outputs[0].producer().inputs[0].name == "r"
    assert np.array_equal(run(model, {"x": X})[0], np.maximum(X, 0))


def test_function_with_recorded_shapes():
    """Model-local functions are walked too; inside them only recorded shapes count."""
    model = parse_model("""
        <ir_version: 10, opset_import: ["" : 21, "local" : 1]>
        g (float[2, 16, 8] x) => (float[2, 16, 8] y) {
          y = local.squeeze1(x)
        }
        <domain: "local", opset_import: ["" : 21]>
        squeeze1 (a) => (b) {
          ax = Constant <value = int64[1] {1}> ()
          b = Squeeze(a, ax)
        }""")
    function = model.functions["local", "squeeze1", ""]
    assert not FixNoopSqueezePass()(model).modified  # no shape recorded inside: left alone
    function.inputs[0].shape = ir.Shape([2, 16, 8])
    assert FixNoopSqueezePass()(model).modified
    assert [n.op_type for n in function] == ["Identity"]  # the axes Constant went with the Squeeze
    assert np.array_equal(run(model, {"x": X})[0], X)


LEFT_ALONE = {
    "symbolic dimension": ("B, N, 8", "[squeeze] y = Squeeze(x, axes)"),
    "no axes": ("2, 16, 8", "[squeeze] y = Squeeze(x)"),
    "axes not constant": ("2, 16, 8", "[squeeze] y = Squeeze(x, shape_axes)"),
    "a real squeeze": ("2, 1, 8", "[squeeze] y = Squeeze(x, axes)"),
}


@pytest.mark.parametrize("shape,body", LEFT_ALONE.values(), ids=LEFT_ALONE.keys())
def test_others_are_left_alone(shape, body):
    model = parse_model(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[{shape}] x) => (float y) {{
          shape_axes = Shape <start = 0, end = 1> (axes)
          {body}
        }}""", {"axes": np.array([1], np.int64)})
    before = [(n.op_type, [v.name for v in n.inputs]) for n in model.graph]
    assert not FixNoopSqueezePass()(model).modified
    assert [(n.op_type, [v.name for v in n.inputs]) for n in model.graph] == before

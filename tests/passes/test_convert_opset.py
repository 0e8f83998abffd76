"""`graph_passes.convert_opset.convert_opset` (a function, not a pass class: it returns a new model): onnx's version
converter with the weights left out and given back (the very same tensor objects), node names, node metadata and
model metadata kept; one-line `GraphInputError`s for what the converter cannot convert.

Numbers: the converted graph runs the same kernels (``ReduceMean`` takes its axes as an input from opset 18 on), so
onnxruntime's outputs before and after are equal bit for bit (tolerance 0).
"""

from __future__ import annotations

import numpy as np
import pytest

from graph_passes.convert_opset import convert_opset, default_opset
from graph_passes.errors import GraphInputError
from tests.passes._helpers import check, parse_model, run

RNG = np.random.default_rng(0)
W = RNG.standard_normal((64, 16)).astype(np.float32)  # 4 KiB: left out of the converter's proto
SMALL = RNG.standard_normal(16).astype(np.float32)  # 64 bytes: goes through the converter (copied)

OPSET_17 = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4, 64] x) => (float[2, 1, 16] y) {
      [mean] m = ReduceMean <axes = [1], keepdims = 1> (x)
      [lin] h = MatMul(m, w)
      [bias] hb = Add(h, b)
      [act] y = Softmax <axis = -1> (hb)
    }"""


def test_converts_to_21_keeping_weights_names_and_metadata():
    model = parse_model(OPSET_17, {"w": W, "b": SMALL})
    model.metadata_props["test.note"] = "kept"
    for node in model.graph:
        node.metadata_props["namespace"] = f"{node.name}: module"
    x = RNG.standard_normal((2, 4, 64)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    converted = convert_opset(model, 21)
    assert converted is not model and default_opset(model) == 17  # the input is left unchanged
    assert default_opset(converted) == 21 and converted.opset_imports[""] == 21
    check(converted)
    graph = converted.graph
    named = [n for n in graph if n.name]
    assert [n.name for n in named] == ["mean", "lin", "bias", "act"]
    assert all(n.metadata_props["namespace"] == f"{n.name}: module" for n in named)
    mean = named[0]
    assert len(mean.inputs) == 2 and "axes" not in mean.attributes  # opset 18: axes became an input
    assert converted.metadata_props["test.note"] == "kept"
    assert graph.initializers["w"].const_value is model.graph.initializers["w"].const_value
    assert np.array_equal(graph.initializers["b"].const_value.numpy(), SMALL)
    assert np.array_equal(run(converted, {"x": x})[0], expected)


def test_same_opset_is_the_same_model():
    model = parse_model(OPSET_17, {"w": W, "b": SMALL})
    assert convert_opset(model, 17) is model


def refused(text: str, target: int, message: str) -> None:
    model = parse_model(text, checked=False)
    with pytest.raises(GraphInputError, match=message):
        convert_opset(model, target)


def test_refuses_a_model_without_an_onnx_opset():
    refused("""
        <ir_version: 10, opset_import: ["custom" : 1]>
        g (float[2] x) => (float[2] y) { y = custom.Op(x) }""", 21,
            r"^the model imports no ONNX \(ai.onnx\) opset; re-export the model at opset 21$")


def test_refuses_an_op_newer_than_the_source_opset():
    refused("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { [act] y = Gelu(x) }""", 21,
            r"^node 'act' \(Gelu\) is not in ONNX opset 17 \(it came in opset 20\), so the model cannot be "
            r"converted from opset 17 to 21; re-export the model at opset 21$")


def test_refuses_an_unknown_default_domain_op():
    refused("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { y = Frobnicate(x) }""", 21,
            r"^a Frobnicate node is not an ONNX operator, so the model cannot be converted from opset 17 to 21; "
            r"re-export the model at opset 21$")


def test_refuses_a_domain_the_model_does_not_import():
    refused("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { [c] y = custom.Op(x) }""", 21,
            r"^node 'c' \(Op\) uses the operator domain 'custom', which the model does not import, so its opset "
            r"cannot be converted from 17 to 21; re-export the model at opset 21$")


def test_refuses_what_the_converter_has_no_adapter_for():
    refused("""
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[1, 2, 4, 8] q, float[1, 2, 4, 8] k, float[1, 2, 4, 8] v) => (float[1, 2, 4, 8] y) {
          y = Attention(q, k, v)
        }""", 21,
            r"^onnx's version converter cannot convert this model from opset 23 to 21 \(.*Attention.*\); "
            r"re-export the model at opset 21$")

"""The onnxruntime trap the session options avoid: DequantizeLinear + MatMul on a float activation is fused into
MatMulNBits with accuracy level 4 (int8 activations) by default, which changes the numbers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graph_passes.quantization import QuantConfig, quantize_weight
from runtime.session import NumericsMode, session_options


def dq_matmul_model(width: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    qw = quantize_weight(rng.standard_normal((width, width)) / np.sqrt(width), QuantConfig(4, 4), np.float32)
    q = ir.Value(name="q", const_value=ir.tensor(qw.q, name="q"))
    scale = ir.Value(name="s", const_value=ir.tensor(qw.scale, name="s"))
    x = ir.Value(name="x", shape=ir.Shape(["N", width]), type=ir.TensorType(ir.DataType.FLOAT))
    dq = ir.Node("", "DequantizeLinear", [q, scale], attributes=[ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", 128)])
    mm = ir.Node("", "MatMul", [x, dq.outputs[0]])
    mm.outputs[0].name, mm.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[dq, mm], initializers=[q, scale], opset_imports={"": 21})
    return ir.serde.serialize_model(ir.Model(graph, ir_version=10)).SerializeToString(), qw.dequantize()


def test_default_fusion_changes_numbers_and_ours_do_not():
    model, weight = dq_matmul_model(1152)
    x = (np.random.default_rng(1).standard_normal((256, 1152)) * 3).astype(np.float32)
    exact = x.astype(np.float64) @ weight

    def max_abs(mode: NumericsMode) -> float:
        session = ort.InferenceSession(model, session_options(mode), providers=["CPUExecutionProvider"])
        return float(np.abs(session.run(None, {"x": x})[0] - exact).max())

    assert max_abs(NumericsMode.FAST) > 1e-2  # onnxruntime's defaults: measured 0.098
    assert max_abs(NumericsMode.AS_WRITTEN) < 1e-4  # measured 5.3e-6
    assert max_abs(NumericsMode.FP32) < 1e-4  # measured 2.0e-5


def test_skip_layer_norm_fusion_is_off(tmp_path):
    """create_session keeps Add + LayerNormalization as written (runtime.session.DISABLED_OPTIMIZERS: onnxruntime's
    fused SkipLayerNormalization CPU kernel measured 2.5-3.5x slower), which onnxruntime's defaults would fuse; the
    same numbers as numpy's within float32 rounding."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from runtime.session import create_session

    d = 72
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]),
         helper.make_node("LayerNormalization", ["s", "gamma"], ["y"], axis=-1, epsilon=1e-6)], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 16, d]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.linspace(0.5, 1.5, d).astype(np.float32), "gamma")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 16, d)).astype(np.float32) for n in "ab"}

    def ops(path) -> set[str]:
        return {n.op_type for n in onnx.load(path).graph.node}

    ours, default = tmp_path / "ours.onnx", tmp_path / "default.onnx"
    (y,) = create_session(model, optimized_model_path=ours).run(None, feeds)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(default)
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    assert "SkipLayerNormalization" in ops(default)  # what the option prevents
    assert "SkipLayerNormalization" not in ops(ours) and {"Add", "LayerNormalization"} <= ops(ours)
    s = feeds["a"].astype(np.float64) + feeds["b"]
    want = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 1.5, d)
    assert float(np.abs(y - want).max()) < 1e-5

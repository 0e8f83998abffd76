"""Small ONNX graphs for pass tests, built directly (no torch)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper


def mlp_model(width: int, hidden: int, seed: int = 0, bias: bool = True, shared: bool = True) -> ir.Model:
    """x [B, N, width] -> Linear(width, hidden) -> Gelu -> Linear(hidden, width) -> y, plus a second linear on x
    (shared input) with 72 outputs -> side, when `shared`. Weights are stored [in, out] as torch exports them."""
    rng = np.random.default_rng(seed)
    inits = {
        "w_up": rng.standard_normal((width, hidden)) / np.sqrt(width),
        "w_down": rng.standard_normal((hidden, width)) / np.sqrt(hidden),
        "w_side": rng.standard_normal((width, 72)) / np.sqrt(width),
    }
    if bias:
        inits["b_up"] = rng.standard_normal(hidden)
        inits["b_down"] = rng.standard_normal(width) * 0.1
    nodes = [helper.make_node("MatMul", ["x", "w_up"], ["up"], name="up")]
    last = "up"
    if bias:
        nodes.append(helper.make_node("Add", ["up", "b_up"], ["up_b"], name="up_bias"))
        last = "up_b"
    nodes.append(helper.make_node("Gelu", [last], ["act"], name="gelu"))
    nodes.append(helper.make_node("MatMul", ["act", "w_down"], ["down"], name="down"))
    last = "down"
    if bias:
        nodes.append(helper.make_node("Add", ["down", "b_down"], ["down_b"], name="down_bias"))
        last = "down_b"
    nodes.append(helper.make_node("Identity", [last], ["y"], name="out"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "N", width])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x", "w_side"], ["side"], name="side"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["B", "N", 72]))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N", width])],
        outputs,
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def dit_like_input(width: int, batch: int = 2, tokens: int = 16, seed: int = 1) -> np.ndarray:
    """Tokens with per-channel mean offsets of varied size and a few outlier channels (as DiT activations)."""
    rng = np.random.default_rng(seed)
    offsets = rng.standard_normal(width) * 2.0
    spread = np.exp(rng.standard_normal(width) * 0.5)
    spread[rng.choice(width, size=max(1, width // 64), replace=False)] *= 20.0
    return (rng.standard_normal((batch, tokens, width)) * spread + offsets).astype(np.float32)


def serialize(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def linear_model(width: int, out: int, seed: int = 0) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """y = x @ Wt + b with Wt [width, out]; returns the model, Wt and b (float32)."""
    rng = np.random.default_rng(seed)
    wt = (rng.standard_normal((width, out)) / np.sqrt(width)).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["mm"], name="linear"),
         helper.make_node("Add", ["mm", "b"], ["y"], name="bias")],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "N", out])],
        [numpy_helper.from_array(wt, "wt"), numpy_helper.from_array(b, "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto), wt, b

"""The per-token activation quantizer stays on the b-bit grid ``0..2^b - 1`` whatever its container.

A token with ``max = 3/64`` and ``min = -3/64`` puts both ``-lo / scale`` and ``hi / scale`` on ``qmax / 2 = k + 0.5``
(found by search to land on or above the tie in float32 for 3, 5, 6 and 7 bits); rounding sends both up, so
``round(hi / scale) + zp = qmax + 1``. The UINT4 container holds that level
at 3 bits (and UINT8 at 5-7 bits), so without the clip the quantizer has one level too many.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.emit_qdq import activation_qdq
from runtime.session import create_session
from tests.graphs import serialize

WIDTH = 8


def quantizer_model(bits: int) -> ir.Model:
    """x [B, N, 8] -> activation QDQ (as the quantize pass builds it) -> graph output."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "grid",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "N", WIDTH])],
        [numpy_helper.from_array(np.eye(WIDTH, dtype=np.float32), "w")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                                                         ir_version=10))
    matmul = next(iter(model.graph))
    dq = activation_qdq(model.graph, matmul, model.graph.inputs[0], bits, WIDTH, "site")
    dq.name = "x_hat"
    model.graph.outputs.append(dq)
    return model


def reference(x: np.ndarray, bits: int) -> np.ndarray:
    """The definition: scale = (hi - lo) / qmax, zp = round(-lo / scale), q = clip(round(x / scale) + zp, 0, qmax)."""
    qmax = np.float32(2**bits - 1)
    hi = np.maximum(x.max(-1, keepdims=True), np.float32(0))
    lo = np.minimum(x.min(-1, keepdims=True), np.float32(0))
    scale = np.maximum((hi - lo) / qmax, np.finfo(np.float32).tiny)
    zp = np.clip(np.round(-(lo / scale)), 0, qmax)
    q = np.clip(np.round(x / scale) + zp, 0, qmax)
    return (q - zp) * scale


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_quantizer_stays_on_the_b_bit_grid(bits):
    x = np.zeros((1, 2, WIDTH), dtype=np.float32)
    x[0, 0, :4] = [3 / 64, -3 / 64, 1 / 64, -1 / 128]  # the tie: hi / scale = -lo / scale = qmax / 2
    x[0, 1] = np.linspace(-3.0, 5.0, WIDTH)
    got = create_session(serialize(quantizer_model(bits))).run(["x_hat"], {"x": x})[0]
    want = reference(x, bits)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    qmax = np.float32(2**bits - 1)
    scale = np.float32(6 / 64) / qmax
    zp = np.round(np.float32(3 / 64) / scale)
    assert got[0, 0, 0] == pytest.approx((qmax - zp) * scale, abs=1e-7)  # the top level of the grid, not one more

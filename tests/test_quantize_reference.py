"""The quantized graph in onnxruntime agrees with an independent dense numpy model of each method's linear.

The reference builds H as a dense matrix (HQ-DM: rotates the quantized tokens back and quantizes W unrotated), fuses W S H^T with plain matrix products, quantizes weights per block and
activations per token with its own few lines, and adds the bias correction as the chosen mode describes.
"""

from __future__ import annotations

import numpy as np
import pytest

from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.pipeline import quantize_model
from graph_passes.quantization import QuantConfig
from graph_passes.site_transforms import SiteStats
from runtime.session import create_session
from tests.graphs import dit_like_input, linear_model, serialize
from tests.random_graphs import ref_int8_per_channel, ref_tokens
from tests.roles import ALL_PIXART

ALL = ALL_PIXART


def ref_weight(wt: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Symmetric per-block (along rows of W^T) quantize-dequantize, float32 scales."""
    out = np.empty_like(wt, dtype=np.float64)
    qmax = 2 ** (bits - 1) - 1
    for start in range(0, wt.shape[0], block):
        rows = wt[start:start + block]
        scale = (np.abs(rows).max(axis=0) / qmax).astype(np.float32).astype(np.float64)
        scale[scale == 0] = 1.0
        out[start:start + block] = np.clip(np.round(rows / scale), -qmax, qmax) * scale
    return out


def reference(x, wt, b, transform, bias_mode: BiasCorrection, config: QuantConfig) -> np.ndarray:
    d = wt.shape[0]
    h = transform.hadamard.matrix() if transform.hadamard is not None else np.eye(d)
    s = 1.0 / transform.inv_scale
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=1, keepdims=True) if transform.center else np.zeros_like(x64[:, :1])
    xt = ((x64 - mu) / s) @ h.T
    mt = (mu / s) @ h.T
    if transform.rotate_back:  # HQ-DM: Q(x H^T) H W^T with W quantized unrotated
        wq = ref_weight((np.diag(s) @ wt.astype(np.float64)).astype(np.float32).astype(np.float64),
                        config.weight_bits, config.weight_block)
        return ref_tokens(xt, config.act_bits) @ h @ wq + b
    w_fused = h @ np.diag(s) @ wt.astype(np.float64)
    wq = ref_weight(w_fused.astype(np.float32).astype(np.float64), config.weight_bits, config.weight_block)
    if not transform.center:
        return ref_tokens(xt, config.act_bits) @ wq + b
    if bias_mode is BiasCorrection.QUANTIZED_TOKEN:
        y = ref_tokens(np.concatenate([xt, mt], axis=1), config.act_bits) @ wq
        return y[:, :-1] + y[:, -1:] + b
    w_corr = wq if bias_mode is BiasCorrection.FLOAT_TOKEN else ref_int8_per_channel(w_fused.astype(np.float32))
    return ref_tokens(xt, config.act_bits) @ wq + mt @ w_corr + b


@pytest.mark.parametrize("width", [72, 1152])
@pytest.mark.parametrize("method", list(Method))
@pytest.mark.parametrize("config", [QuantConfig(4, 4), QuantConfig(6, 6), QuantConfig(8, 8), QuantConfig(4, 8)],
                         ids=lambda c: c.label)
def test_onnxruntime_matches_numpy_reference(width, method, config):
    model, wt, b = linear_model(width, 144)
    x = dit_like_input(width)
    x64 = x.astype(np.float64)
    stats = {"x": SiteStats(np.abs(x64).max((0, 1)), np.abs(x64 - x64.mean(1, keepdims=True)).max((0, 1)))}
    bias_modes = list(BiasCorrection) if method.recipe.center else [BiasCorrection.FLOAT_TOKEN]
    for bias_mode in bias_modes:
        model, wt, b = linear_model(width, 144)
        options = TransformOptions(method=method, bias_correction=bias_mode, hadamard_block=8 if width == 72 else None)
        result = quantize_model(model, stats, options, config, ALL)
        got = create_session(serialize(model)).run(None, {"x": x})[0].astype(np.float64)
        expected = reference(x, wt, b, result.transforms["linear"], bias_mode, config)
        rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert rel <= 1e-3, (bias_mode, rel)
        # ... and quantization did something: far from the float linear at 4 bits.
        if config.act_bits == 4:
            float_out = x64 @ wt + b
            assert np.linalg.norm(got - float_out) / np.linalg.norm(float_out) > 1e-3


def test_weights_stored_in_4_bits():
    """int4 weights + scales take <= 0.3x the bytes of the same weights in FP16."""
    import onnx_ir as ir

    model, wt, _ = linear_model(1152, 4608)
    quantize_model(model, {}, TransformOptions(method=Method.QUAROT), QuantConfig(4, 4), ALL)
    proto_bytes = serialize(model)
    reloaded = ir.serde.deserialize_model(__import__("onnx").load_from_string(proto_bytes))
    dq = [n for n in reloaded.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    assert len(dq) == 1
    q, scale = dq[0].inputs[0].const_value, dq[0].inputs[1].const_value
    assert q.dtype == ir.DataType.INT4
    stored = len(q.tobytes()) + len(scale.tobytes())
    assert stored <= 0.3 * wt.size * 2, stored / (wt.size * 2)
    assert len(proto_bytes) <= 0.3 * wt.size * 2 + 200_000  # the file holds no float copy of the weight

"""The `nbits` and `fused` output formats: same quantized maths as the `qdq` graph, weights 4-bit in memory.

* `fused` vs `qdq` on one site's linear (every method, bias-correction mode, bit width 3/4/6/8, widths 72, 1152 and
  4608, batch 1 and 3): relative L2 <= 1e-5. Both graphs carry the same integers and scales and compute the same
  codes (the quantize op's body uses the same float ops as the qdq graph's quantizer, and the kernels run the same
  transform code as the transform kernels), so only the float summation order of the matmul differs: ~1e-7.
* `nbits` vs `qdq`: MatMulNBits (accuracy level 4) re-quantizes the A-bit activation rows to int8 per block of 128,
  a second, finer rounding: at W4A4 it must add less than a quarter of the qdq graph's own error.
* onnxruntime's optimized model of a `fused` (library registered) and an `nbits` graph holds no float copy of a
  site weight; the `qdq` graph's does (the test fails if the session option ever stops folding, too).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graph_passes.linears import find_activation_sites
from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.pipeline import quantize_model
from graph_passes.quantization import OutputFormat, QuantConfig
from runtime.session import create_session
from tests.graphs import dit_like_input, linear_model, serialize
from tests.roles import PIXART_BLOCKS
from tests.test_passes import ALL, calibration_stats, rel_l2

OUT = 200  # output channels of the site linear: 12.5 column tiles of 16 (a partial tile)
CONFIGS = [(m, b) for m in Method for b in (BiasCorrection if m.recipe.center else [BiasCorrection.FLOAT_TOKEN])]


IMPLEMENTATIONS = [pytest.param(False, id="function-bodies"), pytest.param(True, id="kernels")]


def _quantized(width: int, method: Method, bias: BiasCorrection, bits: int,
               fmt: OutputFormat = OutputFormat.QDQ) -> tuple[ir.Model, np.ndarray]:
    """One site's linear quantized and written in `fmt` (each format from the same plan)."""
    model, _, _ = linear_model(width, OUT)
    x = dit_like_input(width, batch=3, tokens=16)
    stats = calibration_stats(model, x)
    options = TransformOptions(method=method, bias_correction=bias, hadamard_block=8 if width == 72 else None)
    quantize_model(model, stats, options, QuantConfig(weight_bits=bits, act_bits=bits, format=fmt), ALL)
    return model, x


@pytest.mark.parametrize("use_kernels", IMPLEMENTATIONS)
@pytest.mark.parametrize("width", [72, 1152, 4608])
@pytest.mark.parametrize("method,bias", CONFIGS, ids=[f"{m.value}-{b.value}" for m, b in CONFIGS])
def test_fused_equals_qdq(use_kernels, width, method, bias, request):
    if use_kernels:
        request.getfixturevalue("kernel_library")  # built once, or the test is skipped with the reason
    for bits in (3, 4, 6, 8):
        qdq, x = _quantized(width, method, bias, bits)
        fused, _ = _quantized(width, method, bias, bits, OutputFormat.FUSED)
        assert not [n for n in fused.graph if n.op_type in ("MatMul", "QuantizeLinear", "DequantizeLinear")]
        sessions = [create_session(serialize(m), kernel_library=use_kernels) for m in (qdq, fused)]
        for batch in (x[:1], x):
            want, got = (s.run(None, {"x": batch})[0] for s in sessions)
            assert rel_l2(got, want) <= 1e-5, (bits, batch.shape)


@pytest.mark.parametrize("width", [72, 1152])
@pytest.mark.parametrize("method,bias", [(Method.NONE, BiasCorrection.FLOAT_TOKEN),
                                         (Method.HADANORM, BiasCorrection.FLOAT_TOKEN),
                                         (Method.HADANORM, BiasCorrection.QUANTIZED_TOKEN),
                                         (Method.HADANORM, BiasCorrection.EXACT)])
def test_nbits_close_to_qdq(width, method, bias):
    qdq, x = _quantized(width, method, bias, 4)
    nbits, _ = _quantized(width, method, bias, 4, OutputFormat.NBITS)
    assert [n.op_type for n in nbits.graph].count("MatMulNBits") == 1
    float_model, _, _ = linear_model(width, OUT)
    reference = create_session(serialize(float_model)).run(None, {"x": x})[0]
    want = create_session(serialize(qdq)).run(None, {"x": x})[0]
    got = create_session(serialize(nbits)).run(None, {"x": x})[0]
    assert rel_l2(got, want) <= 0.25 * rel_l2(want, reference)


def _float_bytes(model: onnx.ModelProto) -> int:
    floats = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}
    return sum(int(np.prod(t.dims)) * floats[t.data_type] for t in model.graph.initializer if t.data_type in floats)


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_optimized_model_keeps_weights_4bit(tiny_onnx, hn_cli, tmp_path, fmt, request):
    """onnxruntime's optimized model adds no float copy of a site weight to the float tensors the file carries
    (nbits, fused); as written it adds one per site weight (qdq: every weight DequantizeLinear folded to float32)."""
    if fmt is OutputFormat.FUSED:
        request.getfixturevalue("kernel_library")  # the kernels keep the weights packed (bodies fold them)
    out = tmp_path / f"tiny.{fmt.value}.onnx"
    result = hn_cli(tiny_onnx, "--w4a4", "--format", fmt.value, "--calib-samples", "1", "--calib-steps", "2",
                    "-o", out, "--no-progress")
    assert result.exit_code == 0, result.err
    sites = find_activation_sites(ir.load(tiny_onnx), PIXART_BLOCKS)
    site_bytes = sum(lin.weight.const_value.nbytes for site in sites for lin in site.linears)
    file_bytes = _float_bytes(onnx.load(out))  # non-site weights, transform parameters, scales
    optimized = tmp_path / "optimized.onnx"
    create_session(out, kernel_library=fmt is OutputFormat.FUSED, optimized_model_path=optimized)
    opt = onnx.load(optimized)
    if fmt is OutputFormat.QDQ:
        assert _float_bytes(opt) >= file_bytes + 0.95 * site_bytes
        return
    assert _float_bytes(opt) <= file_bytes + 0.01 * site_bytes
    packed = [t for t in opt.graph.initializer if t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
              and len(t.dims) == 3]
    assert len(packed) == sum(len(site.linears) for site in sites)

"""Convolutions as activation sites: discovery, exact transforms, the quantized maths against torch, bad input."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
import onnx_ir as ir

from graph_passes.errors import GraphInputError
from graph_passes.linears import SiteSelection, find_activation_sites
from graph_passes.methods import Method, TransformOptions
from graph_passes.pipeline import quantize_model
from graph_passes.quantization import QuantConfig
from graph_passes.site_transforms import SiteStats
from runtime.session import create_session
from tests.graphs import serialize
from tests.random_graphs import ref_tokens

ALL = SiteSelection(include=("",))


def conv_model(channels: int = 64, seed: int = 0) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x [B, C, 8, 8] -> conv1 3x3 pad 1 -> Relu -> pw 1x1 (2C) -> dw depthwise 3x3 -> conv2 3x3 stride 2 (C) -> y.
    Weights named ``<module>.weight`` (module paths from parameter names)."""
    rng = np.random.default_rng(seed)
    c = channels
    w = {
        "conv1.weight": rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c),
        "conv1.bias": rng.standard_normal(c) * 0.1,
        "pw.weight": rng.standard_normal((2 * c, c, 1, 1)) / np.sqrt(c),
        "pw.bias": rng.standard_normal(2 * c) * 0.1,
        "dw.weight": rng.standard_normal((2 * c, 1, 3, 3)) / 3,
        "conv2.weight": rng.standard_normal((c, 2 * c, 3, 3)) / np.sqrt(18 * c),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "pw.weight", "pw.bias"], ["h2"], name="pw"),
        helper.make_node("Conv", ["h2", "dw.weight"], ["h3"], name="dw", pads=[1, 1, 1, 1], group=2 * c),
        helper.make_node("Conv", ["h3", "conv2.weight"], ["y"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", c, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", c, 4, 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto), {k: v.astype(np.float32) for k, v in w.items()}


def image(channels: int = 64, batch: int = 2, seed: int = 1) -> np.ndarray:
    """Per-channel offsets and a few outlier channels, as a UNet's feature maps."""
    rng = np.random.default_rng(seed)
    offsets = rng.standard_normal(channels)[None, :, None, None] * 2.0
    spread = np.exp(rng.standard_normal(channels) * 0.5)
    spread[:2] *= 20.0
    return (rng.standard_normal((batch, channels, 8, 8)) * spread[None, :, None, None] + offsets).astype(np.float32)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return create_session(serialize(model)).run(None, {"x": x})[0]


def copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def token_stats(model: ir.Model, x: np.ndarray) -> dict[str, SiteStats]:
    """Per-channel statistics of every conv site's input pixels (the calibration's definition)."""
    names = [s.activation.name for s in find_activation_sites(model, ALL)]
    proto = ir.serde.serialize_model(model)
    proto.graph.output.extend([onnx.ValueInfoProto(name=n) for n in names if n != "x"])
    session = create_session(proto.SerializeToString())
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))
    values["x"] = x
    stats = {}
    for name in names:
        a = values[name].astype(np.float64)
        t = a.transpose(0, 2, 3, 1).reshape(a.shape[0], -1, a.shape[1])
        stats[name] = SiteStats(np.abs(t).max((0, 1)), np.abs(t - t.mean(1, keepdims=True)).max((0, 1)))
    return stats


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_sites_of_convolutions():
    model, _ = conv_model()
    sites = {s.name: s for s in find_activation_sites(model, ALL)}
    assert list(sites) == ["conv1", "pw", "conv2"]  # the depthwise conv is not a site
    assert [sites[n].width for n in sites] == [64, 64, 128]
    assert {n: s.can_center for n, s in sites.items()} == {"conv1": False, "pw": True, "conv2": False}
    assert sites["pw"].linears[0].is_pointwise and not sites["conv2"].linears[0].is_pointwise
    assert sites["conv1"].linears[0].kind == "conv 3x3"


@pytest.mark.parametrize("method", list(Method))
def test_transform_only_is_exact(method):
    """Scale, rotation (fused into every tap) and centering (1x1 only) leave the function unchanged."""
    model, _ = conv_model()
    x = image()
    expected = run(model, x)
    transformed = copy(model)
    result = quantize_model(transformed, token_stats(model, x), TransformOptions(method=method), None, ALL)
    assert rel(run(transformed, x), expected) <= 1e-5
    centered = {name for name, t in result.transforms.items() if t.center}
    assert centered == ({"pw"} if method.recipe.center else set())


def _ref_weight(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Symmetric int-b of W [out, in, kh, kw] as the matrix [in * kh * kw, out] in blocks of block * kh * kw rows."""
    out, cin = w.shape[:2]
    taps = w.shape[2] * w.shape[3]
    m = w.astype(np.float64).reshape(out, cin * taps).T
    rows = min(block, cin) * taps
    qmax = 2 ** (bits - 1) - 1
    deq = np.empty_like(m)
    for start in range(0, m.shape[0], rows):
        part = m[start:start + rows]
        scale = (np.abs(part).max(axis=0) / qmax).astype(np.float32).astype(np.float64)
        scale[scale == 0] = 1.0
        deq[start:start + rows] = np.clip(np.round(part / scale), -qmax, qmax) * scale
    return deq.T.reshape(w.shape)


def _pixels(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1).reshape(a.shape[0], -1, a.shape[1])


def _image(t: np.ndarray, like: np.ndarray) -> np.ndarray:
    b, c, h, w = like.shape
    return t.reshape(b, h, w, c).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("method", [Method.NONE, Method.QUAROT, Method.HQDM])
@pytest.mark.parametrize("block", [128, 32])
def test_quantized_conv_matches_torch_reference(method, block):
    """One 3x3 conv site at W4A4: ONNX Runtime equals torch's conv2d of the reference-quantized pixels and kernel."""
    model, w = conv_model()
    x = image()
    sel = SiteSelection(include=("^conv1$",))
    config = QuantConfig(4, 4, weight_block=block)
    result = quantize_model(model, token_stats(model, x), TransformOptions(method=method, hadamard_block=32), config, sel)
    transform = result.transforms["conv1"]
    h = transform.hadamard.matrix() if transform.hadamard is not None else np.eye(64)
    t = _pixels(x.astype(np.float64))
    if transform.rotate_back:  # HQ-DM: quantize x H^T, rotate back, unrotated kernel
        xq, kernel = ref_tokens(t @ h.T, 4) @ h, _ref_weight(w["conv1.weight"], 4, block)
    else:  # the rotation fused into every tap, then quantized
        xq = ref_tokens(t @ h.T, 4)
        fused = np.einsum("oikl,ji->ojkl", w["conv1.weight"].astype(np.float64), h)
        kernel = _ref_weight(fused.astype(np.float32), 4, block)
    h1 = torch.nn.functional.conv2d(torch.from_numpy(_image(xq, x)), torch.from_numpy(kernel),
                                    torch.from_numpy(w["conv1.bias"].astype(np.float64)), padding=1)
    # the float layers after conv1, in torch
    h2 = torch.nn.functional.conv2d(torch.relu(h1), torch.from_numpy(w["pw.weight"].astype(np.float64)),
                                    torch.from_numpy(w["pw.bias"].astype(np.float64)))
    h3 = torch.nn.functional.conv2d(h2, torch.from_numpy(w["dw.weight"].astype(np.float64)), padding=1, groups=128)
    want = torch.nn.functional.conv2d(h3, torch.from_numpy(w["conv2.weight"].astype(np.float64)), padding=1,
                                      stride=2).numpy()
    got = run(model, x)
    assert rel(got, want) <= 1e-3
    float_out = run(conv_model()[0], x)
    assert rel(got, float_out) > 1e-2  # and quantization did something


@pytest.mark.parametrize("method", list(Method))
def test_w8a8_close_to_float_every_method(method):
    """Every site quantized (two 3x3 convs, one 1x1 conv as a MatMul): W8A8 stays within 2% of the float model
    (8-bit per-token/per-block quantization noise is ~0.5% per layer)."""
    model, _ = conv_model()
    x = image()
    expected = run(model, x)
    quantize_model(model, token_stats(model, x), TransformOptions(method=method), QuantConfig(8, 8), ALL)
    assert rel(run(model, x), expected) <= 0.02
    assert not [n for n in model.graph if n.op_type == "Conv" and n.name == "pw"]  # 1x1 conv became a MatMul


def test_grouped_conv_named_explicitly_is_an_error():
    model, _ = conv_model()
    with pytest.raises(GraphInputError, match=r"^dw is a grouped convolution \(group 128\): .* --exclude 'dw\$'$"):
        find_activation_sites(model, SiteSelection(include=("dw",), explicit=True))
    assert [s.name for s in find_activation_sites(model, SiteSelection(include=("dw", "pw")))] == ["pw"]


def test_cli_refuses_bad_conv_input(hn_cli, tmp_path):
    """Grouped conv named by --include; a width the chosen Hadamard block cannot split: one line, exit 2, no file."""
    model, _ = conv_model(channels=72)
    path = tmp_path / "convs.onnx"
    path.write_bytes(serialize(model))
    out = tmp_path / "out.onnx"
    cases = [
        (("--include", "dw"), r"^error: dw is a grouped convolution \(group 144\)"),
        (("--method", "hqdm"), r"^error: width 72 is not a multiple of the Hadamard block size 32; use "),
        (("--method", "quarot", "--hadamard", "block", "--hadamard-block", "64"),
         r"^error: width 72 is not a multiple of the Hadamard block size 64"),
    ]
    for args, pattern in cases:
        result = hn_cli(path, *args, "-o", out, "--no-progress")
        assert result.exit_code == 2, (args, result.err)
        assert len(result.err.strip().splitlines()) == 1, result.err
        assert re.match(pattern, result.err), result.err
        assert not out.exists() and not list(tmp_path.glob(".*tmp*"))

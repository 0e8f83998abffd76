"""Transform passes: structure (op counts) and numbers (onnxruntime vs the original graph) on small graphs."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.hadamard import HadamardMode
from graph_passes.linears import SiteSelection, find_activation_sites
from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.pipeline import quantize_model
from graph_passes.site_transforms import SiteStats
from runtime.domain import HADANORM_DOMAIN
from runtime.session import create_session
from tests.graphs import dit_like_input, mlp_model, serialize
from tests.roles import ALL_PIXART

ALL = ALL_PIXART
WIDTHS = [(72, 288), (1152, 4608), (4608, 1152)]


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """All graph outputs, flattened and concatenated."""
    return np.concatenate([o.ravel() for o in create_session(serialize(model)).run(None, {"x": x})])


def calibration_stats(model: ir.Model, x: np.ndarray) -> dict[str, SiteStats]:
    """Exact statistics of each site's input, computed by running the float graph in numpy-land via onnxruntime."""
    sites = find_activation_sites(model, ALL)
    probe = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    names = [s.activation.name for s in sites]
    for node in probe.graph:
        for out in node.outputs:
            if out.name in names and not out.is_graph_output():
                probe.graph.outputs.append(out)
    outs = dict(zip([o.name for o in probe.graph.outputs], create_session(serialize(probe)).run(None, {"x": x})))
    outs["x"] = x
    stats = {}
    for site in sites:
        a = outs[site.activation.name].astype(np.float64)
        centered = a - a.mean(axis=1, keepdims=True)
        stats[site.activation.name] = SiteStats(np.abs(a).max((0, 1)), np.abs(centered).max((0, 1)))
    return stats


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize("width,hidden", WIDTHS)
@pytest.mark.parametrize("method", list(Method))
def test_transform_only_equals_original(width, hidden, method):
    model = mlp_model(width, hidden)
    x = dit_like_input(width)
    expected = run(model, x)
    stats = calibration_stats(model, x)
    for bias in BiasCorrection:
        transformed = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        options = TransformOptions(method=method, bias_correction=bias, hadamard_block=8 if width == 72 else None)
        quantize_model(transformed, stats, options, None, ALL)
        assert rel_l2(run(transformed, x), expected) <= 1e-5, (method, bias)


@pytest.mark.parametrize("mode,block", [(HadamardMode.FULL, 128), (HadamardMode.BLOCK, 8)])
def test_transform_only_block_hadamard_equals_original(mode, block):
    model = mlp_model(72, 288)
    x = dit_like_input(72)
    expected = run(model, x)
    options = TransformOptions(method=Method.HADANORM, hadamard=mode, hadamard_block=block)
    quantize_model(model, calibration_stats(model, x), options, None, ALL)
    assert rel_l2(run(model, x), expected) <= 1e-5


EXPECTED_TRANSFORM_OPS = {
    Method.NONE: {},
    Method.SMOOTHQUANT: {"Scale": 2},
    Method.QUAROT: {"ScaleRotate": 2},
    Method.SDCB: {"ScaleRotate": 2},
    Method.DYNCENTER: {"CenterScale": 2},
    Method.HADANORM: {"CenterScaleRotate": 2},
    Method.HQDM: {"ScaleRotate": 4},  # the rotation and the back rotation at each site
}


@pytest.mark.parametrize("method", list(Method))
@pytest.mark.parametrize("bias", list(BiasCorrection))
def test_structure(method, bias):
    """Op counts: one transform per site (2 sites: x -> up+side, act -> down), 3 MatMuls, correction nodes."""
    # Concat: one per centered site (2); Slice: 2 per centered MatMul (3).
    model = mlp_model(72, 288)
    x = dit_like_input(72)
    options = TransformOptions(method=method, bias_correction=bias, hadamard_block=8)
    quantize_model(model, calibration_stats(model, x), options, None, ALL)
    counts = collections.Counter(n.op_type for n in model.graph if n.domain == HADANORM_DOMAIN)
    assert dict(counts) == EXPECTED_TRANSFORM_OPS[method]
    ops = collections.Counter(n.op_type for n in model.graph)
    centered = method.recipe.center
    extra_matmuls = 3 if centered and bias is not BiasCorrection.QUANTIZED_TOKEN else 0
    assert ops["MatMul"] == 3 + extra_matmuls
    assert ops["Concat"] == (2 if centered and bias is BiasCorrection.QUANTIZED_TOKEN else 0)
    assert sum(1 for n in model.graph if n.op_type == "MatMul" and n.inputs[0].producer() is not None
               and n.inputs[0].producer().domain == HADANORM_DOMAIN) == (0 if method is Method.NONE else
                                                                         0 if centered and bias is BiasCorrection.QUANTIZED_TOKEN else 3 + extra_matmuls)
    assert ops["Slice"] == (6 if centered and bias is BiasCorrection.QUANTIZED_TOKEN else 0)
    functions = {f.name for f in model.functions.values()}
    assert functions == set(EXPECTED_TRANSFORM_OPS[method])


def test_shared_weight_outside_site_is_copied():
    """A weight read by a selected linear and by another node keeps its original value for the other node."""
    model = mlp_model(72, 288)
    x = dit_like_input(72)
    expected = run(model, x)
    stats = calibration_stats(model, x)
    selection = SiteSelection(include=("^side$",))
    graph = model.graph
    w_side = graph.initializers["w_side"]
    # A second reader of w_side outside any site: other = gelu(x) @ w_side, one more graph output.
    gelu = ir.Node("", "Gelu", [graph.inputs[0]], name="other_gelu")
    extra = ir.Node("", "MatMul", [gelu.outputs[0], w_side], name="other_reader")
    graph.extend([gelu, extra])
    extra.outputs[0].name = "other"
    extra.outputs[0].type, extra.outputs[0].shape = graph.outputs[1].type, graph.outputs[1].shape
    graph.outputs.append(extra.outputs[0])
    expected = run(model, x)
    quantize_model(model, stats, TransformOptions(method=Method.HADANORM), None, selection)
    assert np.array_equal(graph.initializers["w_side"].const_value.numpy(),
                          mlp_model(72, 288).graph.initializers["w_side"].const_value.numpy())
    assert rel_l2(run(model, x), expected) <= 1e-5

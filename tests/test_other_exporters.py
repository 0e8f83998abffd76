"""ONNX files from other exporters: torch's TorchScript exporter (``dynamo=False``, what optimum uses) at opset 17
(converted to 21) and 21, against the same model exported with `hn-export export` (dynamo, opset 21).

The same seeded model exported three ways must give the same linears (module paths, in/out features), the same
activation sites, roles and widths, and ``--transform-only`` outputs that agree; W4A4 runs end to end on the
TorchScript graph. Also: opsets that cannot be converted (one line, exit 2, nothing written), graphs whose module
paths are gone (generic roles and a warning), external data through the opset conversion, and the two graph passes
behind the import (the no-op Squeeze inside ``If`` and ``Gemm`` linears) on hand-built graphs.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graph_passes.fix_noop_squeeze import FixNoopSqueezePass
from graph_passes.gemm_to_matmul import GemmToMatMulPass
from graph_passes.linears import find_linears, module_path_of
from hn_export.export import TransformerForExport, example_inputs
from hn_export.families import role_table
from hn_export.graph_import import load_graph
from hn_export.model_files import load_model
from hn_export.ort_models import open_session
from models.build import ModelSource, build_transformer, family_of_model
from models.families import FAMILIES

PRESETS = ("tiny", "sd3-tiny")  # PixArt-Sigma and SD3 (joint attention, adaLN linears on 2-D inputs as Gemm)
KINDS = ("dynamo", "ts17", "ts21")

# --transform-only vs its own FP graph (relative L2). Measured (hadanorm, calibration 1 sample x 2 steps, batch 3,
# caption length 5): tiny dynamo 3.3e-7, ts17 3.4e-7, ts21 3.3e-7; sd3-tiny 4.6e-7, 6.4e-7, 5.2e-7. The README
# promises <= 1e-5 for every method.
TRANSFORM_TOL = 1e-5
# One model through two exporters (FP graphs, and the transformed graphs), and each FP graph vs torch (relative L2).
# Measured: tiny FP ts17/ts21 vs dynamo 5.7e-7/5.5e-7, transformed 6.0e-7/5.5e-7, FP vs torch <= 5.5e-7; sd3-tiny
# FP 3.1e-7/3.2e-7, transformed 4.8e-7/4.2e-7, FP vs torch <= 3.1e-7 (float32 summation order only). Bound 1e-5.
EXPORTER_TOL = 1e-5


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))


def torchscript_export(model: torch.nn.Module, opset: int, path: Path) -> Path:
    """`model` exported as optimum does (torch.onnx.export, dynamo=False), with our input/output and axis names."""
    family = family_of_model(model)
    specs = family.input_specs(model, False)
    names = [spec.name for spec in specs]
    wrapper = TransformerForExport(model, family, names).eval()
    inputs = example_inputs(model, family, torch.float32, False)
    axes = {spec.name: dict(spec.dynamic) for spec in specs if spec.dynamic}
    axes["sample"] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs[n] for n in names), str(path), dynamo=False, opset_version=opset,
                          input_names=names, output_names=["sample"], dynamic_axes=axes)
    return path


def _feeds_and_reference(model: torch.nn.Module) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Inputs with another batch (3) and caption length (5) than the exports traced, and torch's output."""
    family = family_of_model(model)
    feeds = {k: v.numpy() for k, v in family.example_inputs(model, 3, 5, 1, torch.float32, False).items()}
    with torch.no_grad():
        reference = family.forward(model, {k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    return feeds, reference


@pytest.fixture(scope="module", params=PRESETS)
def exported(request, tmp_path_factory) -> dict:
    """One seeded model of the preset: the dynamo export (hn-export export; for `tiny` the session's), TorchScript
    exports at opsets 17 and 21, the torch model's output on the feeds."""
    preset = request.param
    folder = tmp_path_factory.mktemp(f"exporters-{preset}")
    paths = {"dynamo": request.getfixturevalue("preset_onnx")(preset)}  # --preset P --seed 0, shared
    model = build_transformer(ModelSource(preset=preset, seed=0))
    for opset in (17, 21):
        paths[f"ts{opset}"] = torchscript_export(model, opset, folder / f"ts{opset}.onnx")
    feeds, reference = _feeds_and_reference(model)
    return {"preset": preset, "paths": paths, "feeds": feeds, "torch": reference, "folder": folder}


@pytest.fixture(scope="module")
def tiny_torchscript(tmp_path_factory) -> dict:
    """The tiny PixArt (seed 0) for the graph-level checks: the model, its TorchScript exports at opsets 17 and 21,
    feeds and torch's output."""
    folder = tmp_path_factory.mktemp("torchscript-tiny")
    model = build_transformer(ModelSource(preset="tiny", seed=0))
    paths = {f"ts{opset}": torchscript_export(model, opset, folder / f"ts{opset}.onnx") for opset in (17, 21)}
    feeds, reference = _feeds_and_reference(model)
    return {"model": model, "paths": paths, "feeds": feeds, "torch": reference}


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with open_session(model) as session:
        return session.run(None, feeds)[0]


def layers_json(hn_cli, path: Path, *args: str) -> dict:
    result = hn_cli("layers", path, "--json", *args)
    assert result.exit_code == 0, result.err
    return json.loads(result.out)


# ---------------------------------------------------------------------------------------------------------------
# linears, sites and roles
# ---------------------------------------------------------------------------------------------------------------


def test_torchscript_linears_found_in_the_raw_graph(exported):
    """Before any import step: module paths from the scoped node names, weights as transposed `onnx::MatMul_N`
    initializers (MatMul) or parameter-named `[out, in]` weights (Gemm, transB=1), the same in/out features as the
    dynamo graph's linears."""
    dynamo = {lin.module_path: (lin.in_features, lin.out_features)
              for lin in find_linears(load_model(exported["paths"]["dynamo"]))}
    for kind in ("ts17", "ts21"):
        linears = find_linears(ir.load(exported["paths"][kind]))
        assert {lin.module_path: (lin.in_features, lin.out_features) for lin in linears} == dynamo, kind
        ops = {lin.module_path: lin.node.op_type for lin in linears}
        for lin in linears:
            if lin.is_conv:  # the patch embedding (a conv in either exporter)
                assert lin.module_path.endswith("pos_embed.proj") and lin.node.op_type == "Conv"
            elif lin.node.op_type == "MatMul":  # on [B, N, d] tokens: a transposed [in, out] weight, generated name
                assert lin.weight.name.startswith("onnx::MatMul_"), lin.weight.name
                assert tuple(lin.weight.const_value.shape) == (lin.in_features, lin.out_features)
            else:  # on 2-D [B, d] inputs (timestep embedding, modulation): Gemm, the parameter as it is
                assert lin.node.op_type == "Gemm" and lin.node.attributes["transB"].as_int() == 1
                assert lin.weight.name == f"{lin.module_path}.weight"
                assert tuple(lin.weight.const_value.shape) == (lin.out_features, lin.in_features)
        assert "MatMul" in ops.values() and "Gemm" in ops.values(), ops


def test_same_sites_roles_and_widths(exported, hn_cli, caplog):
    paths = exported["paths"]
    listed = {}
    for kind in KINDS:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            listed[kind] = layers_json(hn_cli, paths[kind])
        opset_lines = [r.message for r in caplog.records if "opset" in r.message]
        if kind == "ts17":
            assert len(opset_lines) == 1 and "opset 17: converted to opset 21" in opset_lines[0], opset_lines
        else:
            assert not opset_lines, opset_lines
    want = listed["dynamo"]
    assert want["family"] is not None and want["sites"]
    for kind in ("ts17", "ts21"):
        got = listed[kind]
        assert got["family"] == want["family"]
        key = [(s["name"], s["role"], s["block"], s["width"], s["linears"]) for s in got["sites"]]
        assert key == [(s["name"], s["role"], s["block"], s["width"], s["linears"]) for s in want["sites"]], kind
        assert [(lin["module"], lin["op"], lin["in_features"], lin["out_features"]) for lin in got["linears"]] == \
            [(lin["module"], lin["op"], lin["in_features"], lin["out_features"]) for lin in want["linears"]], kind
        assert "linear" not in {s["role"] for s in got["sites"]}  # every block linear named by the role rules


@pytest.mark.parametrize("name,path", [
    ("/transformer/transformer_blocks.0/attn1/to_q/MatMul", "transformer.transformer_blocks.0.attn1.to_q"),
    ("/transformer_blocks.1/attn2/to_out.0/MatMul_1", "transformer_blocks.1.attn2.to_out.0"),  # no wrapper
    ("/proj_out/Gemm", "proj_out"),
])
def test_module_path_from_torchscript_node_names(name, path):
    """The scope of the node name, with or without a wrapper prefix; the role table finds the block in both."""
    node = ir.node("MatMul", [ir.Value(name="x"), ir.Value(name="onnx::MatMul_123")], name=name)
    assert module_path_of(node) == path
    named = role_table(FAMILIES["pixart-sigma"]).site_of(path)
    if "transformer_blocks" in path:
        block = int(path.split("transformer_blocks.")[1].split(".")[0])
        assert named is not None and named.block == block
    else:
        assert named is None


def test_opsets_14_to_20_convert_and_match_torch(tiny_torchscript, tmp_path, caplog):
    """TorchScript exports at opsets 14-20 convert to 21 and run (the If/Squeeze fixed); 17 is also the main case
    above. Measured (tiny, every opset 14-21): relative L2 vs torch 2.6e-7 to 2.7e-7."""
    model, exported = tiny_torchscript["model"], tiny_torchscript
    for opset in (14, 16, 18, 20):
        path = torchscript_export(model, opset, tmp_path / f"ts{opset}.onnx")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            imported = load_graph(path)
        assert [r.message for r in caplog.records] == [
            (f"{path} uses ONNX opset {opset}: converted to opset 21 with onnx.version_converter (hn-export reads "
             "and writes opset 21)")]
        assert imported.opset_imports[""] == 21 and imported.ir_version == 10
        assert rel_l2(run(imported, exported["feeds"]), exported["torch"]) <= EXPORTER_TOL, opset


# ---------------------------------------------------------------------------------------------------------------
# numbers: transform-only and W4A4
# ---------------------------------------------------------------------------------------------------------------


def test_transform_only_outputs_agree(exported, hn_cli):
    feeds, paths = exported["feeds"], exported["paths"]
    fp, transformed = {}, {}
    for kind in KINDS:
        out = exported["folder"] / f"{kind}.transformed.onnx"
        result = hn_cli(paths[kind], "--transform-only", "--calib-samples", "1", "--calib-steps", "2", "-o", out,
                        "--no-progress")
        assert result.exit_code == 0, result.err
        written = onnx.load(out, load_external_data=False)
        assert written.ir_version == 10 and {o.domain: o.version for o in written.opset_import}[""] == 21
        fp[kind] = run(load_graph(paths[kind]), feeds)
        transformed[kind] = run(load_model(out), feeds)
        assert rel_l2(fp[kind], exported["torch"]) <= EXPORTER_TOL, kind
        assert rel_l2(transformed[kind], fp[kind]) <= TRANSFORM_TOL, kind
    for kind in ("ts17", "ts21"):
        assert rel_l2(fp[kind], fp["dynamo"]) <= EXPORTER_TOL, kind
        assert rel_l2(transformed[kind], transformed["dynamo"]) <= EXPORTER_TOL, kind


def sites_line(out: str) -> str:
    match = re.search(r"\d+ activation sites, \d+ linears", out)
    assert match, out
    return match.group(0)


def sqnr_db(got: np.ndarray, want: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((got - want.astype(np.float64)) ** 2)))


def test_w4a4_end_to_end_on_torchscript_graph(exported, hn_cli):
    """Opset 17 TorchScript graph: converted, fixed, calibrated on its own trajectories, quantized, runs."""
    feeds, paths = exported["feeds"], exported["paths"]
    lines, sqnr = {}, {}
    for kind in ("dynamo", "ts17"):
        out = exported["folder"] / f"{kind}.w4a4.onnx"
        result = hn_cli(paths[kind], "--w4a4", "--calib-samples", "1", "--calib-steps", "2", "-o", out,
                        "--no-progress")
        assert result.exit_code == 0, result.err
        lines[kind] = sites_line(result.out)
        got = run(load_model(out), feeds)
        assert np.all(np.isfinite(got))
        sqnr[kind] = sqnr_db(got, run(load_graph(paths[kind]), feeds))
    assert lines["ts17"] == lines["dynamo"]
    # Measured (vs the own FP graph): tiny dynamo 18.65 dB, ts17 18.67 dB; sd3-tiny 20.19 dB both: the same
    # quantization up to float noise.
    assert abs(sqnr["ts17"] - sqnr["dynamo"]) <= 0.5, sqnr
    assert sqnr["ts17"] >= 10.0, sqnr


# ---------------------------------------------------------------------------------------------------------------
# bad input: opsets that cannot be converted
# ---------------------------------------------------------------------------------------------------------------


def _relabelled(src: Path, dst: Path, opset: int) -> None:
    model = onnx.load(src)
    model.opset_import[0].version = opset
    onnx.save(model, dst)


def _undeclared_domain(src: Path, dst: Path) -> None:
    model = onnx.load(src)
    node = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    node.domain = "com.example"  # an op of a domain the model does not import
    onnx.save(model, dst)


def _converter_failure(src: Path, dst: Path) -> None:
    """Opset 7 Slice written the opset-10 way (inputs instead of attributes): the converter's own error."""
    slice_node = helper.make_node("Slice", ["x", "starts", "ends"], ["y"], name="slice")
    graph = helper.make_graph([slice_node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.array([0]), "starts"),
                               numpy_helper.from_array(np.array([2]), "ends")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3), dst)


UNCONVERTIBLE = {
    "opset 7": (lambda src, dst: _relabelled(src, dst, 7),
                ("(LayerNormalization) is not in ONNX opset 7 (it came in opset 17), so the model cannot be "
                 "converted from opset 7 to 21; re-export the model at opset 21")),
    "unknown domain": (_undeclared_domain, "uses the operator domain 'com.example', which the model does not import"),
    "converter": (_converter_failure, ("onnx's version converter cannot convert this model from opset 7 to 21 "
                                       "(Input starts is undefined!); re-export the model at opset 21")),
}


@pytest.mark.parametrize("case", list(UNCONVERTIBLE))
@pytest.mark.parametrize("command", ["quantize", "layers"])
def test_unconvertible_opset_is_one_line_and_writes_nothing(tiny_torchscript, hn_cli, tmp_path, case, command):
    make, expected = UNCONVERTIBLE[case]
    bad = tmp_path / "bad.onnx"
    make(tiny_torchscript["paths"]["ts17"], bad)
    out = tmp_path / "out"
    out.mkdir()
    args = [bad, "--w4a4", "-o", out / "q.onnx"] if command == "quantize" else ["layers", bad]
    result = hn_cli(*args)
    lines = result.err.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.err
    assert lines[0].startswith(f"error: {bad}: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.err + result.out
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# module paths that cannot be recovered
# ---------------------------------------------------------------------------------------------------------------


def strip_module_paths(src: Path, dst: Path) -> dict[str, str]:
    """No node names, no metadata, weights renamed w0, w1, ...; returns new weight name -> module path."""
    paths = {lin.weight.name: lin.module_path for lin in find_linears(ir.load(src))}
    model = onnx.load(src)
    renames = {old: f"w{i}" for i, old in enumerate(paths)}
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        node.name = ""
        del node.metadata_props[:]
        node.input[:] = [renames.get(name, name) for name in node.input]
    onnx.save(model, dst)
    return {renames[old]: path for old, path in paths.items()}


def test_stripped_module_paths_get_generic_roles(tiny_torchscript, hn_cli, tmp_path, caplog):
    stripped = tmp_path / "stripped.onnx"
    weights = strip_module_paths(tiny_torchscript["paths"]["ts21"], stripped)
    block_weights = {w for w, path in weights.items() if ".transformer_blocks." in path}
    assert len(block_weights) == 20  # 2 blocks x 10 linears
    with caplog.at_level(logging.WARNING):
        listed = layers_json(hn_cli, stripped, "--include", "")
    assert any("generic role 'linear'" in r.message for r in caplog.records)
    assert listed["family"] is None
    assert {s["role"] for s in listed["sites"]} == {"linear"}
    in_sites = {name.removesuffix(".T") for s in listed["sites"] for name in s["linears"]}
    assert block_weights <= in_sites  # every block linear is a site's linear
    assert len(in_sites) == len(weights) == 27  # every linear (the Gemms as MatMul) and the patch-embedding conv
    result = hn_cli(stripped, "--w4a4", "--include", "", "--calib-samples", "1", "--calib-steps", "2",
                    "-o", tmp_path / "q.onnx", "--no-progress")
    assert result.exit_code == 0, result.err
    assert sites_line(result.out).endswith(" 27 linears")
    quantized = load_model(tmp_path / "q.onnx")
    weight_dqs = [n for n in quantized.graph  # the weights: DequantizeLinear of integer initializers, in blocks
                  if n.op_type == "DequantizeLinear" and n.inputs[0].is_initializer() and "block_size" in n.attributes]
    assert len(weight_dqs) == 27  # one 4-bit weight per linear and conv
    assert not block_weights & set(quantized.graph.initializers)  # no float block weight left


# ---------------------------------------------------------------------------------------------------------------
# external data through the opset conversion
# ---------------------------------------------------------------------------------------------------------------


def test_opset_conversion_keeps_external_weights_on_disk(tiny_torchscript, tmp_path):
    exported = tiny_torchscript
    path = tmp_path / "ext.onnx"
    onnx.save(onnx.load(exported["paths"]["ts17"]), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    model = load_graph(path)
    assert model.opset_imports[""] == 21 and model.ir_version == 10
    external = [v.name for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    block = [lin.weight.name for lin in find_linears(model) if ".transformer_blocks." in lin.module_path]
    assert set(block) <= set(external)  # converted without reading the weights
    in_memory = load_graph(exported["paths"]["ts17"])
    np.testing.assert_array_equal(run(model, exported["feeds"]), run(in_memory, exported["feeds"]))


# ---------------------------------------------------------------------------------------------------------------
# the passes on hand-built graphs
# ---------------------------------------------------------------------------------------------------------------


def _squeeze_if_nodes(x: str, out: str, prefix: str, tokens: int) -> list[onnx.NodeProto]:
    """torch's squeeze(1) as the TorchScript exporter writes it: If(Shape(x)[1] == 1, Squeeze(x, [1]), x), the
    branch outputs declared as that exporter declares them (then: the squeezed rank 2)."""
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], [f"{prefix}axes"], value=numpy_helper.from_array(np.array([1]))),
         helper.make_node("Squeeze", [x, f"{prefix}axes"], [f"{prefix}sq"], name=f"{prefix}squeeze")],
        f"{prefix}then", [], [helper.make_tensor_value_info(f"{prefix}sq", TensorProto.FLOAT, ["B", 8])])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", [x], [f"{prefix}id"])],
        f"{prefix}else", [], [helper.make_tensor_value_info(f"{prefix}id", TensorProto.FLOAT, ["B", tokens, 8])])
    return [
        helper.make_node("Shape", [x], [f"{prefix}shape"]),
        helper.make_node("Constant", [], [f"{prefix}one"], value=numpy_helper.from_array(np.array(1))),
        helper.make_node("Gather", [f"{prefix}shape", f"{prefix}one"], [f"{prefix}dim"], axis=0),
        helper.make_node("Equal", [f"{prefix}dim", f"{prefix}one"], [f"{prefix}cond"]),
        helper.make_node("If", [f"{prefix}cond"], [out], then_branch=then_branch, else_branch=else_branch,
                         name=f"{prefix}if"),
    ]


def _if_squeeze_model(tokens: int, nested: bool) -> ir.Model:
    """x [B, tokens, 8] -> Relu -> squeeze(1) as If -> y; `nested`: inside the then-branch of an outer If."""
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    shape = ["B", tokens, 8]
    if nested:
        outer_then = helper.make_graph(_squeeze_if_nodes("r", "inner", "in_", tokens), "outer_then", [],
                                       [helper.make_tensor_value_info("inner", TensorProto.FLOAT, shape)])
        outer_else = helper.make_graph([helper.make_node("Neg", ["r"], ["neg"])], "outer_else", [],
                                       [helper.make_tensor_value_info("neg", TensorProto.FLOAT, shape)])
        nodes += [helper.make_node("Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True))),
                  helper.make_node("If", ["flag"], ["y"], then_branch=outer_then, else_branch=outer_else)]
    else:
        nodes += _squeeze_if_nodes("r", "y", "", tokens)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def _session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("nested", [False, True])
def test_noop_squeeze_inside_if_is_folded(nested):
    model = _if_squeeze_model(16, nested)
    with pytest.raises(Exception, match="must be 1 instead of 16"):
        _session(model)
    assert FixNoopSqueezePass()(model).modified
    ops = [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]
    assert "Squeeze" not in ops and ops.count("If") == (1 if nested else 0)  # the outer If computes something
    assert "Shape" not in ops and "Equal" not in ops  # the folded If's condition went with it
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 16, 8)).astype(np.float32)
    np.testing.assert_array_equal(_session(model).run(None, {"x": x})[0], np.maximum(x, 0))


def test_real_squeeze_inside_if_is_kept():
    model = _if_squeeze_model(1, nested=False)  # the dimension is 1: torch squeezes it, so must the graph
    assert not FixNoopSqueezePass()(model).modified
    x = np.random.default_rng(0).standard_normal((2, 1, 8)).astype(np.float32)
    np.testing.assert_array_equal(_session(model).run(None, {"x": x})[0], np.maximum(x, 0)[:, 0])


def _gemm_model() -> tuple[ir.Model, dict[str, np.ndarray]]:
    """Three Gemms on x [B, 6]: transB=1 with alpha/beta and a [1, 5] bias, transB=0 without bias, transA=1."""
    rng = np.random.default_rng(3)
    arrays = {"a.weight": rng.standard_normal((5, 6)), "a.bias": rng.standard_normal((1, 5)),
              "b_w": rng.standard_normal((5, 4)), "c_w": rng.standard_normal((7, 3))}
    nodes = [
        helper.make_node("Gemm", ["x", "a.weight", "a.bias"], ["ya"], name="/m/a/Gemm", transB=1, alpha=0.5,
                         beta=2.0),
        helper.make_node("Gemm", ["ya", "b_w"], ["yb"], name="/m/b/Gemm"),
        helper.make_node("Gemm", ["z", "c_w"], ["yc"], name="/m/c/Gemm", transA=1),
    ]
    graph = helper.make_graph(
        nodes, "gemms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [7, "B"])],
        [helper.make_tensor_value_info("yb", TensorProto.FLOAT, ["B", 4]),
         helper.make_tensor_value_info("yc", TensorProto.FLOAT, ["B", 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    rng = np.random.default_rng(4)
    feeds = {"x": rng.standard_normal((3, 6)).astype(np.float32), "z": rng.standard_normal((7, 3)).astype(np.float32)}
    return ir.from_proto(proto), feeds


def test_gemm_linears_become_matmul_plus_add():
    model, feeds = _gemm_model()
    before = _session(model).run(None, feeds)
    paths = {lin.module_path: (lin.in_features, lin.out_features) for lin in find_linears(model)}
    assert paths == {"m.a": (6, 5), "m.b": (5, 4), "m.c": (7, 3)}  # from the scoped names
    assert GemmToMatMulPass()(model).modified
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "MatMul", "Gemm"]  # transA=1 is left alone
    linears = {lin.module_path: lin for lin in find_linears(model)}
    assert {p: (lin.in_features, lin.out_features) for p, lin in linears.items()} == paths
    a = linears["m.a"]
    assert a.is_matmul and a.bias is not None and tuple(a.bias.const_value.shape) == (5,)
    assert "a.weight" not in model.graph.initializers  # replaced by its scaled transpose
    after = _session(model).run(None, feeds)
    for got, want in zip(after, before):
        # measured 1.2e-7 relative (float32 rounding of alpha * W and beta * b)
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()

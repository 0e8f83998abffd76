"""Export of the tiny PixArt model: onnxruntime loads it and matches torch; interface; squeeze fix; checkpoints;
determinism.

The tiny model is exported once per session: fp32 through the CLI (`tiny_onnx` in conftest.py), fp16 through the API.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from graph_passes.fix_noop_squeeze import FixNoopSqueezePass
from hn_export.export import MASK_CAPTION_LENGTH, export_transformer
from models.build import InitKind, ModelSource, build_transformer, make_inputs
from tests.cli_runner import run_cli

FP32_TOL = 1e-4
FP16_TOL = 1e-2
SHAPES = [(1, 7), (3, 20), (1, 20), (3, 7)]




def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_ort(sess: ort.InferenceSession, inputs: dict[str, torch.Tensor], dtype=np.float32) -> np.ndarray:
    return sess.run(None, {k: v.numpy().astype(dtype) for k, v in inputs.items()})[0]


def torch_out(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float().numpy()


@pytest.fixture(scope="session")
def tiny_model():
    return build_transformer(ModelSource(preset="tiny", seed=0))


# `tiny_onnx` (session fixture in conftest.py): `hn-export export --preset tiny --seed 0 -o tiny.onnx`, in process.


@pytest.fixture(scope="session")
def tiny_fp16_onnx(tmp_path_factory, tiny_model) -> Path:
    path = tmp_path_factory.mktemp("export16") / "tiny16.onnx"
    files = export_transformer(tiny_model, path, fp16=True, progress=False)
    assert files == [path]
    return path


# ---------------------------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,length", SHAPES)
def test_fp32_export_matches_torch(tiny_onnx, tiny_model, batch, length):
    inputs = make_inputs(tiny_model, batch=batch, caption_length=length, seed=11)
    ref = torch_out(tiny_model, inputs)
    out = run_ort(session(tiny_onnx), inputs)
    assert out.shape == (batch, 8, 8, 8)
    assert np.abs(ref).max() > 0.5  # a real signal, not zeros
    assert np.abs(out - ref).max() <= FP32_TOL


@pytest.mark.parametrize("batch,length", [(1, 7), (3, 20)])
def test_fp16_export_matches_torch(tiny_fp16_onnx, tiny_model, batch, length):
    """fp16 graph vs the fp16 torch model (CPU) and vs the fp32 torch model: both within 1e-2 max abs."""
    inputs = make_inputs(tiny_model, batch=batch, caption_length=length, seed=12)
    half_model = copy.deepcopy(tiny_model).half()
    ref16 = torch_out(half_model, {k: v.half() for k, v in inputs.items()})
    ref32 = torch_out(tiny_model, inputs)
    out = run_ort(session(tiny_fp16_onnx), inputs, np.float16)
    assert out.dtype == np.float16
    assert np.abs(out.astype(np.float32) - ref16).max() <= FP16_TOL
    assert np.abs(out.astype(np.float32) - ref32).max() <= FP16_TOL


def test_masked_export_is_static_and_matches_torch(tmp_path, tiny_model):
    path = tmp_path / "masked.onnx"
    export_transformer(tiny_model, path, with_mask=True, progress=False)
    sess = session(path)
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [
        ("hidden_states", [2, 4, 8, 8]),
        ("timestep", [2]),
        ("encoder_hidden_states", [2, MASK_CAPTION_LENGTH, 32]),
        ("encoder_attention_mask", [2, MASK_CAPTION_LENGTH]),
    ]
    inputs = make_inputs(tiny_model, batch=2, caption_length=MASK_CAPTION_LENGTH, seed=13, with_mask=True)
    assert inputs["encoder_attention_mask"].min() == 0  # some tokens really are dropped
    ref = torch_out(tiny_model, inputs)
    out = run_ort(sess, inputs)
    assert np.abs(out - ref).max() <= FP32_TOL
    # the mask matters: without it the output differs
    unmasked = dict(inputs, encoder_attention_mask=torch.ones_like(inputs["encoder_attention_mask"]))
    assert np.abs(run_ort(sess, unmasked) - ref).max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# interface
# ---------------------------------------------------------------------------------------------------------------


def test_fp32_interface(tiny_onnx):
    sess = session(tiny_onnx)
    assert [(i.name, i.type, i.shape) for i in sess.get_inputs()] == [
        ("hidden_states", "tensor(float)", ["batch", 4, 8, 8]),
        ("timestep", "tensor(float)", ["batch"]),
        ("encoder_hidden_states", "tensor(float)", ["batch", "caption_length", 32]),
    ]
    assert [(o.name, o.type, o.shape) for o in sess.get_outputs()] == [("sample", "tensor(float)", ["batch", 8, 8, 8])]


def test_fp16_interface(tiny_fp16_onnx):
    sess = session(tiny_fp16_onnx)
    assert [i.type for i in sess.get_inputs()] == ["tensor(float16)"] * 3
    assert [o.type for o in sess.get_outputs()] == ["tensor(float16)"]


def test_model_header_and_metadata(tiny_onnx):
    proto = onnx.load(str(tiny_onnx))
    assert proto.ir_version == 10
    assert {o.domain: o.version for o in proto.opset_import}[""] == 21
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["hn_export.source"] == "preset tiny (seed 0, init dit-stats)"
    model = ir.load(tiny_onnx)
    namespaces = [n.metadata_props.get("namespace", "") for n in model.graph]
    assert any("transformer.transformer_blocks.0.attn1.to_q" in ns for ns in namespaces)
    assert any("transformer.transformer_blocks.1.ff.net.2" in ns for ns in namespaces)


def test_exported_graph_has_no_noop_squeeze(tiny_onnx):
    model = ir.load(tiny_onnx)
    ops = [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]
    assert ops.count("Identity") >= 1
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Squeeze":
            axes = ir.convenience.get_const_tensor(node.inputs[1]).numpy().reshape(-1)
            shape = node.inputs[0].shape
            for a in axes:
                assert shape[int(a)] == 1, f"{node.name} squeezes a dimension of size {shape[int(a)]}"


# ---------------------------------------------------------------------------------------------------------------
# the squeeze fix pass on a hand-built graph
# ---------------------------------------------------------------------------------------------------------------


def _squeeze_graph() -> ir.Model:
    """x[B,16,1,32] -> Squeeze(axes=[1]) -> y (graph output) -> Squeeze(axes=[1, 2]) -> z[B,16,32]."""
    f32 = ir.TensorType(ir.DataType.FLOAT)
    i64 = ir.TensorType(ir.DataType.INT64)
    x = ir.Value(name="x", type=f32, shape=ir.Shape(["B", 16, 1, 32]))
    axes1 = ir.Value(name="axes1", type=i64, shape=ir.Shape([1]), const_value=ir.tensor(np.array([1], np.int64)))
    axes2 = ir.Value(name="axes2", type=i64, shape=ir.Shape([2]), const_value=ir.tensor(np.array([1, 2], np.int64)))
    sq1 = ir.node("Squeeze", [x, axes1], name="sq1")
    sq1.outputs[0].name, sq1.outputs[0].type, sq1.outputs[0].shape = "y", f32, ir.Shape(["B", 16, 1, 32])
    sq2 = ir.node("Squeeze", [sq1.outputs[0], axes2], name="sq2")
    sq2.outputs[0].name, sq2.outputs[0].type, sq2.outputs[0].shape = "z", f32, ir.Shape(["B", 16, 32])
    graph = ir.Graph([x], [sq2.outputs[0], sq1.outputs[0]], nodes=[sq1, sq2], initializers=[axes1, axes2],
                     opset_imports={"": 21}, name="squeezes")
    return ir.Model(graph, ir_version=10)


def _ort_from_ir(model: ir.Model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def test_fix_noop_squeeze_pass_on_hand_built_graph():
    model = _squeeze_graph()
    with pytest.raises(Exception, match="must be 1 instead of 16"):
        _ort_from_ir(model)
    result = FixNoopSqueezePass()(model)
    assert result.modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("Identity") == 1
    assert ops.count("Squeeze") == 1  # the mixed one keeps only its size-1 axis
    squeeze = next(n for n in model.graph if n.op_type == "Squeeze")
    assert ir.convenience.get_const_tensor(squeeze.inputs[1]).numpy().tolist() == [2]
    assert [v.name for v in model.graph.outputs] == ["z", "y"]
    assert "axes1" not in model.graph.initializers and "axes2" not in model.graph.initializers
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    x = np.random.default_rng(0).standard_normal((3, 16, 1, 32)).astype(np.float32)
    z, y = _ort_from_ir(model).run(None, {"x": x})
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(z, x[:, :, 0, :])


def test_fix_noop_squeeze_pass_all_noop_and_untouched_cases():
    model = _squeeze_graph()
    # make the second squeeze a pure no-op too: axes [1] on [B,16,32]
    sq2 = list(model.graph)[1]
    sq2.replace_input_with(1, ir.Value(name="a", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]),
                                       const_value=ir.tensor(np.array([1], np.int64))))
    model.graph.initializers["a"] = sq2.inputs[1]
    FixNoopSqueezePass()(model)
    assert [n.op_type for n in model.graph] == ["Identity", "Identity"]
    # a Squeeze on a size-1 or symbolic dimension is left alone
    untouched = _squeeze_graph()
    first = list(untouched.graph)[0]
    first.inputs[1].const_value = ir.tensor(np.array([2], np.int64))  # size 1: a real squeeze
    first.outputs[0].shape = ir.Shape(["B", 16, 32])
    second = list(untouched.graph)[1]
    second.inputs[1].const_value = ir.tensor(np.array([0], np.int64))  # symbolic B: unknown
    assert not FixNoopSqueezePass()(untouched).modified
    assert [n.op_type for n in untouched.graph] == ["Squeeze", "Squeeze"]


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and determinism
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["transformer", "pipeline"])
def test_checkpoint_round_trip(tmp_path, layout):
    model = build_transformer(ModelSource(preset="tiny", seed=5))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder / "transformer" if layout == "pipeline" else folder)
    out = tmp_path / "from_ckpt.onnx"
    assert run_cli(["export", "--checkpoint", str(folder), "-o", str(out)]) == 0
    inputs = make_inputs(model, batch=3, caption_length=20, seed=14)
    ref = torch_out(model, inputs)
    got = run_ort(session(out), inputs)
    assert np.abs(got - ref).max() <= 1e-5
    # the checkpoint's weights were used, not a fresh seeded init (seed 0 differs from seed 5)
    other = torch_out(build_transformer(ModelSource(preset="tiny", seed=0)), inputs)
    assert np.abs(other - ref).max() > 0.1


def test_checkpoint_layers_and_sample_size_override(tmp_path):
    model = build_transformer(ModelSource(preset="tiny", seed=5))
    model.save_pretrained(tmp_path / "ckpt")
    one = build_transformer(ModelSource(checkpoint=tmp_path / "ckpt", layers=1, sample_size=16))
    assert len(one.transformer_blocks) == 1 and one.config.num_layers == 1
    assert one.pos_embed.pos_embed.shape == (1, 64, 72)
    torch.testing.assert_close(one.transformer_blocks[0].ff.net[2].weight, model.transformer_blocks[0].ff.net[2].weight)


def test_same_seed_gives_byte_identical_files(tiny_onnx, tmp_path):
    again = tmp_path / "again.onnx"
    assert run_cli(["export", "--preset", "tiny", "--seed", "0", "-o", str(again)]) == 0
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(tiny_onnx)
    assert again.stat().st_size > 500_000


def test_presets_seeded_weights():
    a = build_transformer(ModelSource(preset="tiny", seed=7, init=InitKind.PLAIN))
    b = build_transformer(ModelSource(preset="tiny", seed=7, init=InitKind.PLAIN))
    c = build_transformer(ModelSource(preset="tiny", seed=8, init=InitKind.PLAIN))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["proj_out.weight"], sc["proj_out.weight"])

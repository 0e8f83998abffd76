"""The fused attention (issue 18): the pass that finds every softmax attention, the hadanorm::Attention op's function
body and kernels, its CLI (`hn-export optimize --attention`, `--attention` of the quantize command) and reports.

Bounds:
* the ``float`` op against the original subgraph, whole models (every family's tiny preset, both exporters, masks):
  relative L2 <= 1e-5 (issue 18; measured 2e-7..9e-7: fp32 summation order and exp's last bits);
* one op, every path against the scalar reference: float 1e-5 relative L2 per output (measured ~1e-7), bf16 1e-4
  (the same bf16 products; measured ~1e-6 — a rounding of p that flips at a tie costs 2^-8 of one weight); a bf16
  op on a path that computes fp32 (AVX-512 and AVX2: no AMX tiles) against the scalar float reference, 1e-5;
* bf16 against exact float64 attention: 1e-2 relative L2 (bf16 keeps 8 bits: the measured level is 2e-3..4e-3);
* int8 (HadaNorm's transform on attention: `runtime/kernels/attention_int8.h`): every path's int8 codes are the same
  (the AVX-512 path computes them with attention_int8.cc's arithmetic, element for element) and so are the float
  steps around the int32 sums (p's codes from one polynomial, not exp): 1e-4 against the scalar reference (measured
  0, bit for bit, on every shape here); against exact float64 attention 5e-2 (int8 keeps 7 bits of each row: measured 1.2e-2..2.7e-2 with the
  peaky rows below, the q k^T codes the largest part);
* memory: 8192 x 8192 scores for one head would be 256 MB; the op's call must raise peak RSS by under 64 MB.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graph_passes.attention_op import AttentionPrecision
from graph_passes.fuse_attention import find_attention
from hn_export.cli import main
from hn_export.graph_import import load_graph
from runtime.denoiser import Denoiser
from runtime.kernels import attention_path
from tests.kernel_env import ALL_ISAS, kernel_isa, kernel_session, supported_isas

FAMILY_PRESETS = ("tiny", "pixart-alpha-tiny", "dit-tiny", "sd3-tiny", "sd35-tiny", "flux-tiny", "sana-tiny",
                  "unet-tiny")
MODEL_TOL = 1e-5
PATH_TOL = {"float": 1e-5, "bf16": 1e-4, "int8": 1e-4}
BF16_VS_EXACT = 1e-2
INT8_VS_EXACT = 5e-2
VS_EXACT = {"float": MODEL_TOL, "bf16": BF16_VS_EXACT, "int8": INT8_VS_EXACT}
PRECISIONS = ("float", "bf16", "int8")
ROOT = Path(__file__).resolve().parents[1]


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


session = kernel_session  # (model, library or None for the function bodies, isa)

def feeds_for(model: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for an exported transformer: batch 2, caption length 7, timestep 500, mask with zeros."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.get_inputs():
        shape = [d if isinstance(d, int) else (2 if "batch" in str(d) else 7) for d in spec.shape]
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}[spec.type]
        if dtype == np.int64:
            feeds[spec.name] = rng.integers(0, 10, shape).astype(dtype)
        elif "mask" in spec.name:
            feeds[spec.name] = (rng.random(shape) > 0.3).astype(dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        if spec.name == "timestep":
            feeds[spec.name] = np.full(shape, 500, dtype)
    return feeds


def one_call_sqnr(reference: Path, graphs: dict[str, Path], library: Path, seeds: int = 8) -> dict[str, list[float]]:
    """One-call SQNR (dB) of each graph (on the kernel library) against `reference` (function bodies), per seed."""
    want_session = session(reference, None)
    runs = {name: session(path, library) for name, path in graphs.items()}
    sqnr = {name: [] for name in runs}
    for seed in range(seeds):
        feeds = feeds_for(want_session, seed)
        want = want_session.run(None, feeds)[0]
        for name, run in runs.items():
            sqnr[name].append(-20 * np.log10(rel_l2(run.run(None, feeds)[0], want)))
    return sqnr


def cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Whole models: every family, both exporters
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory, preset_onnx) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("attention-exports")
    paths = {preset: preset_onnx(preset) for preset in FAMILY_PRESETS}
    paths["tiny-mask"] = folder / "tiny-mask.onnx"
    assert cli("export", "--preset", "tiny", "--with-mask", "--seed", "0", "-o", paths["tiny-mask"]) == 0
    return paths


@pytest.mark.parametrize("preset", FAMILY_PRESETS + ("tiny-mask",))
def test_float_op_matches_the_original_subgraph(preset, exports, kernel_library, tmp_path, hn_cli):
    source = exports[preset]
    out = tmp_path / "attn.onnx"
    result = hn_cli("optimize", source, "--attention", "float", "-o", out)
    assert result.exit_code == 0, result.err
    original, fused = ir.load(source), ir.load(out)
    softmax = sum(n.op_type == "Softmax" for n in original.graph)
    ops = [n.op_type for n in fused.graph if n.domain == "hadanorm"]
    assert softmax > 0 and ops == ["Attention"] * softmax  # every softmax of these families is attention
    assert not any(n.op_type == "Softmax" for n in fused.graph)
    assert f"{softmax} softmax attentions fused (float)" in result.out
    if preset in ("tiny", "dit-tiny"):  # q, k, v head splits and the head merge absorbed: no Transpose left
        layouts = [n.attributes["layout"].value for n in fused.graph if n.op_type == "Attention"]
        transposes = [sum(n.op_type == "Transpose" for n in g.graph) for g in (original, fused)]
        assert layouts == ["bnhd"] * softmax and transposes[1] == transposes[0] - 5 * softmax  # q, k (two), v, y
    reference = session(source, None)
    feeds = feeds_for(reference)
    want = reference.run(None, feeds)[0]
    by_kernels = session(out, kernel_library).run(None, feeds)[0]
    by_bodies = session(out, None).run(None, feeds)[0]  # stock onnxruntime: the function bodies
    assert rel_l2(by_kernels, want) <= MODEL_TOL
    assert rel_l2(by_bodies, want) <= MODEL_TOL


@pytest.mark.parametrize("preset", ["tiny", "sd3-tiny", "unet-tiny"])
def test_torchscript_exports_are_recognised(preset, tmp_path, kernel_library, hn_cli):
    """torch's TorchScript exporter (what optimum uses): k^T as one Transpose, the scale a computed tensor."""
    torch = pytest.importorskip("torch")
    from tests.test_other_exporters import torchscript_export
    from models.build import ModelSource, build_transformer

    model = build_transformer(ModelSource(preset=preset, seed=0))
    source = torchscript_export(model, 17, tmp_path / "ts17.onnx")
    out = tmp_path / "attn.onnx"
    result = hn_cli("optimize", source, "--attention", "float", "-o", out)
    assert result.exit_code == 0, result.err
    assert not any(n.op_type == "Softmax" for n in ir.load(out).graph)
    imported = tmp_path / "imported.onnx"  # the raw export trips onnxruntime (a no-op Squeeze the import fixes)
    ir.save(load_graph(source), imported)
    reference = session(imported, None)
    feeds = feeds_for(reference)
    del torch
    assert rel_l2(session(out, kernel_library).run(None, feeds)[0], reference.run(None, feeds)[0]) <= MODEL_TOL


def test_sana_linear_attention_is_left_and_reported(exports, hn_cli):
    result = hn_cli("layers", exports["sana-tiny"])
    assert result.exit_code == 0
    assert "attention: 2 softmax attentions" in result.out  # the two cross-attentions
    assert "ReLU linear attention" in result.out


def test_unrecognised_softmax_stays(tmp_path):
    """A Softmax that is not attention (no MatMul after it) is listed and left as it is."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["s"]),
                               helper.make_node("Softmax", ["s"], ["y"], axis=-1)], "g", [x], [y])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    scan = find_attention(model.graph)
    assert scan.sites == [] and [n.op_type for n in scan.unrecognised] == ["Softmax"]


def test_mask_made_by_a_mul_is_the_mask(kernel_library):
    """Add(mask, scores) with the mask made by a Mul ((1 - m) * -10000) and on the Add's first input: the MatMul side
    is the scores; the fused graph equals the original (1e-5)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from graph_passes.fuse_attention import FuseAttentionPass

    f = TensorProto.FLOAT
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Mul", ["s", "c"], ["ss"]),
             helper.make_node("Sub", ["one", "m"], ["inv"]),
             helper.make_node("Mul", ["inv", "big"], ["bias"]),
             helper.make_node("Add", ["bias", "ss"], ["sm"]),
             helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    inits = [helper.make_tensor("c", f, [], [0.25]), helper.make_tensor("one", f, [], [1.0]),
             helper.make_tensor("big", f, [], [-10000.0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, f, s) for n, s in
                                           (("q", [2, 6, 8]), ("k", [2, 9, 8]), ("v", [2, 9, 5]), ("m", [2, 1, 9]))],
                              [helper.make_tensor_value_info("y", f, [2, 6, 5])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    proto = onnx.shape_inference.infer_shapes(proto)  # as hn-export's graph import does
    model = ir.from_proto(proto)
    ir.passes.PassManager([FuseAttentionPass(AttentionPrecision.FLOAT), RemoveUnusedNodesPass()])(model)
    assert [n.op_type for n in model.graph if n.op_type in ("Softmax", "Attention")] == ["Attention"]
    rng = np.random.default_rng(5)
    feeds = {"q": rng.standard_normal((2, 6, 8)).astype(np.float32), "k": rng.standard_normal((2, 9, 8)).astype(
        np.float32), "v": rng.standard_normal((2, 9, 5)).astype(np.float32),
             "m": (rng.random((2, 1, 9)) > 0.3).astype(np.float32)}
    want = session(proto.SerializeToString(), None).run(None, feeds)[0]
    got = session(ir.to_proto(model).SerializeToString(), kernel_library).run(None, feeds)[0]
    assert rel_l2(got, want) <= MODEL_TOL


def test_optimize_refuses_a_graph_without_attention(exports, tmp_path, hn_cli):
    fused = tmp_path / "once.onnx"
    assert hn_cli("optimize", exports["tiny"], "--attention", "fused", "-o", fused).exit_code == 0
    again = tmp_path / "twice.onnx"
    result = hn_cli("optimize", fused, "--attention", "fused", "-o", again)
    assert result.exit_code == 2
    assert "has no softmax attention (MatMul -> Softmax -> MatMul) to fuse" in result.err
    assert "Traceback" not in result.err and not again.exists()
    result = hn_cli("optimize", exports["tiny"], "--attention", "fused", "-o", exports["tiny"])
    assert result.exit_code == 2 and "is the input file" in result.err


def test_fused_format_gets_fast_attention_by_default(exports, tmp_path, hn_cli, kernel_library):
    """`--format fused`: hadanorm::Attention fast (the default: bf16 on AMX, int8 on AVX512-VNNI, float elsewhere);
    `--attention none` keeps the softmax; the report and the Denoiser say which attention runs."""
    common = ["--w4a4", "--format", "fused", "--calib-samples", "1", "--calib-steps", "2", "--no-progress"]
    fused, kept = tmp_path / "fused.onnx", tmp_path / "kept.onnx"
    result = hn_cli(exports["tiny"], *common, "-o", fused)
    assert result.exit_code == 0, result.err
    assert "attention: 4 softmax attentions fused (fast)" in result.out
    assert hn_cli(exports["tiny"], *common, "--attention", "none", "-o", kept).exit_code == 0
    assert [n.attributes["precision"].value for n in ir.load(fused).graph if n.op_type == "Attention"] == ["fast"] * 4
    assert sum(n.op_type == "Softmax" for n in ir.load(kept).graph) == 4
    with_kernels = Denoiser(fused, kernel_library=kernel_library)
    expected_path = attention_path(kernel_library, "fast")
    assert with_kernels.implementation.endswith(f"attention: hadanorm::Attention fast, kernels ({expected_path})")
    assert Denoiser(fused, kernel_library=False).implementation == (
        "fused: function bodies, attention: hadanorm::Attention fast, function bodies")
    # bf16 attention alone (FP graph): measured 58-67 dB one-call SQNR over 8 seeds. In the W4A4 graph that small
    # change flips a few 4-bit codes downstream: the SQNR against FP32 moves by -0.58..+0.12 dB per seed, mean -0.18 dB.
    bf16_fp = tmp_path / "fp.bf16.onnx"
    assert hn_cli("optimize", exports["tiny"], "--attention", "bf16", "-o", bf16_fp).exit_code == 0
    sqnr = one_call_sqnr(exports["tiny"], {"bf16_fp": bf16_fp, "fused": fused, "kept": kept}, kernel_library)
    assert min(sqnr["bf16_fp"]) >= 50.0
    assert abs(np.mean(sqnr["fused"]) - np.mean(sqnr["kept"])) <= 0.5


def test_int8_attention_in_a_w4a4_graph(exports, tmp_path, hn_cli, kernel_library):
    """`--attention int8`: the report, the graph and the Denoiser say int8; int8 attention alone (FP graph of tiny
    PixArt) measured 54.5-58.6 dB one-call SQNR over 8 seeds (bf16 58.3-66.8; bound 45); in the W4A4 graph its
    one-call SQNR against FP32 is that of the graph with the exported attention within 0.3 dB on the mean of 8 seeds
    (issue 18's bound; measured -0.15 dB, per seed -0.44..+0.17; bf16 -0.15)."""
    common = ["--w4a4", "--format", "fused", "--calib-samples", "1", "--calib-steps", "2", "--no-progress"]
    int8, kept = tmp_path / "int8.onnx", tmp_path / "kept.onnx"
    result = hn_cli(exports["tiny"], *common, "--attention", "int8", "-o", int8)
    assert result.exit_code == 0, result.err
    assert "attention: 4 softmax attentions fused (int8)" in result.out
    assert hn_cli(exports["tiny"], *common, "--attention", "none", "-o", kept).exit_code == 0
    assert ir.load(int8).metadata_props["hn_export.attention"] == "int8"
    expected_path = attention_path(kernel_library, "int8")
    assert Denoiser(int8, kernel_library=kernel_library).implementation.endswith(
        f"attention: hadanorm::Attention int8, kernels ({expected_path})")
    int8_fp = tmp_path / "fp.int8.onnx"
    result = hn_cli("optimize", exports["tiny"], "--attention", "int8", "-o", int8_fp)
    assert result.exit_code == 0 and "4 softmax attentions fused (int8)" in result.out
    sqnr = one_call_sqnr(exports["tiny"], {"int8_fp": int8_fp, "int8": int8, "kept": kept}, kernel_library)
    assert min(sqnr["int8_fp"]) >= 45.0, sqnr["int8_fp"]
    assert abs(np.mean(sqnr["int8"]) - np.mean(sqnr["kept"])) <= 0.3, (sqnr["int8"], sqnr["kept"])


# ---------------------------------------------------------------------------------------------------------------
# One op: every path against the scalar reference
# ---------------------------------------------------------------------------------------------------------------


def attention_model(masked: bool, scale: float, precision: str, dtype=np.float32, layout: str = "bhnd") -> bytes:
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    names = ["q", "k", "v"] + (["mask"] if masked else [])
    node = helper.make_node("Attention", names, ["y"], domain="hadanorm", scale=scale, precision=precision,
                            layout=layout)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n in names],
                              [helper.make_tensor_value_info("y", t, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("hadanorm", 1)],
                              ir_version=10)
    return model.SerializeToString()


def exact_attention(q, k, v, mask, scale, dtype=np.float64) -> np.ndarray:
    """softmax(scale q k^T + mask) v in `dtype` (float32: the original subgraph's maths, whose scores lose bits when
    a mask of -10000 is added: the kernels' float path adds it in float32 too)."""
    s = dtype(scale) * np.einsum("...qd,...kd->...qk", q.astype(dtype), k.astype(dtype))
    if mask is not None:
        s = s + mask.astype(dtype)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True)) @ v.astype(dtype)


def supported_paths(library: Path, precision: str) -> list[str]:
    """The attention paths the ISA override reaches on this CPU, e.g. scalar, avx512, amx."""
    found = []
    for isa in ALL_ISAS:
        with kernel_isa(isa):
            path = attention_path(library, precision)
        if path and not path.startswith("error") and path not in [p for _, p in found]:
            found.append((isa, path))
    assert found[0][1] == "scalar"
    return found


SHAPES = [  # lead, nq, nk, d, dv, mask shape (None: no mask)
    ((2, 3), 37, 29, 36, 36, None),
    ((1, 2), 130, 300, 72, 72, (1, 1, 1, 300)),  # PixArt cross attention: key mask per caption token
    ((2,), 64, 129, 64, 80, (2, 64, 129)),  # full mask; a partial last key block
    ((1, 1), 5, 1000, 128, 128, None),
    ((3,), 1, 1, 16, 8, None),
    ((2, 2), 33, 257, 8, 160, (2, 1, 33, 1)),  # a per-query mask column, broadcast over the keys
    ((1, 2), 84, 70, 72, 72, None),  # AMX query groups of 64 rows + 20 (4 and 2 row tiles)
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}-d{s[3]}-dv{s[4]}-m{s[5]}")
def test_every_path_matches_the_scalar_reference(precision, shape, kernel_library):
    lead, nq, nk, d, dv, mask_shape = shape
    rng = np.random.default_rng(nq * 7 + nk)
    q = rng.standard_normal((*lead, nq, d)).astype(np.float32)
    q[..., ::5, :] *= 8.0  # peaky rows
    k = rng.standard_normal((*lead, nk, d)).astype(np.float32)
    v = rng.standard_normal((*lead, nk, dv)).astype(np.float32)
    feeds = {"q": q, "k": k, "v": v}
    mask = None
    if mask_shape is not None:
        mask = np.where(rng.random(mask_shape) > 0.25, 0.0, -10000.0).astype(np.float32)
        feeds["mask"] = mask
    scale = float(d) ** -0.5
    model = attention_model(mask is not None, scale, precision)
    paths = supported_paths(kernel_library, precision)
    reference = session(model, kernel_library, "scalar").run(None, feeds)[0]
    float_model = attention_model(mask is not None, scale, "float")
    float_reference = session(float_model, kernel_library, "scalar").run(None, feeds)[0]
    exact = exact_attention(q, k, v, mask, scale, np.float32 if precision == "float" else np.float64)
    assert rel_l2(reference, exact) <= VS_EXACT[precision]
    for isa, path in paths[1:]:
        got = session(model, kernel_library, isa).run(None, feeds)[0]
        assert got.shape == reference.shape
        computes_float = path.endswith("(computes float)")
        want, tol = (float_reference, PATH_TOL["float"]) if computes_float else (reference, PATH_TOL[precision])
        for index in np.ndindex(*lead):
            assert rel_l2(got[index], want[index]) <= tol, (isa, path, index)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_bnhd_layout_is_the_same_maths(precision, kernel_library):
    """layout=bnhd ([B, N, H, D] in and out, heads interleaved in each row) gives bhnd's numbers, transposed, on every
    path (the same sums: equal within float rounding of the order, 1e-6), and the function body agrees."""
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 70, 3, 40)).astype(np.float32)
    k = rng.standard_normal((2, 150, 3, 40)).astype(np.float32)
    v = rng.standard_normal((2, 150, 3, 24)).astype(np.float32)
    mask = np.where(rng.random((2, 1, 1, 150)) > 0.2, 0.0, -10000.0).astype(np.float32)
    heads = (0, 2, 1, 3)
    bhnd = {"q": q.transpose(heads).copy(), "k": k.transpose(heads).copy(), "v": v.transpose(heads).copy(),
            "mask": mask}
    plain, bnhd = attention_model(True, 0.2, precision), attention_model(True, 0.2, precision, layout="bnhd")
    feeds = {"q": q, "k": k, "v": v, "mask": mask}
    for isa, _ in supported_paths(kernel_library, precision):
        want = session(plain, kernel_library, isa).run(None, bhnd)[0].transpose(heads)
        got = session(bnhd, kernel_library, isa).run(None, feeds)[0]
        assert got.shape == (2, 70, 3, 24) and rel_l2(got, want) <= 1e-6, isa
    body = ir.from_proto(onnx.load_from_string(bnhd))
    from graph_passes.attention_op import build_function
    function = build_function(True, "bnhd")
    body.functions[function.identifier()] = function
    body.graph.node(0).overload = function.overload
    fn_model = ir.to_proto(body).SerializeToString()
    assert rel_l2(session(fn_model, None).run(None, feeds)[0], exact_attention(q.transpose(heads), k.transpose(heads),
                  v.transpose(heads), mask, 0.2).transpose(heads)) <= MODEL_TOL


def test_int8_centers_keys_and_values(kernel_library):
    """int8 quantizes the keys and values less their means over the tokens (exact in the float maths: a key offset
    moves a query's scores by one constant, softmax ignores it; the rows of softmax sum to 1). A large common offset
    (20 in every channel of k and v, 20x their spread) costs nothing: the output less the offset is the output
    without it within 5e-3 relative L2 (measured 4.4e-4: the float rounding of k + 20 moves a few codes) and exact
    attention (less the offset) within the int8 bound (measured 1.3e-2, as without the offset), on every path.
    Without the centering one int8 step of a key row would be about 20/127 wide, the keys' spread."""
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((1, 2, 150, 72)).astype(np.float32) for _ in range(3))
    offset = np.float32(20.0)
    model = attention_model(False, 72 ** -0.5, "int8")
    exact = exact_attention(q, k + offset, v + offset, None, 72 ** -0.5)
    for isa, path in supported_paths(kernel_library, "int8"):
        run = session(model, kernel_library, isa)
        plain = run.run(None, {"q": q, "k": k, "v": v})[0]
        shifted = run.run(None, {"q": q, "k": k + offset, "v": v + offset})[0]
        assert rel_l2(shifted - offset, plain) <= 5e-3, (isa, path)
        assert rel_l2(shifted - offset, exact - offset) <= INT8_VS_EXACT, (isa, path)


def test_int8_edge_inputs_match_float(kernel_library):
    """The int8 edges, every path: (1) a row whose every key is masked by -FLT_MAX (torch's finfo.min padding) is the
    mean of v, as the float op and the function body give (the mask in log2 units stays finite: times log2 e it would
    overflow to -inf and the row would be NaN); (2) a query row and a key row of 1e-38 (127 / max would be +inf) are
    zero rows to int8, not codes of -127; the outputs finite and within the int8 bound of the float op (measured
    5.8e-3 relative L2; before these were handled: NaN in row 3 and 0.29 elsewhere)."""
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((1, 2, 6, 32)).astype(np.float32) for _ in range(3))
    q[0, 0, 1] = 1e-38
    k[0, 1, 2] = 1e-38
    mask = np.zeros((1, 1, 6, 6), np.float32)
    mask[..., 3, :] = np.finfo(np.float32).min
    feeds = {"q": q, "k": k, "v": v, "mask": mask}
    want = session(attention_model(True, 0.2, "float"), kernel_library, "scalar").run(None, feeds)[0]
    assert np.allclose(want[:, :, 3], v.mean(axis=2), atol=1e-6)
    for isa, path in supported_paths(kernel_library, "int8"):
        got = session(attention_model(True, 0.2, "int8"), kernel_library, isa).run(None, feeds)[0]
        assert np.isfinite(got).all(), (isa, path)
        assert rel_l2(got[:, :, 3], want[:, :, 3]) <= 1e-2, (isa, path)  # the mean of v through int8 codes
        assert rel_l2(got, want) <= INT8_VS_EXACT, (isa, path)


def test_fast_is_the_fastest_precision_of_each_path(kernel_library):
    """precision=fast is chosen where the graph runs: bf16 on the AMX tiles, int8 on AVX512-VNNI without them, float
    elsewhere (benchmarks/attention.md: the fastest of each); its output is, bit for bit, that of the op at the
    precision it chose, on that path."""
    expected = {"amx": ("amx", "bf16"), "avx512vnni": ("avx512", "int8"), "avx2": ("avx2", "float"),
                "avxvnni": ("avx2", "float"), "scalar": ("scalar", "float"), "neondot": ("scalar", "float")}
    rng = np.random.default_rng(9)
    feeds = {n: rng.standard_normal((2, 3, 70, 72)).astype(np.float32) for n in "qkv"}
    fast = attention_model(False, 72 ** -0.5, "fast")
    isas = supported_isas(kernel_library)
    assert "scalar" in isas
    for isa in isas:
        path, precision = expected[isa]
        with kernel_isa(isa):
            assert attention_path(kernel_library, "fast") == f"{path} ({precision})", isa
        want = session(attention_model(False, 72 ** -0.5, precision), kernel_library, isa).run(None, feeds)[0]
        assert np.array_equal(session(fast, kernel_library, isa).run(None, feeds)[0], want), isa


def test_fully_masked_rows_are_nan_like_softmax(kernel_library):
    """A query row whose every score is -inf: softmax gives NaN (0/0); every path too. Other rows are finite."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 4, 200, 32)).astype(np.float32) for _ in range(3))
    mask = np.zeros((1, 1, 200, 200), np.float32)
    mask[..., 2, :] = -np.inf
    mask[..., 1, 150:] = -np.inf
    for precision in PRECISIONS:
        model = attention_model(True, 0.2, precision)
        for isa, _ in supported_paths(kernel_library, precision):
            y = session(model, kernel_library, isa).run(None, {"q": q, "k": k, "v": v, "mask": mask})[0]
            assert np.isnan(y[:, :, 2]).all() and np.isfinite(np.delete(y, 2, axis=2)).all(), (precision, isa)
            bound = max(VS_EXACT[precision], BF16_VS_EXACT)
            assert rel_l2(y[:, :, 1], exact_attention(q, k, v, mask, 0.2)[:, :, 1]) <= bound


def test_float16_tensors(kernel_library):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 2, 50, 40)).astype(np.float16) for _ in range(3))
    y = session(attention_model(False, 0.15, "float", np.float16), kernel_library).run(None, {"q": q, "k": k, "v": v})[0]
    assert y.dtype == np.float16
    assert rel_l2(y, exact_attention(q, k, v, None, 0.15)) <= 2e-3  # float16 output rounding


def test_bad_shapes_are_named(kernel_library):
    model = attention_model(True, 1.0, "float")
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 8, 16)).astype(np.float32) for _ in range(3))
    with pytest.raises(Exception, match=r"hadanorm::Attention: mask \[3, 8, 8\] does not broadcast to \[2, 8, 8\]"):
        session(model, kernel_library).run(None, {"q": q, "k": k, "v": v, "mask": np.zeros((3, 8, 8), np.float32)})
    with pytest.raises(Exception, match="q, k and v must share their batch and head dimensions"):
        session(attention_model(False, 1.0, "float"), kernel_library).run(None, {"q": q, "k": k[:1], "v": v[:1]})


def test_memory_is_linear_in_the_tokens(kernel_library):
    """One head, 8192 queries x 8192 keys: the scores would be 256 MB (fp32); the call adds far less to peak RSS."""
    code = f"""
import resource, numpy as np, onnxruntime as ort, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.test_attention import attention_model
from runtime.kernels import register_kernels
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 1, 8192, 64)).astype(np.float32) for _ in range(3))
options = ort.SessionOptions(); options.intra_op_num_threads = 2
register_kernels(options, {str(kernel_library)!r})
s = ort.InferenceSession(attention_model(False, 0.125, "float"), options, providers=["CPUExecutionProvider"])
small = {{"q": q[..., :64, :], "k": k[..., :64, :], "v": v[..., :64, :]}}
s.run(None, small)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
y = s.run(None, {{"q": q, "k": k, "v": v}})[0]
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, np.isfinite(y).all())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mb, finite = proc.stdout.split()
    assert finite == "True"
    assert float(grown_mb) < 64, f"peak RSS grew {grown_mb} MB"


def test_packed_keys_come_from_the_session_arena(kernel_library):
    """The packed K/V of a call (here 2 x 16 heads x 4096 keys: 46 MB on the AMX path, 75 MB on the scalar one) come
    from the session's arena, which keeps them for the next call: a repeated call maps no new pages. From new[] they
    were mapped and faulted in again every call (at least one minor fault per 4 KiB page: over 11 000; the 1024 px
    attention paid 22 500 a call, 3-4% of the 2-block call: benchmarks/peers/README.md)."""
    code = f"""
import resource, numpy as np, onnxruntime as ort, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.test_attention import attention_model
from runtime.kernels import register_kernels
rng = np.random.default_rng(0)
feeds = {{"q": rng.standard_normal((2, 16, 16, 72)).astype(np.float32),
          "k": rng.standard_normal((2, 4096, 16, 72)).astype(np.float32),
          "v": rng.standard_normal((2, 4096, 16, 72)).astype(np.float32)}}
options = ort.SessionOptions(); options.intra_op_num_threads = 2
register_kernels(options, {str(kernel_library)!r})
s = ort.InferenceSession(attention_model(False, 72 ** -0.5, "bf16", layout="bnhd"), options,
                         providers=["CPUExecutionProvider"])
for _ in range(2):
    y = s.run(None, feeds)[0]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = s.run(None, feeds)[0]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, np.isfinite(y).all())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    faults, finite = proc.stdout.split()
    assert finite == "True"
    assert int(faults) < 2000, f"{faults} minor page faults in a repeated call"


def test_calibrating_an_attention_fused_graph(exports, tmp_path, hn_cli, kernel_library, monkeypatch):
    """Calibration runs the softmax attention fused in float on the kernels, whether the graph came with it
    (`hn-export optimize`, then quantize) or not (fused in the session's copy of the graph: O(N) memory at 1024 px),
    and its statistics are those of the exported attention (calibrated without the library): float attention differs
    by summation order (1e-7), which the trajectory's second step carries into its inputs (measured 1.0e-5 at most;
    bound 1e-4)."""
    import hn_export.ort_models
    from hn_export.calibration import calibrate
    from hn_export.denoise import DenoiseConfig

    calls = tmp_path / "calls.log"
    monkeypatch.setenv("HADANORM_KERNELS_CALL_LOG", str(calls))
    fused = tmp_path / "attn.onnx"
    assert hn_cli("optimize", exports["tiny"], "--attention", "float", "-o", fused).exit_code == 0
    config = DenoiseConfig(samples=1, steps=2)
    with monkeypatch.context() as m:
        m.setattr(hn_export.ort_models, "library_path", lambda: None)
        original = calibrate(exports["tiny"], config, progress=False)
    assert not calls.exists()  # the exported attention, no kernel
    calibrate(exports["tiny"], config, progress=False)
    assert "Attention" in calls.read_text().split()  # the same FP graph, its attention fused for the session
    calls.unlink()
    with_attention = calibrate(fused, config, progress=False)
    assert "Attention" in calls.read_text().split()
    assert set(with_attention.sites) == set(original.sites)
    for name, stats in original.sites.items():
        for field in ("absmax", "centered_absmax"):
            want, got = getattr(stats, field), getattr(with_attention.sites[name], field)
            assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-6)) <= 1e-4, (name, field)
    result = hn_cli(fused, "--w4a4", "--format", "fused", "--calib-samples", "1", "--calib-steps", "2",
                    "--no-progress", "-o", tmp_path / "q.onnx")
    assert result.exit_code == 0, result.err
    written = ir.load(tmp_path / "q.onnx")
    assert [n.attributes["precision"].value for n in written.graph
            if n.op_type == "Attention"] == ["float"] * 4  # the optimized graph's attention is kept as it is
    # and reported as it is (not as --format fused's bf16 default)
    assert "attention: 4 softmax attentions fused (float)" in result.out
    assert written.metadata_props["hn_export.attention"] == "float"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_packed_buffer_reuse_leaves_no_trace(precision, kernel_library):
    """Each path's pack writes every byte its rows read: a call after a larger one (whose freed packed buffer the
    allocator may hand out again), in another session on the same thread, gives the bits of the same call before it,
    on every path."""
    rng = np.random.default_rng(11)
    small = {n: rng.standard_normal((1, 37, 3, 40)).astype(np.float32) for n in "qkv"}
    large = {n: rng.standard_normal((2, 300, 4, 72)).astype(np.float32) * 5 for n in "qkv"}
    model_small = attention_model(False, 40 ** -0.5, precision, layout="bnhd")
    model_large = attention_model(False, 72 ** -0.5, precision, layout="bnhd")
    for isa, path in supported_paths(kernel_library, precision):
        before = session(model_small, kernel_library, isa).run(None, small)[0]
        session(model_large, kernel_library, isa).run(None, large)
        after = session(model_small, kernel_library, isa).run(None, small)[0]
        assert np.array_equal(before, after), (isa, path)

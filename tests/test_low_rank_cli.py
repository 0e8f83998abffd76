"""``hn-export MODEL --w4a4 --low-rank R``: the float branch beside each quantized MatMul weight
(`graph_passes.low_rank`), end to end on the tiny PixArt (FAST_CALIB / EVAL of tests/test_cli_quantize.py).

Checked: one branch per quantized MatMul linear (the k x k patch conv has none; in the fused graph each inside its
integer matmul's epilogue, ``IntMatMul4LowRank[Gelu]``), the rank and the weight range in
the model's metadata, the fused and qdq graphs of one plan agree (SQNR >= 40 dB between them: measured 48 dB, the
max difference 0.025: a few activation codes flipped at rounding boundaries, the branch's sums being in another
order in the kernel's epilogue than in onnxruntime's MatMul; one flipped 4-bit code moves the output by about 1e-3,
60 dB; without branches 132 dB), and the branch raises the single-call SQNR against FP32 by at least 3 dB
(measured on this model: rank 0 20.7 dB, rank 4 21.2 dB, rank 16 27.1 dB, fused).
"""

from __future__ import annotations

import onnx
import pytest

from hn_export.evaluate import GraphRunner, evaluate, reference_outputs
from tests.cli_runner import run_cli
from tests.test_cli_quantize import EVAL, FAST_CALIB, reference, single_call_sqnr  # noqa: F401 (fixture)


def branches(path) -> int:
    """Low-rank branches: their Adds (qdq), or integer matmuls with the branch in their epilogue (fused)."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in model.graph.node if n.name.endswith(".low_rank.add") or "LowRank" in n.op_type)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_onnx):
    out = tmp_path_factory.mktemp("low_rank")
    made = {}
    for name, args in {"r0": ("--format", "fused"), "r16": ("--format", "fused", "--low-rank", "16"),
                       "r16-qdq": ("--format", "qdq", "--low-rank", "16")}.items():
        path = out / f"{name}.onnx"
        assert run_cli([str(tiny_onnx), "--w4a4", *args, "--attention", "none", "-o", str(path), *FAST_CALIB]) == 0
        made[name] = path
    return made


def test_one_branch_per_linear_and_metadata(graphs):
    assert branches(graphs["r0"]) == 0
    assert branches(graphs["r16"]) == branches(graphs["r16-qdq"]) == 20  # 2 blocks x 10 in-block linears
    fused_ops = {n.op_type for n in onnx.load(str(graphs["r16"]), load_external_data=False).graph.node}
    assert {"IntMatMul4LowRank", "IntMatMul4LowRankGelu"} <= fused_ops and "IntMatMul4" not in fused_ops
    meta = {p.key: p.value for p in onnx.load(str(graphs["r16"]), load_external_data=False).metadata_props}
    assert meta["hn_export.low_rank"] == "16" and meta["hn_export.weight_range"] == "minmax"


def test_formats_agree_and_branch_helps(graphs, reference):  # noqa: F811
    with GraphRunner(graphs["r16-qdq"]) as runner:
        qdq = reference_outputs(runner, EVAL, with_denoising=False)
    with GraphRunner(graphs["r16"]) as runner:
        assert evaluate(runner, qdq, EVAL).single_call.sqnr_db >= 40.0
    assert single_call_sqnr(graphs["r16"], reference) >= single_call_sqnr(graphs["r0"], reference) + 3.0


@pytest.mark.parametrize("args,message", [
    (("--low-rank", "8", "--transform-only"), "--low-rank 8 splits the weight that is quantized, --transform-only "
                                              "quantizes nothing; drop one of them"),
    (("--low-rank", "8", "--method", "hqdm"), "--method hqdm quantizes it unrotated in integer parts; use another "
                                              "--method, or drop --low-rank"),
])
def test_refused_before_any_work(hn_cli, tiny_onnx, tmp_path, args, message):
    out = tmp_path / "m.onnx"
    result = hn_cli(tiny_onnx, "--w4a4", *args, "-o", out, *FAST_CALIB)
    assert result.exit_code == 2 and message in result.err and "Traceback" not in result.err
    assert not out.exists()


def test_compare_refuses_hqdm_with_low_ranks(hn_cli, tiny_onnx, tmp_path):
    result = hn_cli("compare", tiny_onnx, "--methods", "hadanorm,hqdm", "--low-ranks", "0,8", "--out",
                    tmp_path / "cmp", "--no-progress")
    assert result.exit_code == 2 and "run hqdm in a grid with --low-ranks 0" in result.err
    assert not (tmp_path / "cmp").exists()

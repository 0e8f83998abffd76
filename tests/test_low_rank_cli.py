"""``hn-export MODEL --w4a4 --low-rank R``: the float branch beside each quantized MatMul weight
(`graph_passes.low_rank`), end to end on the tiny PixArt (FAST_CALIB / EVAL of tests/test_cli_quantize.py).

Checked: one branch per quantized MatMul linear (the k x k patch conv has none; in the fused graph each inside its
integer matmul's epilogue, ``IntMatMul4LowRank[Gelu]``), the rank and the weight range in
the model's metadata, the fused and qdq graphs of one plan agree (SQNR >= 50 dB between them: measured 57 dB, the
max difference 0.011 at one place, an activation code flipped at a rounding boundary by another float summation
order; without branches 132 dB), and the branch raises the single-call SQNR against FP32 by at least 3 dB
(measured on this model: rank 0 20.7 dB, rank 4 21.7 dB, rank 16 26.1 dB, fused).
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
        assert evaluate(runner, qdq, EVAL).single_call.sqnr_db >= 50.0
    assert single_call_sqnr(graphs["r16"], reference) >= single_call_sqnr(graphs["r0"], reference) + 3.0

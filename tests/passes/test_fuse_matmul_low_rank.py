"""`graph_passes.fuse_matmul_low_rank.FuseMatMulLowRankPass`: a low-rank branch's ``Add(IntMatMul, MatMul(t, right))``
becomes one ``IntMatMul{4,8}LowRank(..., t, right)`` in the ``fused`` format; then the Gelu pass makes
``IntMatMul4LowRankGelu`` of a feed-forward's first linear.

Numbers, on stock onnxruntime (the function bodies): the new op's body is the matmul's body plus the same
``MatMul(t, right)`` and ``Add``, so the outputs before and after agree within relative L2 1e-6 (measured 0).
The kernels are tested against numpy in tests/test_matmul_activation.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graph_passes.emit_fused import FusedEmitter
from graph_passes.fuse_matmul_activation import FuseMatMulActivationPass
from graph_passes.fuse_matmul_low_rank import FuseMatMulLowRankPass
from graph_passes.quantization import QuantConfig
from tests.passes._helpers import check, op_counts, plans, rel_l2, run, tokens
from tests.passes.test_fuse_matmul_activation import mlp

HN = "hadanorm"
W4A4_R8 = QuantConfig(4, 4, weight_block=16, low_rank=8)


def test_branches_fused_then_gelu():
    model = mlp()
    feeds = {"x": tokens(72)}
    FusedEmitter(plans(model, feeds, W4A4_R8))(model)
    before = run(model, feeds)[0]
    assert op_counts(model.graph)["", "MatMul"] == 4  # two branches: x A and t Q each
    matmul = next(n for n in model.graph if n.name == "ff.in.IntMatMul4")
    t = next(n for n in model.graph if n.name == "ff.in.low_rank.down").outputs[0]
    inputs = [*matmul.inputs, t]
    assert FuseMatMulLowRankPass()(model).modified
    check(model)
    counts = op_counts(model.graph)
    assert counts[HN, "IntMatMul4LowRank"] == 2 and counts[HN, "IntMatMul4"] == 0
    assert counts["", "MatMul"] == 2 and not [n for n in model.graph if n.name.endswith("low_rank.add")]
    fused = next(n for n in model.graph if n.name == "ff.in.IntMatMul4LowRank")
    assert list(fused.inputs[:8]) == inputs and fused.inputs[8].name.endswith("low_rank_right")
    assert fused.outputs[0].name == "ff.in.low_rank.add_out"  # the branch Add's output, which the Gelu reads
    assert rel_l2(run(model, feeds)[0], before) <= 1e-6
    assert FuseMatMulActivationPass()(model).modified
    check(model)
    assert op_counts(model.graph)[HN, "IntMatMul4LowRankGelu"] == 1
    assert rel_l2(run(model, feeds)[0], before) <= 1e-6


def test_rank_zero_nothing_to_fuse():
    model = mlp()
    FusedEmitter(plans(model, {"x": tokens(72)}, dataclasses.replace(W4A4_R8, low_rank=0)))(model)
    assert not FuseMatMulLowRankPass()(model).modified


def test_other_products_left_alone():
    """An Add of the matmul's output and a product that is not a low-rank branch (here ``c @ wc`` of two constants,
    broadcast over the batch) is not fused: the kernel's epilogue takes exactly [..., M, r] x [r, N]."""
    from graph_passes.graph_utils import add_initializer, make_node, redirect_uses

    model = mlp()
    feeds = {"x": tokens(72)}
    FusedEmitter(plans(model, feeds, dataclasses.replace(W4A4_R8, low_rank=0)))(model)
    graph = model.graph
    matmul = next(n for n in graph if n.name == "ff.in.IntMatMul4")
    rng = np.random.default_rng(1)
    c = add_initializer(graph, "c", rng.standard_normal((32, 8)).astype(np.float32))
    wc = add_initializer(graph, "wc", rng.standard_normal((8, 96)).astype(np.float32))
    product = make_node("MatMul", [c, wc], "foreign")
    add = make_node("Add", [matmul.outputs[0], product.outputs[0]], "foreign_add")
    redirect_uses(matmul.outputs[0], add.outputs[0], keep=[add])
    graph.insert_after(matmul, [product, add])
    before = run(model, feeds)[0]
    assert not FuseMatMulLowRankPass()(model).modified
    assert rel_l2(run(model, feeds)[0], before) == 0.0

"""``--low-rank R`` (`graph_passes.low_rank`, written by every emitter through `graph_passes.emit.SiteEmitter`):
``W~^T = P Q + R``, ``R`` quantized, the branch ``(x A) Q`` on the site's raw activation, ``A = S^-1 H^T P``.

Numbers: (a) the split is exact in float64: ``R + H S A Q`` equals ``W~^T`` and ``x A`` equals ``x S^-1 H^T P``
(relative 1e-12); (b) the ``qdq`` graph equals a numpy float32 evaluation of the documented formula with the plan's
own integers and branch within relative L2 1e-6 (as tests/passes/test_emit_qdq.py: one flipped code moves it by
about 1e-3); (c) ``fused`` and ``nbits`` agree with ``qdq`` within their README bounds (1e-5; a quarter of the qdq
error); (d) on a weight with a few dominant directions (a rank-4 part 10x the rest) the branch of rank 8 improves
the W4A4 output SQNR by more than 20 dB over rank 0 (measured 26.2 -> 54.8 dB: the dominant part no longer sees the
4-bit grids, and the branch reads the float activation).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.emit_fused import FusedEmitter
from graph_passes.emit_nbits import NBitsEmitter
from graph_passes.emit_qdq import QdqEmitter
from graph_passes.errors import GraphInputError
from graph_passes.methods import Method
from graph_passes.quantization import QuantConfig
from tests.passes._helpers import (copy_model, linear_text, ops, parse_model, per_token_qdq, plans, quantizer_input,
                                   rel_l2, run, sqnr_db, tokens)

W4A4_R8 = QuantConfig(4, 4, weight_block=16, low_rank=8)


def dominant_linear(width: int = 72, out: int = 64, seed: int = 0) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """``y = x @ wt + b`` with ``wt`` = a rank-4 part 10x a random rest (weights with a few large directions)."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((width, 4)) @ rng.standard_normal((4, out)) / np.sqrt(width)
    wt = (low + 0.1 * rng.standard_normal((width, out)) / np.sqrt(width)).astype(np.float32)
    b = (rng.standard_normal(out) * 0.1).astype(np.float32)
    return parse_model(linear_text(width, out), {"wt": wt, "b": b}), wt, b


def test_split_is_exact():
    model, wt, _ = dominant_linear()
    x = tokens(72)
    (plan,) = plans(model, {"x": x}, W4A4_R8)
    weight = plan.linears[0].weight
    branch, t = weight.low_rank, plan.transform
    assert branch.rank == 8 and branch.left.dtype == np.float32 and branch.right.shape == (8, 64)
    fused = t.fuse_weight(wt)
    stored_p = t.hadamard.rotate_weight_rows(branch.left.astype(np.float64) / t.inv_scale[:, None])
    residual = fused - stored_p @ branch.right.astype(np.float64)
    np.testing.assert_allclose(weight.quantized.dequantize(), residual, atol=np.abs(residual).max() / 7 * 0.51)
    # the branch on the raw activation is the rank-8 part on the transformed one: x A = (x S^-1) H^T P
    _, m = quantizer_input(x, plan)  # x~ + mu~ = x S^-1 H^T
    lhs = x.astype(np.float64) @ branch.left.astype(np.float64)
    assert rel_l2(lhs, m @ stored_p) <= 1e-12
    assert np.linalg.norm(residual) < 0.2 * np.linalg.norm(fused)  # the dominant part went to the branch


def qdq_reference(x: np.ndarray, plan, b: np.ndarray) -> np.ndarray:
    a, m = quantizer_input(x, plan)
    weight = plan.linears[0].weight
    r = weight.quantized.dequantize().astype(np.float32)
    branch = weight.low_rank
    y = per_token_qdq(a, plan.act.bits) @ r + (m - a).astype(np.float32) @ r
    return y + (x @ branch.left) @ branch.right + b


def test_qdq_equals_numpy_and_formats_agree():
    model, wt, b = dominant_linear()
    x = tokens(72)
    feeds = {"x": x}
    site_plans = plans(model, feeds, W4A4_R8)
    graphs = {}
    for emitter in (QdqEmitter, NBitsEmitter, FusedEmitter):
        m = copy_model(model)
        emitter(plans(m, feeds, W4A4_R8))(m)
        assert [n.name for n in m.graph if "low_rank" in n.name] == [
            "lin.low_rank.down", "lin.low_rank.up", "lin.low_rank.add"] or emitter is not QdqEmitter
        assert len([n for n in m.graph if n.name.endswith(".low_rank.add")]) == 1
        assert m.graph.outputs[0].name == "y"
        graphs[emitter] = run(m, feeds)[0]
    assert rel_l2(graphs[QdqEmitter], qdq_reference(x, site_plans[0], b)) <= 1e-6
    assert rel_l2(graphs[FusedEmitter], graphs[QdqEmitter]) <= 1e-5
    reference = x.astype(np.float64) @ wt + b
    qdq_error = np.linalg.norm(graphs[QdqEmitter] - reference)
    assert np.linalg.norm(graphs[NBitsEmitter] - graphs[QdqEmitter]) <= 0.25 * qdq_error


def test_branch_improves_a_dominant_weight():
    model, wt, b = dominant_linear()
    x = tokens(72)
    reference = x.astype(np.float64) @ wt + b
    sqnr = {}
    for rank in (0, 8):
        m = copy_model(model)
        QdqEmitter(plans(m, {"x": x}, dataclasses.replace(W4A4_R8, low_rank=rank)))(m)
        sqnr[rank] = sqnr_db(run(m, {"x": x})[0], reference)
    assert sqnr[8] > sqnr[0] + 20.0, sqnr


def test_gelu_follows_the_branch():
    """A fused feed-forward with a branch: Gelu reads the branch's Add, so it is not fused into the IntMatMul."""
    from graph_passes.fuse_matmul_activation import FuseMatMulActivationPass
    from tests.passes.test_fuse_matmul_activation import mlp

    model = mlp()
    feeds = {"x": tokens(72)}
    FusedEmitter(plans(model, feeds, W4A4_R8))(model)
    before = run(model, feeds)[0]
    assert not FuseMatMulActivationPass()(model).modified
    assert ops(model.graph, "Gelu")[0].inputs[0].producer().name == "ff.in.low_rank.add"
    assert rel_l2(run(model, feeds)[0], before) == 0.0


def test_refused_with_a_single_hadamard():
    model, _, _ = dominant_linear(64, 48)
    with pytest.raises(GraphInputError, match=r"--low-rank needs .* use another --method, or drop --low-rank"):
        plans(model, {"x": tokens(64)}, dataclasses.replace(W4A4_R8, weight_block=32), method=Method.HQDM,
              hadamard_block=32)


@pytest.mark.parametrize("emitter", [QdqEmitter, NBitsEmitter, FusedEmitter])
def test_no_branch_at_rank_zero(emitter):
    """Rank 0 (the default): no branch planned, and each format writes the very graph it writes without the option."""
    model, _, _ = dominant_linear()
    x = tokens(72)
    site_plans = plans(model, {"x": x}, dataclasses.replace(W4A4_R8, low_rank=0))
    assert site_plans[0].linears[0].weight.low_rank is None
    emitter(site_plans)(model)
    plain, _, _ = dominant_linear()
    emitter(plans(plain, {"x": x}, QuantConfig(4, 4, weight_block=16)))(plain)
    assert [(n.op_type, n.name) for n in model.graph] == [(n.op_type, n.name) for n in plain.graph]
    assert not [n for n in model.graph if "low_rank" in (n.name or "")]
    assert rel_l2(run(model, {"x": x})[0], run(plain, {"x": x})[0]) == 0.0

def test_branch_kept_only_where_it_lowers_the_weight_error():
    """A wide weight with no low-rank part and flat entries (uniform, 1152 x 1152: torch's default Linear init, so
    the synthetic presets' weights): the rank-16 SVD removes little and widens the residual's block ranges (measured
    weight error 1.38 -> 1.57), so it keeps no branch and quantizes the weight itself; the dominant weight keeps one.
    The refinement (refit to W - Q(R)) never raises the weight error (`split_low_rank`)."""
    from graph_passes.low_rank import split_low_rank
    from graph_passes.quantization import quantize_weight
    from graph_passes.site_transforms import SiteTransform

    def dequantized(m):
        return quantize_weight(m, dataclasses.replace(W4A4_R8, weight_block=128), np.dtype(np.float32)).dequantize()

    flat = np.random.default_rng(4).uniform(-1.0, 1.0, (1152, 1152)) / 34
    identity = SiteTransform(center=False, inv_scale=np.ones(1152), hadamard=None)
    residual, branch = split_low_rank(flat, identity, 16, np.dtype(np.float32), dequantized)
    assert branch is None and np.array_equal(residual, flat)
    model, wt, _ = dominant_linear()
    (plan,) = plans(model, {"x": tokens(72)}, W4A4_R8)
    assert plan.linears[0].weight.low_rank is not None
    fused = plan.transform.fuse_weight(wt)
    errors = []
    for steps in (0, 1):
        residual, branch = split_low_rank(fused, plan.transform, 8, np.dtype(np.float32), dequantized, steps)
        errors.append(np.linalg.norm(dequantized(residual) + (fused - residual) - fused))
    assert errors[1] <= errors[0] < np.linalg.norm(dequantized(fused) - fused)

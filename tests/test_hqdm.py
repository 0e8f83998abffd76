"""HQ-DM's single Hadamard: the recipe, the integer form of the fused format, and the CLI defaults."""

from __future__ import annotations

import numpy as np
import pytest

from graph_passes.errors import GraphInputError
from graph_passes.hadamard import HadamardMode, hadamard_factors
from graph_passes.methods import Method, TransformOptions
from graph_passes.single_hadamard_weights import int8_parts, rotated_integer_weight


def test_recipe_and_default_hadamard():
    recipe = Method.HQDM.recipe
    assert (recipe.center, recipe.smooth, recipe.rotate, recipe.single) == (False, False, True, True)
    options = TransformOptions(method=Method.HQDM)
    assert (options.hadamard_mode, options.block) == (HadamardMode.BLOCK, 32)
    assert (TransformOptions().hadamard_mode, TransformOptions().block) == (HadamardMode.FULL, 128)
    explicit = TransformOptions(method=Method.HQDM, hadamard=HadamardMode.FULL)
    assert explicit.hadamard_mode is HadamardMode.FULL


@pytest.mark.parametrize("bound", [480, 4064, 8127, 100_000])
def test_int8_parts_reconstruct_exactly(bound):
    """``m = sum_p 128^p part_p`` with every part in -64..63: two parts up to |m| <= 8127 (HQ-DM's 480 included)."""
    rng = np.random.default_rng(0)
    m = rng.integers(-bound, bound + 1, size=(300, 17))
    m[0, :4] = [bound, -bound, 0, 64]
    parts = int8_parts(m)
    assert all(p.dtype == np.int8 and p.min() >= -64 and p.max() <= 63 for p in parts)
    assert np.array_equal(sum(p.astype(np.int64) * 128**i for i, p in enumerate(parts)), m)
    assert len(parts) == (2 if bound <= 8127 else 3)


@pytest.mark.parametrize("mode,block,weight_block", [(HadamardMode.BLOCK, 32, 128), (HadamardMode.BLOCK, 32, 32),
                                                     (HadamardMode.FULL, 128, 1152)])
def test_rotated_integer_weight_is_the_exact_product(mode, block, weight_block):
    """``R W^T`` with W = s (q - z) per block equals ``c s (R_raw (q - z))``: the integers are exact."""
    rng = np.random.default_rng(1)
    k, n = 1152, 24
    w_int = rng.integers(-15, 16, size=(k, n))
    hadamard = hadamard_factors(k, mode, block_size=block, seed=None)
    m, c = rotated_integer_weight(w_int, hadamard.left, hadamard.right, weight_block)
    assert m.dtype == np.int64 and np.abs(m).max() <= 15 * (block if mode is HadamardMode.BLOCK else k)
    scales = np.repeat(rng.uniform(0.01, 0.1, size=(-(-k // weight_block), n)), weight_block, axis=0)[:k]
    dense = hadamard.matrix() @ (scales * w_int)
    assert np.allclose(c * scales * m, dense, rtol=0, atol=1e-12)
    assert c == pytest.approx(1 / np.sqrt(block if mode is HadamardMode.BLOCK else k))


def test_rotation_across_weight_blocks_is_refused():
    """A full Hadamard mixes every input channel: with weight blocks of 128 the scales do not factor out."""
    hadamard = hadamard_factors(1152, HadamardMode.FULL, seed=None)
    with pytest.raises(GraphInputError, match=r"^--method hqdm --format fused: the Hadamard mixes 1152 input "
                                              r"channels but the weight blocks hold 128; "):
        rotated_integer_weight(np.ones((1152, 4), np.int64), hadamard.left, hadamard.right, 128)


def test_cli_hqdm_formats_agree_and_stay_exact(hn_cli, tiny_onnx, tmp_path):
    """tiny (72 wide) with blocks of 8: transform-only equals the FP graph; fused (two int8 parts) equals qdq."""
    from hn_export.evaluate import GraphRunner

    x = {}
    for fmt in ("qdq", "fused"):
        out = tmp_path / f"{fmt}.onnx"
        result = hn_cli(tiny_onnx, "--method", "hqdm", "--hadamard-block", "8", "--weight-block", "8",
                        "--format", fmt, "--attention", "none", "-o", out, "--no-progress")
        assert result.exit_code == 0, result.err
        x[fmt] = out
    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 7, 32)).astype(np.float32) * 0.2}
    with GraphRunner(x["qdq"]) as qdq, GraphRunner(x["fused"]) as fused:
        want, got = qdq(feeds), fused(feeds)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
    import onnx

    ops = [n.op_type for n in onnx.load(x["fused"]).graph.node]
    # every block linear (10 per block, 2 blocks) in the integer form, no weight DQ left; with Hadamard blocks of 8
    # and symmetric 4-bit weights |R_raw q| <= 7 * 8 = 56 fits one int8 part (blocks of 32: up to 224, two parts)
    # (each block's ff.in with its Gelu fused: IntMatMul8Gelu; the residual adds fused: IntMatMul8[Gated]Residual)
    assert sum(op.startswith("IntMatMul8") for op in ops) == 20 and "DequantizeLinear" not in ops
    assert ops.count("IntMatMul8Gelu") == 2

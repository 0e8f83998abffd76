"""`graph_passes.fuse_matmul_residual.FuseMatMulResidualPass` and `graph_passes.fuse_modulation.FuseModulationPass`
on a DiT-like block in the ``fused`` format: the adaLN modulation ``x * scale + shift`` moves into the quantize op
that reads it (``Modulate*Quantize``), the gated residual ``h + gate * (W x + b)`` and the plain residual
``h + (W x + b)`` into the integer matmul (``IntMatMul4GatedResidual`` / ``IntMatMul4Residual``).

Numbers, on stock onnxruntime (the function bodies): each new op's body is the old op's body with the same ``Mul``
and ``Add`` before (modulation) or after (residual), so the outputs before and after agree within relative L2 1e-6
(measured 0: the same float ops). With the kernel library the fused graph gives the unfused graph's bits
(tests/test_int_kernels.py compares the kernels op by op).
"""

from __future__ import annotations

import numpy as np
import pytest

from graph_passes.emit_fused import FusedEmitter
from graph_passes.fuse_matmul_residual import FuseMatMulResidualPass
from graph_passes.fuse_modulation import FuseModulationPass
from graph_passes.quantization import QuantConfig
from tests.passes._helpers import check, op_counts, parse_model, plans, rel_l2, run, tokens

HN = "hadanorm"
W4A4 = QuantConfig(4, 4, weight_block=16)
WIDTH = 72


def block(residual_shape: str = f"[B, N, {WIDTH}]", gate_shape: str = f"[B, 1, {WIDTH}]",
          second_reader: bool = False, swap: bool = False) -> tuple:
    """``h = x + gate * (mod(x) @ w1 + b1)``, ``y = h + (h @ w2 + b2)`` with ``mod(x) = x * scale + shift``;
    `residual_shape`: the first residual's shape (a broadcast one is not fused); `second_reader`: the modulated
    activation also a graph output; `swap`: every Mul / Add with its inputs the other way round."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH), "b1": rng.standard_normal(WIDTH) * 0.1,
             "w2": rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH), "b2": rng.standard_normal(WIDTH) * 0.1}
    pair = (lambda a, b: f"{b}, {a}") if swap else (lambda a, b: f"{a}, {b}")
    extra = f", float[B, N, {WIDTH}] m" if second_reader else ""
    model = parse_model(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[B, N, {WIDTH}] x, float[B, 1, {WIDTH}] scale, float[B, 1, {WIDTH}] shift,
           float{gate_shape} gate, float{residual_shape} r) => (float[B, N, {WIDTH}] y{extra}) {{
          [mod_mul] s = Mul({pair("x", "scale")})
          [mod_add] m = Add({pair("s", "shift")})
          [a1] p1 = MatMul(m, w1)
          [a1_bias] q1 = Add(p1, b1)
          [gate_mul] g1 = Mul({pair("gate", "q1")})
          [res1] h = Add({pair("g1", "r")})
          [a2] p2 = MatMul(h, w2)
          [a2_bias] q2 = Add(p2, b2)
          [res2] y = Add({pair("q2", "h")})
        }}""", {k: v.astype(np.float32) for k, v in inits.items()}, infer=True)
    for node in model.graph:  # module paths (the parser takes no dots in node names)
        node.name = {"a1": "blk.attn.out", "a1_bias": "blk.attn.out_bias", "a2": "blk.ff.out",
                     "a2_bias": "blk.ff.out_bias"}.get(node.name, node.name)
    rng = np.random.default_rng(3)
    x = tokens(WIDTH)
    r_dims = [int(d) if d.isdigit() else {"B": 2, "N": 32}[d] for d in residual_shape.strip("[]").split(", ")]
    g_dims = [int(d) if d.isdigit() else {"B": 2, "N": 32}[d] for d in gate_shape.strip("[]").split(", ")]
    feeds = {"x": x, "scale": (1.0 + 0.3 * rng.standard_normal((2, 1, WIDTH))).astype(np.float32),
             "shift": rng.standard_normal((2, 1, WIDTH)).astype(np.float32),
             "gate": rng.standard_normal(g_dims).astype(np.float32),
             "r": (x if r_dims == [2, 32, WIDTH] else rng.standard_normal(r_dims)).astype(np.float32)}
    return model, feeds


def fused_format(model, feeds) -> None:
    FusedEmitter(plans(model, feeds, W4A4))(model)


@pytest.mark.parametrize("swap", [False, True], ids=["as-exported", "inputs-swapped"])
def test_block_epilogues_fused(swap):
    model, feeds = block(swap=swap)
    fused_format(model, feeds)
    before = run(model, feeds)
    counts = op_counts(model.graph)
    assert counts[HN, "IntMatMul4"] == 2 and counts[HN, "CenterScaleRotateQuantize"] == 2
    quantize = next(n for n in model.graph if n.op_type == "CenterScaleRotateQuantize"
                    and n.inputs[0].name == "m")
    site_name, site_inputs = quantize.name, list(quantize.inputs[1:])

    assert FuseMatMulResidualPass()(model).modified
    check(model)
    counts = op_counts(model.graph)
    assert counts[HN, "IntMatMul4GatedResidual"] == 1 and counts[HN, "IntMatMul4Residual"] == 1
    assert counts[HN, "IntMatMul4"] == 0 and counts["", "Mul"] == 1  # only the modulation's Mul is left
    gated = next(n for n in model.graph if n.op_type == "IntMatMul4GatedResidual")
    assert [v.name for v in gated.inputs[7:]] == ["gate", "r"] and gated.outputs[0].name == "h"
    assert gated.name == "blk.attn.out.IntMatMul4GatedResidual"
    plain = next(n for n in model.graph if n.op_type == "IntMatMul4Residual")
    assert plain.inputs[7].name == "h" and plain.outputs[0].name == "y"
    assert rel_l2(run(model, feeds)[0], before[0]) <= 1e-6

    assert FuseModulationPass()(model).modified
    check(model)
    counts = op_counts(model.graph)
    assert counts["", "Mul"] == 0 and counts[HN, "ModulateCenterScaleRotateQuantize"] == 1
    modulated = next(n for n in model.graph if n.op_type == "ModulateCenterScaleRotateQuantize")
    assert modulated.name == site_name and modulated.inputs[0].name == "x"
    assert list(modulated.inputs[1:4]) == site_inputs and [v.name for v in modulated.inputs[4:]] == ["scale", "shift"]
    assert (HN, "ModulateCenterScaleRotateQuantize", "") in model.functions
    assert rel_l2(run(model, feeds)[0], before[0]) <= 1e-6


@pytest.mark.parametrize("case", ["broadcast residual", "gate per token", "modulation read twice"])
def test_left_alone(case):
    """A residual that broadcasts (the kernel adds exactly the output's shape), a gate with a row per token (the
    kernel's gate is [N] or one row per batch element), a modulated activation with a second reader: not fused."""
    if case == "broadcast residual":
        model, feeds = block(residual_shape=f"[1, 1, {WIDTH}]")
    elif case == "gate per token":
        model, feeds = block(gate_shape=f"[B, N, {WIDTH}]")
    else:
        model, feeds = block(second_reader=True)
    fused_format(model, feeds)
    before = op_counts(model.graph)
    residual, modulation = FuseMatMulResidualPass()(model), FuseModulationPass()(model)
    counts = op_counts(model.graph)
    if case == "modulation read twice":
        assert residual.modified and not modulation.modified and counts["", "Mul"] == 1
    else:
        assert modulation.modified
        assert counts[HN, "IntMatMul4GatedResidual"] == 0 and counts[HN, "IntMatMul4Residual"] == 1
        assert counts["", "Mul"] == before["", "Mul"] - 1 and counts["", "Add"] == before["", "Add"] - 2
    check(model)

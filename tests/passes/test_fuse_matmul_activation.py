"""`graph_passes.fuse_matmul_activation.FuseMatMulActivationPass`: ``IntMatMul{4,8} -> Gelu(approximate="tanh")``
becomes one ``IntMatMul{4,8}Gelu`` in the ``fused`` format.

Structure: the fused op reads what the matmul read, takes over the Gelu's output name, and nothing else is touched
(exact-erf Gelu, a matmul output with a second reader, a graph output). Numbers, on stock onnxruntime (the function
bodies): the new op's body is the matmul's body followed by the same Gelu, so the outputs before and after agree
within relative L2 1e-6 (measured 0: the same float ops). The kernel library's gelu is tested against numpy in
tests/test_matmul_activation.py.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.emit_fused import FusedEmitter
from graph_passes.fuse_matmul_activation import FuseMatMulActivationPass
from graph_passes.quantization import QuantConfig
from tests.passes._helpers import check, op_counts, parse_model, plans, rel_l2, run, tokens

HN = "hadanorm"
W4A4 = QuantConfig(4, 4, weight_block=16)


def mlp(approximate: str = "tanh", second_reader: bool = False, width: int = 72, hidden: int = 96) -> ir.Model:
    """``y = gelu(x @ w1 + b1) @ w2 + b2`` (PixArt's feed-forward), optionally with the pre-activation as a second
    output."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((width, hidden)) / np.sqrt(width), "b1": rng.standard_normal(hidden) * 0.1,
             "w2": rng.standard_normal((hidden, width)) / np.sqrt(hidden), "b2": rng.standard_normal(width) * 0.1}
    extra_out = f", float[B, N, {hidden}] h" if second_reader else ""
    model = parse_model(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[B, N, {width}] x) => (float[B, N, {width}] y{extra_out}) {{
          [fc1] m1 = MatMul(x, w1)
          [fc1_bias] h = Add(m1, b1)
          [act] a = Gelu <approximate = "{approximate}"> (h)
          [fc2] m2 = MatMul(a, w2)
          [fc2_bias] y = Add(m2, b2)
        }}""", {k: v.astype(np.float32) for k, v in inits.items()})
    for node in model.graph:  # module paths (the parser takes no dots in node names)
        node.name = {"fc1": "ff.in", "fc1_bias": "ff.in_bias", "fc2": "ff.out", "fc2_bias": "ff.out_bias"}.get(
            node.name, node.name)
    return model


def fused_format(model: ir.Model) -> dict[str, np.ndarray]:
    feeds = {"x": tokens(72)}
    FusedEmitter(plans(model, feeds, W4A4))(model)
    return feeds


def test_gelu_tanh_fused_into_its_matmul():
    model = mlp()
    feeds = fused_format(model)
    before = run(model, feeds)[0]
    assert op_counts(model.graph)["", "Gelu"] == 1
    matmul = next(n for n in model.graph if n.op_type == "IntMatMul4")
    inputs, block = list(matmul.inputs), matmul.attributes["block_size"].as_int()
    assert FuseMatMulActivationPass()(model).modified
    check(model)
    counts = op_counts(model.graph)
    assert counts["", "Gelu"] == 0 and counts[HN, "IntMatMul4Gelu"] == 1 and counts[HN, "IntMatMul4"] == 1
    fused = next(n for n in model.graph if n.op_type == "IntMatMul4Gelu")
    assert list(fused.inputs) == inputs and fused.attributes["block_size"].as_int() == block
    assert fused.outputs[0].name == "a" and fused.name == "ff.in.IntMatMul4Gelu"  # names end in the op type
    assert (HN, "IntMatMul4Gelu", "") in model.functions
    assert rel_l2(run(model, feeds)[0], before) <= 1e-6


@pytest.mark.parametrize("case", ["erf", "second reader"])
def test_left_alone(case):
    model = mlp(approximate="none") if case == "erf" else mlp(second_reader=True)
    fused_format(model)
    before = op_counts(model.graph)
    assert not FuseMatMulActivationPass()(model).modified
    assert op_counts(model.graph) == before

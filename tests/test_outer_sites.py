"""Linears outside the model's blocks (caption projection, timestep embedder, adaLN-single, final projection) as
activation sites: selected with ``--every-linear``, quantized at ``--outer-bits`` (8 by default) while the block sites keep
``--wbits/--abits``; the same integers in every format; and their quality cost on the tiny PixArt (single call vs
FP32, FAST_CALIB / EVAL of tests/test_cli_quantize.py). Measured there (2-core CPU machine): W8A8 blocks only
46.3 dB, with the outer linears 44.7 dB (1.6 dB cost); at W4A4 the synthetic model's adaLN output happens to gain from
its own quantization (17.8 -> 25.1 dB with `hn-export diff`), so the test bounds the cost, not the gain.
"""

from __future__ import annotations

import collections

import onnx
import pytest

from hn_export.evaluate import GraphRunner, evaluate, reference_outputs
from tests.test_cli_quantize import EVAL, FAST_CALIB, reference, single_call_sqnr  # noqa: F401 (fixture)

EVERY_LINEAR = ("--every-linear",)  # the linears outside the blocks too (the 4-channel patch conv stays float)


def base_op(op_type: str, fused: bool = False) -> str:
    """The op without its fused parts: ``Modulate<T>Quantize`` -> ``<T>Quantize`` (graph_passes.fuse_modulation),
    ``IntMatMul4[Gelu|Residual|GatedResidual]`` -> ``IntMatMul4`` (fuse_matmul_activation, fuse_matmul_residual);
    `fused`: keep them."""
    if fused:
        return op_type
    return op_type.removeprefix("Modulate").removesuffix("GatedResidual").removesuffix("Residual").removesuffix("Gelu")


def hadanorm_ops(path, fused_gelu: bool = False) -> collections.Counter:
    """(op type, bits attribute) counts; the integer matmuls with a fused epilogue and the quantizers with a fused
    modulation count as their plain op unless `fused_gelu`."""
    model = onnx.load(str(path))
    return collections.Counter(
        (base_op(n.op_type, fused_gelu), next((a.i for a in n.attribute if a.name == "bits"), None))
        for n in model.graph.node if n.domain == "hadanorm")


def weight_containers(path) -> collections.Counter:
    """Element types of the quantized weights (the qdq graph's integer initializers)."""
    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(init.data_type for init in model.graph.initializer
                               if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8))


def test_outer_sites_at_outer_bits(hn_cli, tiny_onnx, tmp_path, kernel_library):
    qdq, fused = tmp_path / "qdq.onnx", tmp_path / "fused.onnx"
    for fmt, out in (("qdq", qdq), ("fused", fused)):
        result = hn_cli(tiny_onnx, "--w4a4", *EVERY_LINEAR, "--format", fmt, "--attention", "none", "-o", out,
                        *FAST_CALIB)
        assert result.exit_code == 0, result.err
    ops = hadanorm_ops(fused)
    # 2 blocks x 10 in-block linears at 4 bits (7 sites), 6 outer linears at 8 bits (one site each)
    assert ops[("IntMatMul4", None)] == 20 and ops[("IntMatMul8", None)] == 6
    gelu = hadanorm_ops(fused, fused_gelu=True)  # each block's ff.in and the caption projection's linear_1
    assert gelu[("IntMatMul4Gelu", None)] == 2 and gelu[("IntMatMul8Gelu", None)] == 1
    # per block: the self-attention's and the feed-forward's gated residual adds, the cross-attention's plain one;
    # the modulation before the self-attention's and the feed-forward's sites, and before the final projection's
    assert gelu[("IntMatMul4GatedResidual", None)] == 4 and gelu[("IntMatMul4Residual", None)] == 2
    assert gelu[("ModulateCenterScaleRotateQuantize", 4)] == 4 and gelu[("ModulateCenterScaleRotateQuantize", 8)] == 1
    assert sum(v for (op, bits), v in ops.items() if op.endswith("Quantize") and bits == 8) == 6
    assert sum(v for (op, bits), v in ops.items() if op.endswith("Quantize") and bits == 4) == 14
    assert weight_containers(qdq) == {onnx.TensorProto.INT8: 6, onnx.TensorProto.INT4: 20}
    # the same quantization in both formats: fused against qdq on the evaluation inputs (one call); only the float
    # summation order differs (measured 129 dB; a code flipped at a rounding boundary costs far less than 60 dB)
    with GraphRunner(qdq) as runner:
        qdq_outputs = reference_outputs(runner, EVAL, with_denoising=False)
    with GraphRunner(fused) as runner:
        assert evaluate(runner, qdq_outputs, EVAL).single_call.sqnr_db >= 60.0


@pytest.mark.parametrize("outer_bits,expected_int8", [("8", 6), ("4", 0)])
def test_outer_bits_option(hn_cli, tiny_onnx, tmp_path, outer_bits, expected_int8):
    out = tmp_path / "m.onnx"
    result = hn_cli(tiny_onnx, "--w4a4", *EVERY_LINEAR, "--outer-bits", outer_bits, "--format", "fused", "-o", out,
                    *FAST_CALIB)
    assert result.exit_code == 0, result.err
    ops = hadanorm_ops(out)
    assert ops[("IntMatMul8", None)] == expected_int8
    assert ops[("IntMatMul4", None)] == 26 - expected_int8


def test_default_selection_keeps_outer_linears_float(hn_cli, tiny_onnx, tmp_path):
    out = tmp_path / "m.onnx"
    assert hn_cli(tiny_onnx, "--w4a4", "--format", "fused", "-o", out, *FAST_CALIB).exit_code == 0
    ops = hadanorm_ops(out)
    assert ops[("IntMatMul8", None)] == 0 and ops[("IntMatMul4", None)] == 20


def test_outer_w8a8_quality(hn_cli, tiny_onnx, tmp_path, reference):  # noqa: F811 (fixture)
    """The quality cost of the outer sites at W8A8 on top of W4A4 blocks (single call vs FP32)."""
    blocks, every = tmp_path / "blocks.onnx", tmp_path / "every.onnx"
    assert hn_cli(tiny_onnx, "--w4a4", "-o", blocks, *FAST_CALIB).exit_code == 0
    assert hn_cli(tiny_onnx, "--w4a4", *EVERY_LINEAR, "-o", every, *FAST_CALIB).exit_code == 0
    sqnr_blocks, sqnr_every = single_call_sqnr(blocks, reference), single_call_sqnr(every, reference)
    assert sqnr_every >= sqnr_blocks - 2.0, (sqnr_blocks, sqnr_every)


def test_layers_lists_the_outer_sites(hn_cli, tiny_onnx):
    default, every = hn_cli("layers", tiny_onnx), hn_cli("layers", tiny_onnx, "--every-linear")
    assert default.exit_code == 0 and every.exit_code == 0, every.err
    assert "14 activation sites in 2 blocks" in default.out and "20 activation sites in 2 blocks" in every.out
    assert "transformer.caption_projection.linear_1" in every.out.split("activation sites")[1]
    assert "transformer.caption_projection.linear_1" not in default.out.split("activation sites")[1]


def test_outer_bits_without_every_linear_is_refused(hn_cli, tiny_onnx, tmp_path):
    out = tmp_path / "m.onnx"
    result = hn_cli(tiny_onnx, "--w4a4", "--outer-bits", "6", "-o", out, *FAST_CALIB)
    assert result.exit_code == 2 and not out.exists()
    assert result.err.strip().splitlines() == ["error: --outer-bits 6 applies to the linears outside the blocks, which "
                                               "only --every-linear quantizes; add --every-linear, or drop --outer-bits"]


def scale_blocks(path) -> dict[str, list[int]]:
    """Weight blocks along the input of each integer matmul (the rows of its scales, input 4), by op type (the 8-bit
    forms under IntMatMul8, the 4-bit under IntMatMul4)."""
    model = onnx.load(str(path), load_external_data=False)
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    blocks = collections.defaultdict(list)
    for node in model.graph.node:
        if node.domain == "hadanorm" and node.op_type.startswith("IntMatMul"):
            blocks[node.op_type[:10]].append(dims[node.input[4]][0])
    return blocks


def test_outer_weight_block(hn_cli, tiny_onnx, tmp_path, kernel_library):
    """``--outer-weight-block 0``: the outer linears' 8-bit weights in one block per output channel (the whole input),
    the block sites keep ``--weight-block``; the fused kernels give the qdq graph's numbers for it."""
    default, per_channel, qdq = tmp_path / "default.onnx", tmp_path / "pc.onnx", tmp_path / "pc-qdq.onnx"
    for out, extra in ((default, ()), (per_channel, ("--outer-weight-block", "0")),
                       (qdq, ("--outer-weight-block", "0", "--format", "qdq"))):
        result = hn_cli(tiny_onnx, "--w4a4", *EVERY_LINEAR, "--weight-block", "32", "--format", "fused",
                        "--attention", "none", *extra, "-o", out, *FAST_CALIB)
        assert result.exit_code == 0, result.err
    before, after = scale_blocks(default), scale_blocks(per_channel)
    assert len(after["IntMatMul8"]) == 6 and set(after["IntMatMul8"]) == {1}
    assert max(before["IntMatMul8"]) >= 3  # 72 inputs and more: blocks of 32 without the option
    assert after["IntMatMul4"] == before["IntMatMul4"] and min(after["IntMatMul4"]) >= 3
    with GraphRunner(qdq) as runner:
        qdq_outputs = reference_outputs(runner, EVAL, with_denoising=False)
    with GraphRunner(per_channel) as runner:  # the same integers; only the float summation order differs
        assert evaluate(runner, qdq_outputs, EVAL).single_call.sqnr_db >= 60.0


@pytest.mark.parametrize("extra,message", [
    ((), "error: --outer-weight-block 0 applies to the linears outside the blocks, which only --every-linear "
         "quantizes; add --every-linear, or drop --outer-weight-block"),
    (("--every-linear", "--format", "nbits"),
     "error: --outer-weight-block 0 (one block per output channel, as long as the input) is not a MatMulNBits block "
     "size for --format nbits (a power of two; 1152 inputs would be padded to 2048); use --format fused or qdq, or a "
     "power-of-two --outer-weight-block"),
    (("--every-linear", "--format", "fused", "--outer-weight-block", "40000"),
     "error: --format fused takes a --outer-weight-block up to 32768 (its integer kernels' largest), got 40000; use "
     "--outer-weight-block 128"),
    (("--every-linear", "--format", "fused", "--outer-weight-block", "6"),
     "error: --format fused needs a --outer-weight-block that is a multiple of 4 for 8-bit weights, got 6; use "
     "--outer-weight-block 128"),
])
def test_outer_weight_block_refused(hn_cli, tiny_onnx, tmp_path, extra, message):
    out = tmp_path / "m.onnx"
    result = hn_cli(tiny_onnx, "--w4a4", *(() if "--outer-weight-block" in extra else ("--outer-weight-block", "0")),
                    *extra, "-o", out, *FAST_CALIB)
    assert result.exit_code == 2 and not out.exists()
    assert result.err.strip().splitlines() == [message]


def test_for_site_outer_weight_block():
    """QuantConfig.for_site: the block sites keep weight_block; the outer ones take outer_weight_block (None: the
    same block; 0: the whole input, capped at the fused kernels' largest block in the fused format)."""
    from graph_passes.quantization import FUSED_MAX_BLOCK, WHOLE_INPUT, OutputFormat, QuantConfig

    base = QuantConfig(weight_block=64)
    assert base.for_site(outer=False) is base and base.for_site(outer=True).weight_block == 64
    assert base.for_site(outer=True).weight_bits == 8
    assert QuantConfig(outer_weight_block=256).for_site(outer=True).weight_block == 256
    assert QuantConfig(outer_weight_block=0).for_site(outer=True).weight_block == WHOLE_INPUT
    fused = QuantConfig(outer_weight_block=0, format=OutputFormat.FUSED)
    assert fused.for_site(outer=True).weight_block == FUSED_MAX_BLOCK
    assert fused.for_site(outer=False).weight_block == 128
    with pytest.raises(ValueError, match="outer_weight_block -1 is negative"):
        QuantConfig(outer_weight_block=-1)

"""The linear listing: module paths from node metadata, weights, biases, features, and 7 activation sites per block."""

from __future__ import annotations

import collections
import json

import pytest

from graph_passes.linears import find_activation_sites, find_linears
from hn_export.model_files import load_model
from tests.roles import PIXART_BLOCKS, PIXART_ROLES

EXPECTED_GROUPS = {
    "self-attn in": ["attn1.to_q", "attn1.to_k", "attn1.to_v"],
    "self-attn out": ["attn1.to_out.0"],
    "cross-attn query in": ["attn2.to_q"],
    "text in": ["attn2.to_k", "attn2.to_v"],
    "cross-attn out": ["attn2.to_out.0"],
    "ffn in": ["ff.net.0.proj"],
    "ffn out": ["ff.net.2"],
}


@pytest.fixture(scope="module")
def wide_onnx(tmp_path_factory):
    """The real 1152-wide architecture, 1 block, small latent (export is quick)."""
    from hn_export.cli import main

    path = tmp_path_factory.mktemp("wide") / "wide.onnx"
    try:
        main(["export", "--preset", "pixart-sigma-256", "--layers", "1", "--sample-size", "8", "-o", str(path)])
    except SystemExit as exc:
        assert exc.code == 0
    return path


def check_sites(path, blocks: int, width: int) -> None:
    model = load_model(path)
    sites = find_activation_sites(model, PIXART_BLOCKS)
    assert len(sites) == 7 * blocks
    per_block = collections.Counter(s.block for s in sites)
    assert per_block == {b: 7 for b in range(blocks)}
    for site in sites:
        suffixes = [lin.module_path.split(f"transformer_blocks.{site.block}.")[1] for lin in site.linears]
        assert suffixes == EXPECTED_GROUPS[site.role], site.name
        assert all(lin.bias is not None and lin.bias_add is not None for lin in site.linears)
        assert site.width == (4 * width if site.role == "ffn out" else width)
        # q/k/v read one tensor; the cross-attention k/v read the projected caption, shared by every block.
        assert len({lin.activation.name for lin in site.linears}) == 1
    assert {s.role for s in sites} == set(PIXART_ROLES.roles)
    text_inputs = {s.activation.name for s in sites if s.role == "text in"}
    assert len(text_inputs) == 1


def test_tiny_has_7_sites_per_block(tiny_onnx):
    check_sites(tiny_onnx, blocks=2, width=72)


def test_1152_wide_block_has_7_sites(wide_onnx):
    check_sites(wide_onnx, blocks=1, width=1152)
    linears = find_linears(load_model(wide_onnx))
    by_path = {lin.module_path.removeprefix("transformer."): lin for lin in linears}
    ff_in = by_path["transformer_blocks.0.ff.net.0.proj"]
    assert (ff_in.in_features, ff_in.out_features) == (1152, 4608)
    assert tuple(ff_in.weight.const_value.shape) == (1152, 4608)  # stored [in, out]
    # The three timestep-embedding linears come out as Gemm(transB=1).
    gemms = [lin for lin in linears if lin.node.op_type == "Gemm"]
    assert len(gemms) == 3 and all("adaln_single" in lin.module_path for lin in gemms)


def test_layers_command_json(hn_cli, tiny_onnx):
    result = hn_cli("layers", tiny_onnx, "--json")
    assert result.exit_code == 0, result.err
    data = json.loads(result.out)
    assert len(data["sites"]) == 14
    assert len(data["linears"]) == 27  # 10 per block + 3 timestep + 2 caption projection + proj_out + patch conv
    convs = [lin for lin in data["linears"] if lin["op"] == "Conv"]
    assert [(c["module"], c["kind"]) for c in convs] == [("transformer.pos_embed.proj", "conv 2x2")]
    assert data["sites"][0]["linears"] == [f"transformer.transformer_blocks.0.{s}" for s in EXPECTED_GROUPS["self-attn in"]]

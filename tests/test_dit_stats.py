"""`--init dit-stats` plants DiT-like statistics (channel-mean spread, heavy tails, outlier channels, gates of order 1)
that plain random init does not have. Thresholds sit well inside the measured values (see models/dit_stats.py)."""

from __future__ import annotations

import pytest
import torch

from models.build import InitKind, ModelSource, build_transformer, make_inputs
from models.dit_stats import (
    block_contribution,
    block_contributions,
    measure_activation_stats,
    plant_dit_stats,
    tensor_stats,
)


@pytest.fixture(scope="module")
def tiny_pair():
    plain = build_transformer(ModelSource(preset="tiny", seed=0, init=InitKind.PLAIN))
    dit = build_transformer(ModelSource(preset="tiny", seed=0, init=InitKind.DIT_STATS))
    inputs = make_inputs(plain, batch=4, caption_length=16, seed=1)
    return plain, dit, inputs


@pytest.fixture(scope="module")
def tiny_stats(tiny_pair):
    plain, dit, inputs = tiny_pair
    return measure_activation_stats(plain, inputs), measure_activation_stats(dit, inputs)


def test_tensor_stats_on_known_tensors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 64, generator=gen)
    s = tensor_stats(x)
    assert s["mean_spread"] < 0.02  # channel means ~0 +- 1/sqrt(20000)
    assert abs(s["kurtosis"] - 3.0) < 0.1
    assert 1.0 <= s["outlier_ratio"] < 1.3
    # channel means 0..63 * 0.1 with unit std: spread = std of means / 1
    shifted = x + 0.1 * torch.arange(64.0)
    assert tensor_stats(shifted)["mean_spread"] == pytest.approx(0.1 * torch.arange(64.0).std(unbiased=False).item(),
                                                                 rel=0.02)
    # one channel 20x larger: outlier ratio ~20 and heavy tails
    big = x.clone()
    big[:, 5] *= 20
    s_big = tensor_stats(big)
    assert 17 < s_big["outlier_ratio"] < 23
    assert s_big["kurtosis"] > 20


def test_roles_cover_every_block_linear(tiny_stats):
    _, dit = tiny_stats
    assert dit["overall"]["count"] == 20  # 10 linears x 2 blocks
    assert {r: v["count"] for r, v in dit["roles"].items()} == {
        "self-attn in": 6, "self-attn out": 2, "cross-attn query in": 2, "text in": 4, "cross-attn out": 2, "ffn in": 2, "ffn out": 2,
    }


def test_mean_spread_planted(tiny_stats):
    plain, dit = tiny_stats
    # measured: overall 1.29 -> 2.83; self_qkv 0.76 -> 2.95, ffn_up 0.77 -> 3.04, ffn_down 0.74 -> 3.98, cross_q 0.72
    # -> 2.45, cross_kv 0.56 -> 1.60
    assert dit["overall"]["mean_spread"] > 1.8 * plain["overall"]["mean_spread"]
    for role in ("self-attn in", "ffn in", "ffn out", "cross-attn query in"):
        assert dit["roles"][role]["mean_spread"] > 2.0, role
        assert dit["roles"][role]["mean_spread"] > 2.5 * plain["roles"][role]["mean_spread"], role
    assert dit["roles"]["text in"]["mean_spread"] > 2.0 * plain["roles"]["text in"]["mean_spread"]


def test_heavy_tails_and_outliers_planted(tiny_stats):
    plain, dit = tiny_stats
    # measured kurtosis overall 3.39 -> 13.5 (ffn_down 6.3 -> 37.7); outlier ratio 2.05 -> 8.0 (ffn_down 2.6 -> 21.0)
    assert plain["overall"]["kurtosis"] < 4.0
    assert dit["overall"]["kurtosis"] > 9.0
    for role in ("self-attn in", "ffn in", "ffn out", "cross-attn query in", "text in"):
        assert dit["roles"][role]["kurtosis"] > 3.0 * plain["roles"][role]["kurtosis"], role
    assert plain["overall"]["outlier_ratio"] < 2.6
    assert dit["overall"]["outlier_ratio"] > 6.0
    assert dit["roles"]["ffn out"]["outlier_ratio"] > 15.0
    assert dit["roles"]["self-attn in"]["outlier_ratio"] > 3.0 * plain["roles"]["self-attn in"]["outlier_ratio"]


def _gates(model, timesteps: torch.Tensor) -> torch.Tensor:
    """Effective adaLN gates [blocks, B, 2, D] (attention and FFN) for the given timesteps."""
    d = model.config.num_attention_heads * model.config.attention_head_dim
    with torch.no_grad():
        t, _ = model.adaln_single(timesteps, None, batch_size=len(timesteps), hidden_dtype=torch.float32)
        t = t.view(len(timesteps), 6, d)
        return torch.stack([(b.scale_shift_table[None] + t)[:, [2, 5]] for b in model.transformer_blocks])


def test_gates_of_order_one(tiny_pair):
    plain, dit, _ = tiny_pair
    ts = torch.tensor([0.0, 300.0, 999.0])
    # measured mean |gate|: plain ~0.11, dit-stats ~1.0
    assert _gates(plain, ts).abs().mean() < 0.25
    assert 0.8 < _gates(dit, ts).abs().mean() < 1.2


def test_every_block_contributes(tiny_pair):
    plain, dit, inputs = tiny_pair
    per_block = block_contributions(dit, inputs)
    # measured: dit-stats 0.543 (mean), plain 0.111
    assert len(per_block) == 2
    assert min(per_block) > 0.2
    assert block_contribution(dit, inputs) > 0.3
    assert block_contribution(plain, inputs) < 0.2
    assert block_contribution(dit, inputs) > 3.0 * block_contribution(plain, inputs)


def test_full_width_two_layers():
    """1152 wide (the real width), 2 blocks, 16 tokens: measured block contribution 0.062 plain / 0.389 dit-stats."""
    src = dict(preset="pixart-sigma-256", layers=2, sample_size=8, seed=0)
    dit = build_transformer(ModelSource(**src))
    inputs = make_inputs(dit, batch=2, caption_length=8, seed=1)
    stats = measure_activation_stats(dit, inputs)
    assert dit.transformer_blocks[0].attn1.to_q.in_features == 1152
    assert block_contribution(dit, inputs) > 0.25
    assert stats["overall"]["kurtosis"] > 12.0  # measured 20.4 (plain 3.2)
    assert stats["roles"]["ffn out"]["outlier_ratio"] > 15.0  # measured 33.5 (plain 3.6)
    plain = build_transformer(ModelSource(**src, init=InitKind.PLAIN))
    assert block_contribution(plain, inputs) < 0.1


def test_seeded_determinism():
    a = build_transformer(ModelSource(preset="tiny", seed=3))
    b = build_transformer(ModelSource(preset="tiny", seed=3))
    c = build_transformer(ModelSource(preset="tiny", seed=4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer_blocks.0.scale_shift_table"], sc["transformer_blocks.0.scale_shift_table"])
    # planting on a copy of the plain weights reproduces the dit-stats model exactly
    plain = build_transformer(ModelSource(preset="tiny", seed=3, init=InitKind.PLAIN))
    plant_dit_stats(plain, 3)
    sp = plain.state_dict()
    assert all(torch.equal(sa[k], sp[k]) for k in sa)


def test_build_does_not_touch_global_rng():
    torch.manual_seed(123)
    build_transformer(ModelSource(preset="tiny", seed=9))
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(4))


def test_outliers_recipe_has_tails_but_no_planted_offsets(tiny_pair):
    """`--init outliers`: dit-stats' outlier channels and heavy tails without its channel-mean offsets.
    Measured on tiny (seed 0): overall mean spread plain 1.29 / dit-stats 2.83 / outliers 0.86; kurtosis 3.39 /
    13.5 / 40.0; outlier ratio 2.05 / 8.0 / 7.0. Bounds sit between the recipes with a margin."""
    plain, _, inputs = tiny_pair
    outliers = measure_activation_stats(build_transformer(ModelSource(preset="tiny", seed=0, init=InitKind.OUTLIERS)),
                                        inputs)
    assert outliers["overall"]["mean_spread"] < 1.2 * measure_activation_stats(plain, inputs)["overall"]["mean_spread"]
    assert outliers["overall"]["mean_spread"] < 1.5
    assert outliers["overall"]["kurtosis"] > 9.0
    assert outliers["overall"]["outlier_ratio"] > 5.0

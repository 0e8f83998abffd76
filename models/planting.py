"""`--init dit-stats`: plant DiT-like activation statistics into seeded random PixArt weights (`models.dit_stats`
measures them).

The pieces of the recipe (residual offsets, projection outliers, attention sharpening, adaLN rows, FFN up-projection)
are shared by the other families' recipes in `models/families/*.py`. This module needs torch only: the families
import it (lazily, when they plant), and it imports nothing of `models`.

Why: with the plain diffusers initialisation the adaLN gates (``scale_shift_table`` gate rows + the ``adaln_single``
linear output) are small (mean |gate| 0.04 at 1152 wide, 0.11 in tiny; dit-stats: 1.0), so blocks barely change the
residual stream (bypassing one block of the 1152-wide model changes the output by ~5 %), every linear sees
near-Gaussian inputs with small channel means, and any quantization looks harmless (W4A4 without a transform still
gave ~31 dB SQNR in a torch simulation). Trained DiTs are different: linear inputs have channel-wise mean offsets of
varied size, a few outlier channels and heavy tails (largest after the FFN's GELU), and every block contributes. The
recipe below plants those statistics. It is not tuned to make any quantization method win: it only sets means,
scales, gates, attention sharpness and a few outlier channels.

Recipe (`plant_dit_stats(model, seed)`, draws from ``torch.Generator().manual_seed(10_000_019 + seed)``; D = width,
n = max(2, round(0.01 D)) outlier channels: 2 for D = 72, 12 for D = 1152; "lognormal(m, s)" = m * exp(s * N(0, 1))):

1. Residual stream: the patch-embedding bias becomes +-lognormal(0.3, 0.8) per channel, with n "massive" channels at
   +-U(6, 10). Added once, it persists along the residual stream (the input of the cross-attention ``to_q``, which has
   no norm, and through the LayerNorms the channel-mean differences of every adaLN-modulated input).
2. ``adaln_single.linear`` (the timestep-dependent part of shift/scale/gate, std ~0.04-0.08) keeps its random weights;
   the per-block tables below set the operating point.
3. Caption projection ``linear_2`` (input of the cross-attention k/v): bias +-lognormal(0.1, 1.0), n output rows x 8.
4. Every block:
   - ``scale_shift_table`` shift rows (attention and FFN): +-lognormal(0.25, 1.0) per channel: mean offsets of varied
     size in the inputs of q/k/v and of the FFN up-projection;
   - scale rows: 1 + scale ~ 1 + N(0, 0.15), with n channels at 1 + scale = +-U(6, 12): outlier channels;
   - gate rows: 1 + N(0, 0.25): gates of order 1, so every block changes the residual stream;
   - q and k of self-attention x 3 and of cross-attention x 4 (weights and biases): random init gives near-uniform
     attention (logit std 0.3 self / 0.1 cross, the output is the same for every token); now the logit std is 2-3;
   - FFN up-projection: bias N(0, 1) * lognormal(0.5, 0.7) (channel means after the GELU differ), and
     max(2, round(0.005 * 4D)) hidden rows of its weight x 8 (heavy tails / outliers in the down-projection input).
5. The output modulation (global ``scale_shift_table`` [2, D]): shift and scale rows as in the blocks.
"""

from __future__ import annotations

import torch
from torch import nn

# Rows of a block's scale_shift_table [6, D]: shift, scale, gate of the attention, then of the FFN.
SHIFT_MSA, SCALE_MSA, GATE_MSA, SHIFT_MLP, SCALE_MLP, GATE_MLP = range(6)


def _n_outliers(width: int, fraction: float, minimum: int) -> int:
    return max(minimum, int(round(fraction * width)))


def _lognormal(gen: torch.Generator, n: int, median: float, sigma: float) -> torch.Tensor:
    return median * torch.exp(sigma * torch.randn(n, generator=gen))


def _signs(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)


def _pick(gen: torch.Generator, width: int, k: int) -> torch.Tensor:
    return torch.randperm(width, generator=gen)[:k]


@torch.no_grad()
def plant_residual_offsets(gen: torch.Generator, bias: torch.Tensor, keep: float) -> None:
    """Per-channel offsets +-lognormal(0.3, 0.8) with n massive channels at +-U(6, 10), into a patch-embedding bias."""
    d = bias.numel()
    n_out = _n_outliers(d, 0.01, 2)
    values = _signs(gen, d) * _lognormal(gen, d, 0.3, 0.8)
    massive = _pick(gen, d, n_out)
    values[massive] = _signs(gen, n_out) * (6.0 + 4.0 * torch.rand(n_out, generator=gen))
    bias.copy_((keep * values).to(bias.dtype))


@torch.no_grad()
def plant_projection_outliers(gen: torch.Generator, linear: nn.Linear, keep: float) -> None:
    """A projection's bias +-lognormal(0.1, 1.0) and n of its output rows x 8 (e.g. the caption projection)."""
    width = linear.out_features
    linear.bias.copy_((keep * _signs(gen, width) * _lognormal(gen, width, 0.1, 1.0)).to(linear.bias.dtype))
    linear.weight[_pick(gen, width, _n_outliers(width, 0.01, 2))] *= 8.0


@torch.no_grad()
def sharpen_attention(linears: list[nn.Linear], factor: float) -> None:
    """Scale query/key projections (weights and biases) so attention logits have a std of order 1-3."""
    for linear in linears:
        linear.weight.mul_(factor)
        if linear.bias is not None:
            linear.bias.mul_(factor)


def modulation_rows(gen: torch.Generator, d: int, keep: float, pairs: int = 2) -> list[torch.Tensor]:
    """adaLN rows: `pairs` x (shift, scale) then `pairs` gates. Shift +-lognormal(0.25, 1.0); scale such that
    1 + scale ~ 1 + N(0, 0.15) with n outlier channels at +-U(6, 12); gate 1 + N(0, 0.25)."""
    n_out = _n_outliers(d, 0.01, 2)
    rows: list[torch.Tensor] = []
    for _ in range(pairs):
        shift = keep * _signs(gen, d) * _lognormal(gen, d, 0.25, 1.0)
        scale = 0.15 * torch.randn(d, generator=gen)
        idx = _pick(gen, d, n_out)
        scale[idx] = (6.0 + 6.0 * torch.rand(n_out, generator=gen)) * _signs(gen, n_out) - 1.0
        rows += [shift, scale]
    gates = [1.0 + 0.25 * torch.randn(d, generator=gen) for _ in range(pairs)]
    return rows + gates


@torch.no_grad()
def plant_ffn_up(gen: torch.Generator, up: nn.Linear, keep: float) -> None:
    """FFN up-projection: bias N(0, 1) * lognormal(0.5, 0.7) and max(2, round(0.005 * width)) rows x 8."""
    hidden = up.out_features
    up_bias = torch.randn(hidden, generator=gen) * _lognormal(gen, hidden, 0.5, 0.7)
    if up.bias is not None:
        up.bias.copy_((keep * up_bias).to(up.bias.dtype))
    up.weight[_pick(gen, hidden, _n_outliers(hidden, 0.005, 2))] *= 8.0


@torch.no_grad()
def plant_adaln_linear(linear: nn.Linear, rows: list[torch.Tensor], weight_scale: float = 0.1) -> None:
    """Set the bias of an adaLN modulation linear (output = rows concatenated, diffusers chunk order) to the planted
    rows and shrink its weight, so the planted operating point dominates and the conditioning still varies it."""
    linear.bias.copy_(torch.cat(rows).to(linear.bias.dtype))
    linear.weight.mul_(weight_scale)


def planting_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(10_000_019 + int(seed))


@torch.no_grad()
def plant_dit_stats(model: nn.Module, seed: int, offsets: bool = True) -> None:
    """Plant DiT-like activation statistics into a randomly initialised PixArt transformer, in place.

    Deterministic for a given `seed` (its own `torch.Generator`; the global RNG is untouched). See the module
    docstring for the recipe and the numbers it gives. ``offsets=False`` is ``--init outliers``: the same draws, but
    every planted per-channel mean offset is zero (patch-embedding bias and its massive channels, caption-projection
    bias, the shift rows, the FFN up-projection bias); outlier channels (scale rows, weight rows x 8), attention
    sharpness and gates of order 1 stay. Centering (DynCenter, HadaNorm) removes exactly the offsets dit-stats
    plants, so this recipe shows the methods on statistics that do not favour it. The other families' recipes
    (models/families/*.py) use the same pieces.
    """
    gen = planting_generator(seed)
    keep = 1.0 if offsets else 0.0  # multiplies every planted offset (draws unchanged, so outliers are the same)
    d = model.config.num_attention_heads * model.config.attention_head_dim

    # Residual stream: offsets through the patch embedding bias (added once; it persists along the residual stream,
    # as massive activations do in real DiTs).
    plant_residual_offsets(gen, model.pos_embed.proj.bias, keep)
    # Caption projection (input of the cross-attention k/v): per-channel offsets and a few large output channels.
    cap = getattr(model, "caption_projection", None)
    if cap is not None:
        plant_projection_outliers(gen, cap.linear_2, keep)

    for block in model.transformer_blocks:
        # Random init gives near-uniform attention (logit std ~0.3 self, ~0.1 cross): sharpen it.
        sharpen_attention([block.attn1.to_q, block.attn1.to_k], 3.0)
        sharpen_attention([block.attn2.to_q, block.attn2.to_k], 4.0)
        # scale_shift_table rows: shift, scale, gate of the attention, then of the FFN
        shift_msa, scale_msa, shift_mlp, scale_mlp, gate_msa, gate_mlp = modulation_rows(gen, d, keep)
        table = torch.stack([shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp])
        block.scale_shift_table.copy_(table.to(block.scale_shift_table.dtype))
        plant_ffn_up(gen, block.ff.net[0].proj, keep)

    # Output modulation (global table [2, D]: shift, scale).
    shift, scale, _gate = modulation_rows(gen, d, keep, pairs=1)
    model.scale_shift_table.copy_(torch.stack([shift, scale]).to(model.scale_shift_table.dtype))

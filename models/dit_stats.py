"""`--init dit-stats`: plant DiT-like activation statistics into seeded random PixArt weights, and measure them.

The pieces of the recipe (residual offsets, projection outliers, attention sharpening, adaLN rows, FFN up-projection)
are shared by the other families' recipes in `models/families/*.py`. The tables below name roles as they were
measured (self_qkv = self-attn in, self_out = self-attn out, cross_q = cross-attn query in, cross_kv = text in,
cross_out = cross-attn out, ffn_up = ffn in, ffn_down = ffn out); `measure_activation_stats` now reports the family's
role names.

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

Measured (`python -m models.dit_stats --preset P [--layers N --sample-size S --batch B]`; inputs `make_inputs` with
seed 1: random latents, timesteps in [0, 999], Gaussian captions of length 16; model seed 0). Stats of the input of
each nn.Linear in ``transformer_blocks`` (`tensor_stats`), averaged over the modules of a role; mean spread = std of
the per-channel means / mean per-channel std; kurtosis = Pearson kurtosis of all entries (Gaussian 3); outlier ratio =
max / median of the per-channel absmax; block contribution = mean over blocks of ||f - f_without_block|| / ||f||.

tiny (72 wide, 2 blocks, 16 tokens, batch 4), plain / dit-stats:

| role | mean spread | kurtosis | max/median absmax |
|---|---|---|---|
| self_qkv | 0.76 / 2.95 | 3.00 / 14.44 | 1.84 / 8.77 |
| self_out | 3.48 / 4.10 | 3.60 / 2.38 | 3.12 / 2.26 |
| cross_q | 0.72 / 2.45 | 2.84 / 10.03 | 1.79 / 4.22 |
| cross_kv | 0.56 / 1.60 | 3.28 / 12.25 | 1.63 / 6.66 |
| cross_out | 3.76 / 2.65 | 2.74 / 3.02 | 2.64 / 2.57 |
| ffn_up | 0.77 / 3.04 | 2.90 / 14.12 | 1.63 / 10.49 |
| ffn_down | 0.74 / 3.98 | 6.26 / 37.71 | 2.56 / 21.03 |
| overall | 1.29 / 2.83 | 3.39 / 13.51 | 2.05 / 8.02 |
| block contribution | 0.111 / 0.543 | | |

pixart-sigma-512 architecture with 2 layers (1152 wide) at sample size 32 (256 tokens, batch 4), plain / dit-stats:

| role | mean spread | kurtosis | max/median absmax |
|---|---|---|---|
| self_qkv | 0.72 / 2.31 | 2.84 / 27.09 | 1.64 / 14.01 |
| self_out | 9.51 / 4.53 | 2.88 / 2.90 | 3.41 / 3.06 |
| cross_q | 0.71 / 1.90 | 2.95 / 16.56 | 1.53 / 4.51 |
| cross_kv | 0.40 / 1.53 | 3.01 / 20.28 | 1.68 / 8.69 |
| cross_out | 2.11 / 2.61 | 3.04 / 3.13 | 3.23 / 2.96 |
| ffn_up | 0.73 / 2.50 | 2.85 / 31.64 | 1.67 / 15.21 |
| ffn_down | 0.69 / 3.32 | 6.12 / 43.52 | 2.18 / 19.98 |
| overall | 1.67 / 2.48 | 3.24 / 21.96 | 2.03 / 10.51 |
| block contribution | 0.046 / 0.405 | | |

The full 28-block pixart-sigma-512 at sample size 16 (64 tokens, batch 2; 4.5 min on 2 cores): block contribution
0.051 plain / 0.262 dit-stats; overall mean spread 1.48 / 4.12, kurtosis 3.25 / 25.29, outlier ratio 2.32 / 13.55
(ffn_down outlier ratio 2.83 / 36.6).
Other seeds of tiny (1, 2), dit-stats: overall mean spread 4.57 / 2.97, kurtosis 25.3 / 11.3, outlier ratio 14.8 /
7.2, block contribution 0.46 / 0.36 (plain 0.13 / 0.11).

Notes: the attention-output roles (self_out, cross_out) have a large mean spread under both inits (the attention
output of random v varies little from token to token compared with its channel means) and no planted outliers. Float16
stays safe: the largest linear input is ~33 (1152 wide, 2 blocks), fp16 vs fp32 torch differ by < 4e-3.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

STAT_NAMES = ("mean_spread", "kurtosis", "outlier_ratio")

# Rows of a block's scale_shift_table [6, D]: shift, scale, gate of the attention, then of the FFN.
SHIFT_MSA, SCALE_MSA, GATE_MSA, SHIFT_MLP, SCALE_MLP, GATE_MLP = range(6)


# ----------------------------------------------------------------------------------------------------------------
# Planting
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


def tensor_stats(x: torch.Tensor) -> dict[str, float]:
    """Statistics of a linear's input `x` [..., C] (tokens x channels), in float64.

    - mean_spread: std over channels of the per-channel means / mean over channels of the per-channel stds.
    - kurtosis: Pearson kurtosis E[(x - m)^4] / var^2 of all entries pooled (a Gaussian gives 3).
    - outlier_ratio: max over channels of the per-channel absmax / median of the per-channel absmax.
    """
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    mu = x.mean(0)
    sd = x.std(0, unbiased=False)
    centered = x - x.mean()
    var = centered.pow(2).mean()
    absmax = x.abs().amax(0)
    return {
        "mean_spread": float(mu.std(unbiased=False) / sd.mean().clamp_min(1e-12)),
        "kurtosis": float(centered.pow(4).mean() / var.pow(2).clamp_min(1e-24)),
        "outlier_ratio": float(absmax.max() / absmax.median().clamp_min(1e-12)),
    }


def _block_linears(model: nn.Module):
    from models.build import family_of_model

    for name, role, module in family_of_model(model).block_linear_roles(model):
        yield name, role or "other", module


def _blocks(model: nn.Module) -> list[nn.Module]:
    from models.build import family_of_model

    return [b for name in family_of_model(model).block_lists for b in getattr(model, name, [])]


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    from models.build import forward

    return forward(model, inputs)


@torch.no_grad()
def measure_activation_stats(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Input statistics of every nn.Linear inside `transformer_blocks`, via forward hooks, for one forward pass.

    Returns ``{"modules": {name: stats}, "roles": {role: stats}, "overall": stats}``; role and overall values are
    means over the modules (stats as in `tensor_stats`, plus ``count``). Roles are the family's site roles
    (`ModelFamily.role_rules`; PixArt: self-attn in, self-attn out, cross-attn query in, text in, cross-attn out,
    ffn in, ffn out).
    """
    per_module: dict[str, dict[str, float]] = {}
    roles: dict[str, str] = {}
    handles = []

    def hook_for(name: str):
        def hook(_module, args):
            per_module[name] = tensor_stats(args[0])

        return hook

    try:
        for name, role, module in _block_linears(model):
            roles[name] = role
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        _forward(model, inputs)
    finally:
        for h in handles:
            h.remove()

    grouped: dict[str, list[dict[str, float]]] = defaultdict(list)
    for name, stats in per_module.items():
        grouped[roles[name]].append(stats)

    def mean_of(items: list[dict[str, float]]) -> dict[str, float]:
        out = {k: sum(s[k] for s in items) / len(items) for k in STAT_NAMES}
        out["count"] = len(items)
        return out

    return {
        "modules": per_module,
        "roles": {role: mean_of(items) for role, items in sorted(grouped.items())},
        "overall": mean_of(list(per_module.values())),
    }


def _bypass(_module, args, kwargs, output):
    """Forward hook: the block returns its input hidden states unchanged (joint blocks of SD3 / Flux return
    ``(encoder_hidden_states, hidden_states)``: both unchanged)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        return (context, hidden) if len(output) == 2 else output
    return hidden


@torch.no_grad()
def block_contributions(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[float]:
    """For each block: ||f(x) - f_without_block(x)|| / ||f(x)|| (the block bypassed: its output = its input)."""
    reference = _forward(model, inputs).to(torch.float64)
    norm = reference.norm().clamp_min(1e-30)
    out = []
    for block in _blocks(model):
        handle = block.register_forward_hook(_bypass, with_kwargs=True)
        try:
            bypassed = _forward(model, inputs).to(torch.float64)
        finally:
            handle.remove()
        out.append(float((reference - bypassed).norm() / norm))
    return out


def block_contribution(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Mean over blocks of the relative L2 change of the output when that one block is bypassed."""
    values = block_contributions(model, inputs)
    return sum(values) / len(values)


def summary(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Role/overall statistics and block contribution, rounded, for reports."""
    stats = measure_activation_stats(model, inputs)
    rnd = lambda s: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}  # noqa: E731
    return {
        "roles": {r: rnd(s) for r, s in stats["roles"].items()},
        "overall": rnd(stats["overall"]),
        "block_contribution": round(block_contribution(model, inputs), 4),
    }


def main(argv: list[str] | None = None) -> None:
    """Print the statistics of plain and dit-stats init: ``python -m models.dit_stats --preset tiny``."""
    import argparse
    import json

    from models.build import InitKind, ModelSource, build_transformer, make_inputs

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--sample-size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--caption-length", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    results = {}
    for init in (InitKind.PLAIN, InitKind.DIT_STATS, InitKind.OUTLIERS):
        model = build_transformer(ModelSource(preset=args.preset, layers=args.layers, sample_size=args.sample_size,
                                              seed=args.seed, init=init))
        inputs = make_inputs(model, batch=args.batch, caption_length=args.caption_length, seed=args.seed + 1)
        results[init.value] = summary(model, inputs)
        del model
    if args.json:
        print(json.dumps(results))
        return
    inits = list(results)
    names = " / ".join(inits)
    print(f"| role | mean spread {names} | kurtosis {names} | max/median absmax {names} |")
    print("|---|---|---|---|")
    for role in [*results["plain"]["roles"], "overall"]:
        rows = [r["overall"] if role == "overall" else r["roles"][role] for r in results.values()]
        cells = " | ".join(" / ".join(f"{row[k]:.2f}" for row in rows) for k in STAT_NAMES)
        print(f"| {role} | {cells} |")
    contributions = " / ".join(f"{r['block_contribution']:.3f}" for r in results.values())
    print(f"| block contribution | {contributions} | | |")


if __name__ == "__main__":
    main()

"""Measure the activation statistics of seeded random weights: plain init against what `--init dit-stats` plants
(`models.planting`), and print them (`main`).

The tables below name roles as they were measured (self_qkv = self-attn in, self_out = self-attn out, cross_q =
cross-attn query in, cross_kv = text in, cross_out = cross-attn out, ffn_up = ffn in, ffn_down = ffn out);
`measure_activation_stats` now reports the family's role names.

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

import argparse
import json
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from models.build import InitKind, ModelSource, build_transformer, family_of_model, forward, make_inputs
from models.planting import plant_dit_stats  # noqa: F401  (re-exported: the recipe this module measures)

STAT_NAMES = ("mean_spread", "kurtosis", "outlier_ratio")


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
    for name, role, module in family_of_model(model).block_linear_roles(model):
        yield name, role or "other", module


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [b for name in family_of_model(model).block_lists for b in getattr(model, name, [])]


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
        forward(model, inputs)
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
    reference = forward(model, inputs).to(torch.float64)
    norm = reference.norm().clamp_min(1e-30)
    out = []
    for block in _blocks(model):
        handle = block.register_forward_hook(_bypass, with_kwargs=True)
        try:
            bypassed = forward(model, inputs).to(torch.float64)
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

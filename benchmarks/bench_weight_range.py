"""Weight range by MSE search vs min/max (`graph_passes.quantization.WeightRange`): weight SQNR and time.

    python benchmarks/bench_weight_range.py [--preset pixart-sigma-256] [--layers 2] [--seed 0]
                                            [--md benchmarks/weight_range.md]

Two weight sets, each as ``W^T`` [in, out] float32 (what `quantize_weight` receives):

* ``model``: the linears of the transformer blocks (self- and cross-attention q, k, v, out; FFN up and down) of the
  preset built with seeded random weights and the default ``dit-stats`` init (`models.build`), first --layers
  blocks: 8 x [1152, 1152], 1 x [1152, 4608] and 1 x [4608, 1152] per block at PixArt-Sigma width;
* ``t(4)``: Student-t with 4 degrees of freedom x 0.02 (heavy tails), seeded, at the same three shapes.

For W4 and W3, blocks of 128 rows and per output channel (block = in), symmetric and asymmetric: the mean over the
set's matrices of the weight SQNR ``10 log10(|W|^2 / |W - dequant(quant(W))|^2)`` with min/max and with MSE, the
median chosen clipping ratio, and the wall time of one `quantize_weight` call per shape (min/max -> MSE; the
difference is the search), scales in float32.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
from machine_info import machine

from graph_passes.quantization import QuantConfig, WeightRange, quantize_weight

NOTES_MARKER = "<!-- hand-written notes below; kept when the script rewrites the table above -->"
SHAPES = [(1152, 1152), (1152, 4608), (4608, 1152)]  # W^T [in, out]


def model_weights(preset: str, layers: int, seed: int) -> list[tuple[str, np.ndarray]]:
    import torch

    from models.build import ModelSource, build_transformer

    model = build_transformer(ModelSource(preset=preset, layers=layers, seed=seed))
    out = []
    for name, module in model.named_modules():
        if name.startswith("transformer_blocks.") and isinstance(module, torch.nn.Linear):
            out.append((name, module.weight.detach().numpy().T.astype(np.float32)))
    return out


def heavy_weights(seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"t4-{k}x{n}", (rng.standard_t(4, size=(k, n)) * 0.02).astype(np.float32)) for k, n in SHAPES]


def quantize(w: np.ndarray, config: QuantConfig) -> tuple[float, tuple[float, float], np.ndarray]:
    """(SQNR in dB, (wall, CPU) seconds of the `quantize_weight` call, scales as float64)."""
    wall, cpu = time.perf_counter(), time.process_time()
    qw = quantize_weight(w, config, np.float32)
    seconds = (time.perf_counter() - wall, time.process_time() - cpu)
    w64 = w.astype(np.float64)
    sqnr = float(10 * np.log10((w64**2).sum() / ((qw.dequantize() - w64) ** 2).sum()))
    return sqnr, seconds, qw.scale.astype(np.float64)


def shape_label(w: np.ndarray) -> str:
    return f"{w.shape[0]}x{w.shape[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pixart-sigma-256")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--md", type=Path, default=ROOT / "benchmarks" / "weight_range.md")
    args = parser.parse_args()

    load_before = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    began = time.perf_counter()
    sets = {"model": model_weights(args.preset, args.layers, args.seed), "t(4)": heavy_weights(args.seed)}
    rows = []
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (range, shape) -> (wall, CPU) seconds
    for set_name, mats in sets.items():
        for bits in (4, 3):
            for per_channel in (False, True):
                for symmetric in (True, False):
                    sq: dict[WeightRange, list[float]] = {WeightRange.MINMAX: [], WeightRange.MSE: []}
                    ratios = []
                    for _, w in mats:
                        block = w.shape[0] if per_channel else 128
                        scales = {}
                        for rng, values in sq.items():
                            config = QuantConfig(weight_bits=bits, act_bits=bits, weight_block=block,
                                                 weight_symmetric=symmetric, weight_range=rng)
                            value, seconds, scales[rng] = quantize(w, config)
                            values.append(value)
                            times.setdefault((rng.value, shape_label(w)), []).append(seconds)
                        # the chosen ratio, up to the float32 rounding of the scales (no second search)
                        ratios.append((scales[WeightRange.MSE] / scales[WeightRange.MINMAX]).ravel())
                    mm, mse = statistics.fmean(sq[WeightRange.MINMAX]), statistics.fmean(sq[WeightRange.MSE])
                    rows.append(f"| {set_name} | W{bits} | {'per channel' if per_channel else 'block 128'} | "
                                f"{'sym' if symmetric else 'asym'} | {mm:.2f} | {mse:.2f} | {mse - mm:+.2f} | "
                                f"{np.median(np.concatenate(ratios)):.3f} |")
    total = time.perf_counter() - began
    load_after = " / ".join(f"{v:.1f}" for v in os.getloadavg())

    shapes = [f"{k}x{n}" for k, n in SHAPES]
    time_rows = []
    for shape in shapes:
        mm, mse = times[("minmax", shape)], times[("mse", shape)]
        wall = [statistics.median(t[0] for t in v) for v in (mm, mse)]
        cpu = [statistics.median(t[1] for t in v) for v in (mm, mse)]
        time_rows.append(f"| {shape} | {len(mse)} | {wall[0]:.3f} / {cpu[0]:.3f} | {wall[1]:.3f} / {cpu[1]:.3f} | "
                         f"{wall[1] - wall[0]:.3f} / {cpu[1] - cpu[0]:.3f} |")

    n_model = len(sets["model"])
    lines = [
        "# Weight range: MSE search vs min/max",
        "",
        f"Measured {datetime.date.today().isoformat()} with:",
        "",
        "```",
        f"python benchmarks/bench_weight_range.py --preset {args.preset} --layers {args.layers} --seed {args.seed}",
        "```",
        "",
        f"- Machine: {machine()}; numpy {np.__version__}, one thread (numpy ufuncs)",
        (f"- Load average (1/5/15 min) before: {load_before}, after: {load_after}; the whole run took {total:.0f} s "
         "(model build included)"),
        (f"- `model`: the {n_model} linears of the first {args.layers} transformer blocks of `{args.preset}` (seeded "
         f"random weights, seed {args.seed}, `dit-stats` init); `t(4)`: Student-t(4) x 0.02, seed {args.seed}, "
         f"one matrix per shape {', '.join(shapes)} (`W^T` [in, out])"),
        ("- SQNR: mean over the set's matrices of 10 log10(|W|^2 / |W - W^|^2), dB; scales in float32; median r: "
         "the median chosen clipping ratio over all groups (1 = min/max)"),
        "",
        "| set | bits | groups | range | min/max SQNR | MSE SQNR | gain dB | median r |",
        "|---|---|---|---|---:|---:|---:|---:|",
        *rows,
        "",
        ("Time of one `quantize_weight` call, wall / CPU seconds (median over every configuration above and every "
         "matrix of the shape; MSE - min/max = the search):"),
        "",
        "| W^T shape | MSE calls | min/max s | MSE s | search s |",
        "|---|---:|---:|---:|---:|",
        *time_rows,
    ]
    notes = "\n"
    if args.md.is_file() and NOTES_MARKER in args.md.read_text():
        notes = args.md.read_text().split(NOTES_MARKER, 1)[1]
    args.md.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + notes)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Issue 21 item 4: one table per model of method x weight range x low rank at W4A4 / W4A8 (one call and end of
denoising, SQNR vs FP32 in dB), from the `hn-export compare` runs' results.json and bench_ort_weight_only.py's
ort.json files, old (benchmarks/low-rank/, benchmarks/weight-range-gptq/) and new (benchmarks/weight-grid/):

    python benchmarks/weight-grid/make_table.py          # -> benchmarks/weight-grid/README.md

A cell that several runs measured is taken from the first source listed for its model; the others are checked
against it (the largest difference is printed in the README).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine_info import machine  # noqa: E402

METHODS = ("none", "quarot", "sdcb", "hadanorm")
RANGES = ("minmax", "mse", "gptq")
RANKS = (0, 16, 32)
COLUMNS = (("w4a4", "single_call"), ("w4a4", "end_of_denoising"), ("w4a8", "single_call"),
           ("w4a8", "end_of_denoising"))
COLUMN_NAMES = ("W4A4 one call", "W4A4 end of denoising", "W4A8 one call", "W4A8 end of denoising")

LR = "bash benchmarks/run_low_rank.sh"
WG = "bash benchmarks/run_weight_grid.sh"
MODELS = {
    "pixart": {
        "title": "PixArt-Sigma 256 px, 4 of 28 blocks (`--preset pixart-sigma-256 --layers 4 --seed 0 --init dit-stats`)",
        "setting": "synthetic dit-stats weights (planted channel offsets); calibration 2 seeded trajectories x 20 "
                   "steps (seed 0); evaluation 2 held-out seeded samples (seed 1000): one call, and the end of 20 "
                   "DPM-Solver++ steps",
        "compare": [
            ("a", "benchmarks/low-rank/pixart-sigma-256-4blocks/results.json",
             f"`{LR} pixart`, first compare (hadanorm x w4a4,w4a8 x minmax,gptq x 0,16,32)"),
            ("b", "benchmarks/low-rank/pixart-sigma-256-4blocks-methods/results.json",
             f"`{LR} pixart`, second compare (none,quarot,sdcb x w4a4 x minmax x 0,32)"),
            ("c", "benchmarks/weight-grid/pixart-sigma-256-4blocks-mse/results.json",
             f"`{WG} pixart`, first compare (none,quarot,sdcb,hadanorm x w4a4,w4a8 x mse x 0,32)"),
            ("d", "benchmarks/weight-grid/pixart-sigma-256-4blocks-w4a8/results.json",
             f"`{WG} pixart`, second compare (none,quarot,sdcb x w4a8 x minmax x 0,32)"),
            ("k", "benchmarks/weight-grid/pixart-sigma-256-4blocks-gptq/results.json",
             f"`{WG} pixart-gptq` (none,quarot,sdcb x w4a4,w4a8 x gptq x 0,32)"),
            ("m", "benchmarks/weight-grid/pixart-sigma-256-4blocks-r16/results.json",
             f"`{WG} pixart-r16` (none,quarot,sdcb,hadanorm x w4a4,w4a8 x minmax,mse x 16)"),
            ("n", "benchmarks/weight-grid/pixart-sigma-256-4blocks-gptq-r16/results.json",
             f"`{WG} pixart-gptq-r16` (none,quarot,sdcb x w4a4,w4a8 x gptq x 16)"),
        ],
        "ort": [
            ("e", "benchmarks/weight-grid/pixart-sigma-256-4blocks/ort.json",
             f"`{WG} pixart`: `bench_ort_weight_only.py ... --rows ort-rtn,ort-w8a8`"),
            ("f", "benchmarks/weight-range-gptq/pixart-sigma-256-4blocks/ort.json",
             "`bash benchmarks/run_weight_range_gptq.sh pixart`: `bench_ort_weight_only.py` (rtn, gptq); the same "
             "export command, seed and evaluation"),
        ],
    },
    "shapes": {
        "title": "The trained shapes DiT (6 blocks, 288 wide, 16 x 16 latent; `benchmarks/trained_dit/`)",
        "setting": "`hn-export export --checkpoint /work/scratch/shapes-dit --with-mask`; calibration 64 pairs "
                   "(`benchmarks/trained_dit/make_inputs.py` calib.npz), evaluation its 4 eval.npz captions: one "
                   "call at t = 999, and the end of 20 DPM-Solver++ steps from seeded latents",
        "compare": [
            ("g", "benchmarks/weight-grid/shapes-dit/results.json",
             f"`{WG} shapes`: one compare, none,quarot,sdcb,hadanorm x w4a4,w4a8 x minmax,mse,gptq x 0,16,32"),
            ("h", "benchmarks/low-rank/shapes-dit/results.json",
             f"`{LR} shapes` (hadanorm x w4a4,w4a8 x minmax,gptq x 0,16,32): the same cells as g, checked only"),
        ],
        "ort": [
            ("i", "benchmarks/weight-grid/shapes-dit/ort.json",
             f"`{WG} shapes`: `bench_ort_weight_only.py ... --rows ort-rtn,ort-gptq,ort-w8a8`"),
            ("j", "benchmarks/weight-range-gptq/shapes-dit/ort.json",
             "`bash benchmarks/run_weight_range_gptq.sh shapes`: the same rtn / gptq rows, checked only"),
        ],
    },
}
ORT_ROWS = (("ort-rtn", "onnxruntime `MatMulNBitsQuantizer` W4 RTN (A8 inside)"),
            ("ort-gptq", "onnxruntime `MatMulNBitsQuantizer` W4 GPTQ mode (A8 inside)"),
            ("ort-w8a8", "onnxruntime `quantize_dynamic` W8A8"))
ORT_NOTE = ("onnxruntime rows: `MatMulNBitsQuantizer` 4 bits, block 128, symmetric, accuracy_level 4 (int8 activations "
            "inside `MatMulNBits`), its default round-to-nearest and its GPTQ mode (percdamp 0.01, no act-order, on "
            "the calibration inputs hn-export sees); `quantize_dynamic` MatMul/Gemm, QInt8 weights, uint8 dynamic "
            "activations. They sit in the A8 columns and quantize every MatMul with a constant weight; hn-export's "
            "rows quantize the block linears only.")
META_KEYS = ("steps", "samples", "inputs", "calibration", "seed", "weight_block", "asymmetric_weights", "hadamard")


def load_compare(model: dict):
    """{(method, range, rank, bits, kind): (value, tag)}, the runs' meta, and the largest cross-run difference."""
    cells: dict = {}
    metas = {}
    worst = (0.0, None)
    for tag, path, _ in model["compare"]:
        data = json.loads((ROOT / path).read_text())
        metas[tag] = {k: data["meta"].get(k) for k in META_KEYS}
        for row in data["results"]:
            if row["format"] != "fused" or row["act_granularity"] != "token":
                continue
            if row["bias_correction"] not in (None, "float-token"):
                continue
            bits = row["bits"].split("-")[0]
            for kind in ("single_call", "end_of_denoising"):
                key = (row["method"], row["weight_range"], row["low_rank"], bits, kind)
                value = row[kind]["sqnr_db"]
                if key in cells:
                    diff = abs(cells[key][0] - value)
                    if diff >= worst[0]:
                        worst = (diff, (key, cells[key][1], tag))
                else:
                    cells[key] = (value, tag)
    first = next(iter(metas.values()))
    for tag, meta in metas.items():
        if meta != first:
            raise SystemExit(f"{tag}: evaluation settings differ from the first run's: {meta} vs {first}")
    return cells, first, worst


def load_ort(model: dict):
    rows: dict = {}
    worst = (0.0, None)
    for tag, path, _ in model["ort"]:
        data = json.loads((ROOT / path).read_text())
        for name, row in data["rows"].items():
            for kind, key in (("single_call", "single_call_sqnr_db"), ("end_of_denoising", "end_of_denoising_sqnr_db")):
                if (name, kind) in rows:
                    diff = abs(rows[(name, kind)][0] - row[key])
                    if diff >= worst[0]:
                        worst = (diff, (name, rows[(name, kind)][1], tag))
                else:
                    rows[(name, kind)] = (row[key], tag)
    return rows, worst


def fmt(v: float | None, bold: bool = False) -> str:
    if v is None:
        return ""
    return f"**{v:.2f}**" if bold else f"{v:.2f}"


def model_section(name: str, model: dict) -> tuple[list[str], dict]:
    cells, meta, worst = load_compare(model)
    ort, ort_worst = load_ort(model)
    best = {}
    for bits, kind in COLUMNS:
        vals = [v for (m, r, k, b, c), (v, _) in cells.items() if b == bits and c == kind]
        best[(bits, kind)] = max(vals) if vals else None
    lines = [f"## {model['title']}", "", model["setting"] + ".", "",
             "| method | weight range | rank | " + " | ".join(COLUMN_NAMES) + " | source |",
             "|---|---|---:|" + "---:|" * len(COLUMNS) + "---|"]
    empty = []
    for method in METHODS:
        for wr in RANGES:
            for rank in RANKS:
                got = [cells.get((method, wr, rank, bits, kind)) for bits, kind in COLUMNS]
                if all(g is None for g in got):
                    empty.append(f"{method} {wr} r{rank}")
                tags = []
                for bits in ("w4a4", "w4a8"):
                    ts = sorted({cells[(method, wr, rank, bits, k)][1] for k in ("single_call", "end_of_denoising")
                                 if (method, wr, rank, bits, k) in cells})
                    if ts:
                        tags.append(f"{bits.upper()}: {','.join(ts)}")
                vals = [fmt(g[0] if g else None, bool(g) and g[0] == best[c]) for g, c in zip(got, COLUMNS)]
                lines.append(f"| {method} | {wr} | {rank} | " + " | ".join(vals) + f" | {'; '.join(tags)} |")
    for key, label in ORT_ROWS:
        sc, ed = ort.get((key, "single_call")), ort.get((key, "end_of_denoising"))
        if sc is None:
            continue
        tag = sc[1]
        lines.append(f"| {label} | | | | | {fmt(sc[0])} | {fmt(ed[0])} | {tag} |")
    lines += ["", "Sources:", ""]
    for tag, path, cmd in model["compare"] + model["ort"]:
        lines.append(f"- **{tag}** `{path}`: {cmd}")
    settings = ", ".join(f"{k} " + json.dumps(meta[k]).replace('"', "") for k in META_KEYS)
    lines += ["", f"Every compare run here has the same evaluation settings ({settings}"
              "; `--formats fused`, HadaNorm with float-token bias correction). " + ORT_NOTE +
              " Bold: the best of each column among the hn-export rows."]
    if worst[1] is not None:
        key, t1, t2 = worst[1]
        lines.append(f"Cells measured by more than one run: largest difference {worst[0]:.3f} dB "
                     f"({' '.join(map(str, key))}, {t1} vs {t2}).")
    if ort_worst[1] is not None:
        lines.append(f"onnxruntime rows measured twice: largest difference {ort_worst[0]:.3f} dB "
                     f"({ort_worst[1][0]}, {ort_worst[1][1]} vs {ort_worst[1][2]}).")
    if empty:
        lines.append(f"Rows not measured at all ({len(empty)}): {', '.join(empty)}.")
    return lines, {"cells": cells, "ort": ort}


def best_of(cells, method, bits, kind, ranges=RANGES, ranks=RANKS):
    found = [(v, wr, k) for (m, wr, k, b, c), (v, _) in cells.items()
             if m == method and b == bits and c == kind and wr in ranges and k in ranks]
    return max(found) if found else None


def reading(results: dict) -> list[str]:
    lines = ["## Reading (computed from the tables above)", "",
             "Best weight-side setting per method (weight range, rank), end of denoising / one call, dB:", "",
             "| model | method | W4A4 end of denoising | W4A4 one call | W4A8 end of denoising | W4A8 one call |",
             "|---|---|---|---|---|---|"]
    for name, res in results.items():
        for method in METHODS:
            cols = []
            for bits, kind in (("w4a4", "end_of_denoising"), ("w4a4", "single_call"), ("w4a8", "end_of_denoising"),
                               ("w4a8", "single_call")):
                b = best_of(res["cells"], method, bits, kind)
                base = res["cells"].get((method, "minmax", 0, bits, kind))
                cols.append("" if b is None else f"{b[0]:.2f} ({b[1]} r{b[2]})" +
                            ("" if base is None else f", {b[0] - base[0]:+.2f} vs minmax r0"))
            lines.append(f"| {name} | {method} | " + " | ".join(cols) + " |")
    lines += ["", "Issue 21 targets:", ""]
    for name, res in results.items():
        cells, ort = res["cells"], res["ort"]
        base = cells[("hadanorm", "minmax", 0, "w4a4", "end_of_denoising")][0]
        b = best_of(cells, "hadanorm", "w4a4", "end_of_denoising")
        verdict = "met" if b[0] >= base + 3 else "missed"
        lines.append(f"- {name}, HadaNorm W4A4 end of denoising >= minmax r0 + 3 dB ({base:.2f} + 3 = "
                     f"{base + 3:.2f}): best {b[0]:.2f} ({b[1]} r{b[2]}, {b[0] - base:+.2f} dB): **{verdict}**.")
        w8 = {k: ort.get(("ort-w8a8", k)) for k in ("single_call", "end_of_denoising")}
        if w8["single_call"] is None:
            continue
        for kind, label in (("end_of_denoising", "end of denoising"), ("single_call", "one call")):
            h = best_of(cells, "hadanorm", "w4a8", kind)
            a = max((best_of(cells, m, "w4a8", kind) for m in METHODS), key=lambda x: -1e9 if x is None else x[0])
            who = [m for m in METHODS if best_of(cells, m, "w4a8", kind) == a][0]
            hv = "met" if h[0] >= w8[kind][0] else "missed"
            lines.append(f"- {name}, W4A8 {label} >= onnxruntime `quantize_dynamic` W8A8 ({w8[kind][0]:.2f}): "
                         f"HadaNorm best {h[0]:.2f} ({h[1]} r{h[2]}): **{hv}** ({h[0] - w8[kind][0]:+.2f} dB); "
                         f"best of any method {a[0]:.2f} ({who} {a[1]} r{a[2]}).")
    return lines


CHECK = ("benchmarks/weight-grid/shapes-dit-16samples",
         f"`{WG} shapes16`: hadanorm x w4a4,w4a8 x minmax,mse,gptq x 0,16,32 and `bench_ort_weight_only.py --rows "
         "ort-w8a8`, evaluated on `make_inputs.py --eval-pairs 16` (the same calib.npz; its first 4 pairs are "
         "eval.npz's)")


def check_section(four: dict, four_ort: dict) -> list[str]:
    """The shapes DiT's HadaNorm rows on 16 evaluation pairs next to the 4-pair figures of the main table."""
    folder = ROOT / CHECK[0]
    if not (folder / "results.json").exists():
        return []
    cells, _, _ = load_compare({"compare": [("l", f"{CHECK[0]}/results.json", "")]})
    ort = json.loads((folder / "ort.json").read_text())["rows"]["ort-w8a8"]
    lines = ["## The shapes DiT on 16 evaluation pairs (noise check of its end-of-denoising figures)", "",
             f"Source **l** `{CHECK[0]}/results.json` and `ort.json`: {CHECK[1]}. End of denoising: 4 pairs (the "
             "main table, source g) -> 16 pairs; one call on the 16 pairs.", "",
             "| method | weight range | rank | W4A4 one call (16) | W4A4 end of denoising, 4 -> 16 | "
             "W4A8 one call (16) | W4A8 end of denoising, 4 -> 16 |", "|---|---|---:|---:|---:|---:|---:|"]
    for wr in RANGES:
        for rank in RANKS:
            row = []
            for bits in ("w4a4", "w4a8"):
                one = cells[("hadanorm", wr, rank, bits, "single_call")][0]
                end = cells[("hadanorm", wr, rank, bits, "end_of_denoising")][0]
                end4 = four[("hadanorm", wr, rank, bits, "end_of_denoising")][0]
                row += [f"{one:.2f}", f"{end4:.2f} -> {end:.2f}"]
            lines.append(f"| hadanorm | {wr} | {rank} | " + " | ".join(row) + " |")
    lines.append(f"| onnxruntime `quantize_dynamic` W8A8 | | | | | {ort['single_call_sqnr_db']:.2f} | "
                 f"{four_ort[('ort-w8a8', 'end_of_denoising')][0]:.2f} -> {ort['end_of_denoising_sqnr_db']:.2f} |")
    base = cells[("hadanorm", "minmax", 0, "w4a4", "end_of_denoising")][0]
    b = best_of(cells, "hadanorm", "w4a4", "end_of_denoising")
    lines += ["", f"On 16 pairs: HadaNorm W4A4 end of denoising minmax r0 {base:.2f}, best {b[0]:.2f} ({b[1]} r{b[2]}, "
              f"{b[0] - base:+.2f} dB: target +3 dB **{'met' if b[0] >= base + 3 else 'missed'}**)."]
    for kind, label in (("end_of_denoising", "end of denoising"), ("single_call", "one call")):
        h = best_of(cells, "hadanorm", "w4a8", kind)
        w8 = ort["end_of_denoising_sqnr_db" if kind == "end_of_denoising" else "single_call_sqnr_db"]
        lines.append(f"On 16 pairs: HadaNorm W4A8 best {label} {h[0]:.2f} ({h[1]} r{h[2]}) vs onnxruntime W8A8 "
                     f"{w8:.2f}: **{'met' if h[0] >= w8 else 'missed'}** ({h[0] - w8:+.2f} dB).")
    return lines


def main() -> None:
    import numpy
    import onnxruntime

    out = [
        "# Weight side at W4A4 / W4A8: method x weight range x low rank (issue 21 item 4)",
        "",
        "`hn-export compare --formats fused`, one-call and end-of-denoising SQNR vs the FP32 graph (dB), next to "
        "onnxruntime's `MatMulNBitsQuantizer` (RTN and GPTQ mode, block 128) and `quantize_dynamic` W8A8 on the same "
        "graph, evaluated by the same code (`benchmarks/bench_ort_weight_only.py`, `EvaluationInputs` of "
        "`hn_export.compare`). Blank: not measured. Table written by `python benchmarks/weight-grid/make_table.py` "
        "from the results.json / ort.json files named per cell.",
        "",
        f"Machine: {machine()} (a 2-core Sapphire Rapids class Xeon with AMX); onnxruntime {onnxruntime.__version__}, "
        f"numpy {numpy.__version__}. Measured 2026-12-06 (the `low-rank/` and `weight-range-gptq/` runs earlier the "
        "same day, same machine). SQNR only: it does not depend on the machine's load; no times are claimed.",
        "",
        "```bash",
        "bash benchmarks/run_weight_grid.sh shapes /work/scratch/shapes-dit   # -> weight-grid/shapes-dit/",
        "bash benchmarks/run_weight_grid.sh pixart                            # -> weight-grid/pixart-sigma-256-4blocks{,-mse,-w4a8}/",
        "bash benchmarks/run_weight_grid.sh shapes16 /work/scratch/shapes-dit # -> weight-grid/shapes-dit-16samples/",
        "bash benchmarks/run_weight_grid.sh pixart-gptq                       # -> weight-grid/pixart-sigma-256-4blocks-gptq/",
        "bash benchmarks/run_weight_grid.sh pixart-gptq-r16                   # -> weight-grid/pixart-sigma-256-4blocks-gptq-r16/",
        "python benchmarks/weight-grid/make_table.py                          # -> weight-grid/README.md",
        "```",
        "",
    ]
    results = {}
    for name, model in MODELS.items():
        lines, res = model_section(name, model)
        out += lines + [""]
        results[name] = res
    out += reading(results) + [""]
    check = check_section(results["shapes"]["cells"], results["shapes"]["ort"])
    if check:
        out += check + [""]
    notes = ROOT / "benchmarks/weight-grid/notes.md"  # the written reading, kept apart from the generated part
    if notes.exists():
        out += [notes.read_text().rstrip(), ""]
    (ROOT / "benchmarks/weight-grid/README.md").write_text("\n".join(out))
    print("wrote benchmarks/weight-grid/README.md")


if __name__ == "__main__":
    main()

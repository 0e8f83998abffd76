"""Side-by-side table of `benchmarks/hqdm-methods/*/results.json` (written by `run_hqdm_methods.sh`).

Usage: python benchmarks/hqdm_table.py [RESULT_DIR ...]  (default: every folder under benchmarks/hqdm-methods/)
Prints one markdown row per method x activation granularity: W4A4 / W4A3 end-of-denoising SQNR (dB) per model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(folders: list[Path]) -> str:
    columns, cells, rows = [], {}, []
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())["results"]
        columns.append(folder.name)
        for r in results:
            key = (r["method"], r.get("act_granularity", "token"))
            if key not in rows:
                rows.append(key)
            cells[(key, folder.name, r["bits"])] = r["end_of_denoising"]["sqnr_db"]
    lines = ["| method | activations | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for key in rows:
        method, granularity = key
        act = "per token, dynamic" if granularity == "token" else "static, per timestep"
        values = []
        for column in columns:
            pair = [cells.get((key, column, bits)) for bits in ("w4a4", "w4a3")]
            values.append(" / ".join("-" if v is None else f"{v:.2f}" for v in pair))
        lines.append(f"| {method} | {act} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]] or sorted(p.parent for p in Path("benchmarks/hqdm-methods").glob("*/results.json"))
    print(table(args), end="")

"""Round-by-round ratios of a `benchmarks/bench_peers.py` run: how steady an hn-export graph's lead over the peers is.

    python benchmarks/peer_ratios.py benchmarks/peers/RUN.json [RUN2.json ...]

For each hn-export graph of the run: the ratio of medians (the faster peer's median time over the graph's, as the
run's table gives it) and, round by round, the faster peer's time in that round over the graph's time in the same
round (the rounds are interleaved, so each round's graphs ran minutes apart at most), as the median and the 10th-90th
percentiles of those per-round ratios. Peers: OpenVINO and onnxruntime's W8A8, those of the run that were timed.
A split graph (`hn-export split-prompt`): the mean step of the run's generation, (first call + (steps - 1) x step) /
steps, the first call and the step of the same round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PEERS = ("openvino", "ort-w8a8")


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def ratios(run: dict) -> list[str]:
    graphs = run["graphs"]
    peers = [name for name in PEERS if name in graphs]
    if not peers:
        fail("the run timed no peer (openvino, ort-w8a8); run bench_peers.py with them in --graphs")
    fastest = np.min(np.array([graphs[name]["times_ms"] for name in peers], dtype=np.float64), axis=0)
    fastest_median = min(graphs[name]["median_ms"] for name in peers)
    lines = []
    for name, g in graphs.items():
        if not name.startswith("hn-"):
            continue
        times = np.asarray(g["times_ms"], dtype=np.float64)
        what, median = "", g["median_ms"]
        if g.get("split"):  # a split graph: the mean step of a generation, round by round (first call + steps)
            steps = g["generation_steps"]
            times = (np.asarray(g["first_times_ms"], dtype=np.float64) + (steps - 1) * times) / steps
            what, median = f" a step of a {steps}-step generation", g["generation_step_ms"]
        per_round = fastest / times
        lines.append(f"  {name}: {median:.1f} ms{what}, ratio of medians {fastest_median / median:.2f}x, "
                     f"per round {np.median(per_round):.2f}x (10-90%: {np.percentile(per_round, 10):.2f}-"
                     f"{np.percentile(per_round, 90):.2f}x, {len(per_round)} rounds)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench_peers.py --out files (.json)")
    args = parser.parse_args()
    for path in args.runs:
        if not path.is_file():
            fail(f"{path} does not exist; pass the .json that bench_peers.py --out wrote")
        try:
            run = json.loads(path.read_text())
            run["graphs"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            fail(f"{path} is not a bench_peers.py result ({type(exc).__name__}); pass the .json that its --out wrote")
        peers = ", ".join(f"{name} {run['graphs'][name]['median_ms']:.1f} ms" for name in PEERS
                          if name in run["graphs"])
        print(f"{path}: {peers}")
        for line in ratios(run):
            print(line)


if __name__ == "__main__":
    main()

"""Wall time of one denoiser call for several graphs, timed in turn (interleaved) so background load hits all alike."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from hn_export.denoise import DenoiseConfig, ModelSignature, first_call_feeds
from hn_export.model_files import load_model
from runtime.denoiser import Denoiser


def median_call_ms(graphs: dict[str, Path], runs: int = 3, threads: int | None = None) -> dict[str, tuple[float, str]]:
    """``name -> (median ms of one call, implementation)``; one warm-up call each, then `runs` interleaved rounds.
    Thread spinning is off so that an idle session does not steal the cores of the one being timed."""
    dens = {name: Denoiser(path, threads=threads, spinning=False) for name, path in graphs.items()}
    feeds = {}
    for name, path in graphs.items():
        sig = ModelSignature.of(load_model(path))
        feeds[name] = first_call_feeds(sig, DenoiseConfig(seed=0), 0)
        dens[name](feeds[name])
    times: dict[str, list[float]] = {name: [] for name in dens}
    for _ in range(runs):
        for name, den in dens.items():
            start = time.perf_counter()
            den(feeds[name])
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t) * 1000, dens[name].implementation) for name, t in times.items()}


__all__ = ["median_call_ms"]

"""Time and memory per pipeline stage (``hn-run --verbose``): wall seconds and the process's peak RSS during the
stage. On Linux the peak is reset at the start of each stage (``/proc/self/clear_refs`` 5, Linux 4.0+), so each
stage reports its own peak; elsewhere (or where that write is refused) the peak is the process's so far."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator

try:
    import resource
except ImportError:  # Windows
    resource = None


@dataclasses.dataclass(frozen=True)
class StageStat:
    name: str
    seconds: float
    peak_rss_bytes: int | None
    peak_is_per_stage: bool  # False: the process's peak so far (the reset was not available)

    def describe(self) -> str:
        peak = "n/a" if self.peak_rss_bytes is None else f"{self.peak_rss_bytes / 2**20:.0f} MiB"
        scope = "" if self.peak_is_per_stage else " (process so far)"
        return f"{self.name}: {self.seconds:.2f} s, peak RSS {peak}{scope}"


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class StageTimer:
    def __init__(self) -> None:
        self.stages: list[StageStat] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        per_stage = _reset_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages.append(StageStat(name, time.perf_counter() - start, _peak_rss(), per_stage))

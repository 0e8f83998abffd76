"""Which instruction-set path the built hadanorm kernel library runs on this CPU (for reports)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from runtime.kernels import selected_isa


@functools.lru_cache(maxsize=8)
def _isa(path: str, override: str) -> str:
    return selected_isa(path) or "unknown ISA"


def library_isa(path: str | os.PathLike | None) -> str:
    """``HadanormKernelsIsa()`` of the library at `path` (honours ``HADANORM_KERNELS_ISA``), or 'unknown ISA'."""
    if path is None:
        return "no library"
    return _isa(os.fspath(Path(path).resolve()), os.environ.get("HADANORM_KERNELS_ISA", ""))

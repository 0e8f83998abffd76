"""Which instruction-set path the built hadanorm kernel library runs on this CPU (for reports)."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path


@functools.lru_cache(maxsize=8)
def _isa(path: str, override: str) -> str:
    try:
        function = ctypes.CDLL(path).HadanormKernelsIsa
    except (OSError, AttributeError):
        return "unknown ISA"
    function.restype = ctypes.c_char_p
    return function().decode()


def library_isa(path: str | os.PathLike | None) -> str:
    """``HadanormKernelsIsa()`` of the library at `path` (honours ``HADANORM_KERNELS_ISA``), or 'unknown ISA'."""
    if path is None:
        return "no library"
    return _isa(os.fspath(Path(path).resolve()), os.environ.get("HADANORM_KERNELS_ISA", ""))

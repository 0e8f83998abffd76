"""Which instruction-set path the built hadanorm kernel library runs on this CPU (for reports): the integer ops'
path, and the fused attention's at a precision."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from runtime.kernels import attention_path, selected_isa


@functools.lru_cache(maxsize=8)
def _isa(path: str, override: str) -> str:
    return selected_isa(path) or "unknown ISA"


def library_isa(path: str | os.PathLike | None) -> str:
    """``HadanormKernelsIsa()`` of the library at `path` (honours ``HADANORM_KERNELS_ISA``), or 'unknown ISA'."""
    if path is None:
        return "no library"
    return _isa(os.fspath(Path(path).resolve()), os.environ.get("HADANORM_KERNELS_ISA", ""))


@functools.lru_cache(maxsize=8)
def _attention(path: str, precision: str, override: str) -> str:
    return attention_path(path, precision) or "unknown path"


def library_attention_path(path: str | os.PathLike | None, precision: str) -> str:
    """The path ``hadanorm::Attention`` runs at `precision` with the library at `path`, or 'no library'."""
    if path is None:
        return "no library"
    return _attention(os.fspath(Path(path).resolve()), precision, os.environ.get("HADANORM_KERNELS_ISA", ""))

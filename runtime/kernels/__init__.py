"""Optional C++ onnxruntime kernels for the ``hadanorm`` ops (stdlib only: importing this never needs a compiler).

Build once with ``python -m runtime.kernels.build``; then ``register_kernels(session_options)`` makes every
``hadanorm`` node of a session run the compiled kernel instead of its ONNX function body (onnxruntime picks a
registered custom-op kernel over a model-local function of the same domain and name).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from runtime.domain import HADANORM_DOMAIN

KERNEL_DOMAIN = HADANORM_DOMAIN
LIBRARY_NAME = "libhadanorm_kernels.so"
BUILD_DIR = Path(__file__).resolve().parent / "build"
REBUILD_HINT = "rebuild it with `python -m runtime.kernels.build --force`"

__all__ = [
    "KERNEL_DOMAIN",
    "KernelLibraryError",
    "check_selected_isa",
    "selected_isa",
    "library_path",
    "load_error_message",
    "register_kernels",
]


class KernelLibraryError(RuntimeError):
    """The kernel library is missing or onnxruntime refused it; the message is one line naming the fix."""


def library_path() -> Path | None:
    """The built kernel library (``runtime/kernels/build/libhadanorm_kernels.so``), or None if not built."""
    path = BUILD_DIR / LIBRARY_NAME
    return path if path.is_file() else None


def load_error_message(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """One line saying why onnxruntime could not register the kernel library at `path`, and what to do."""
    text = " ".join(str(exc).split())
    where = f" {os.fspath(path)}" if path is not None else ""
    if "hadanorm kernel library needs onnxruntime C API" in text:
        start = text.index("hadanorm kernel library needs")
        return text[start:]
    lowered = text.lower()
    if "no such file" in lowered or "cannot open shared object" in lowered:
        return f"hadanorm kernel library{where} not found; build it with `python -m runtime.kernels.build`"
    for marker in ("invalid elf header", "file too short", "wrong elf class", "not a dynamic executable"):
        if marker in lowered:
            return f"hadanorm kernel library{where} is not a loadable shared library ({marker}); {REBUILD_HINT}"
    if "undefined symbol" in lowered or "registercustomops" in lowered:
        return (f"hadanorm kernel library{where} does not match this onnxruntime ({_first_clause(text)}); "
                f"{REBUILD_HINT}")
    return f"hadanorm kernel library{where} could not be registered ({_first_clause(text)}); {REBUILD_HINT}"


def _first_clause(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def register_kernels(options, path: str | os.PathLike | None = None) -> Path:
    """Register the kernel library with an ``onnxruntime.SessionOptions``; returns the library path.

    Raises KernelLibraryError (a one-line message with the fix) when the library is missing or refused.
    """
    lib = Path(path) if path is not None else library_path()
    if lib is None:
        raise KernelLibraryError(
            f"hadanorm kernel library not built ({BUILD_DIR / LIBRARY_NAME}); "
            "build it with `python -m runtime.kernels.build`"
        )
    check_selected_isa(lib)
    try:
        options.register_custom_ops_library(os.fspath(lib))
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, RuntimeException, ...)
        raise KernelLibraryError(load_error_message(exc, lib)) from exc
    return lib


ISA_VARIABLE = "HADANORM_KERNELS_ISA"


def selected_isa(path: str | os.PathLike) -> str | None:
    """``HadanormKernelsIsa()`` of the library at `path`: the kernel path it would run now (honouring
    ``HADANORM_KERNELS_ISA``) or ``"error: <why>"``; None when the library cannot be loaded or is too old."""
    try:
        function = ctypes.CDLL(os.fspath(path)).HadanormKernelsIsa
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_char_p
    return (function() or b"").decode(errors="replace")


def attention_path(path: str | os.PathLike, precision: str) -> str | None:
    """``HadanormAttentionPath(precision)`` of the library at `path`: the path ``hadanorm::Attention`` would run at
    that precision (``amx``, ``avx512``, ``scalar``; for ``fast`` also what it computes there, ``amx (bf16)``,
    ``avx512 (int8)``) or ``"error: <why>"``; None when the library cannot be loaded or
    has no fused attention."""
    try:
        function = ctypes.CDLL(os.fspath(path)).HadanormAttentionPath
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_char_p
    function.argtypes = [ctypes.c_char_p]
    return (function(precision.encode()) or b"").decode(errors="replace")


def check_selected_isa(path: str | os.PathLike) -> None:
    """With ``HADANORM_KERNELS_ISA`` set: raise KernelLibraryError with the library's own one-line reason when the
    variable names no kernel path, or one this CPU or build lacks (the kernels would otherwise fail only when a
    session creates them, under an unrelated message). Unset: nothing to check."""
    if not os.environ.get(ISA_VARIABLE):
        return
    text = selected_isa(path)
    if text is not None and text.startswith("error: "):  # None: not loadable or too old, registration says why
        raise KernelLibraryError(" ".join(text[len("error: "):].split()))

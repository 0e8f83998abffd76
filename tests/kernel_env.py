"""The kernel library's instruction-set override for a block of test code, and sessions made under it.

The library reads ``HADANORM_KERNELS_ISA`` when a kernel is created (a session is made), so a session keeps the path
it was made with after the block. Every op takes every CPU-dependent function from the path's table
(runtime/kernels/int_kernels.h, IsaKernels), so a session made under ``kernel_isa(name)`` runs that path throughout.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort

from runtime.kernels import register_kernels

ISA_VARIABLE = "HADANORM_KERNELS_ISA"
ALL_ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni", "amx", "neondot")
# The paths whose transform multiplies by a dense h_left with fused multiply-adds (AVX-512, for widths M that are a
# multiple of 16): within float32 rounding of the scalar loops (multiply, then add), not bit-identical. Every other
# table entry of every path gives the scalar path's bits.
FMA_DENSE_LEFT_ISAS = ("avx512vnni", "amx")


def library_isa(library: Path) -> str:
    """``HadanormKernelsIsa()``: the path a kernel made now would run (honours ``HADANORM_KERNELS_ISA``)."""
    function = ctypes.CDLL(str(library)).HadanormKernelsIsa
    function.restype = ctypes.c_char_p
    return function().decode()


def supported_isas(library: Path) -> list[str]:
    """The paths this CPU (and this build) supports, in ALL_ISAS order: scalar first."""
    found = []
    for name in ALL_ISAS:
        with kernel_isa(name):
            if library_isa(library) == name:
                found.append(name)
    assert found[0] == "scalar"
    return found


@contextlib.contextmanager
def kernel_isa(isa: str | None) -> Iterator[None]:
    """``HADANORM_KERNELS_ISA=isa`` inside the block (None: as it is), restored after."""
    saved = os.environ.get(ISA_VARIABLE)
    if isa is not None:
        os.environ[ISA_VARIABLE] = isa
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ISA_VARIABLE, None)
        else:
            os.environ[ISA_VARIABLE] = saved


def kernel_session(model: bytes | str | Path, library: Path | None, isa: str | None = None) -> ort.InferenceSession:
    """A 2-thread CPU session of `model` with the kernel library (None: function bodies) on path `isa`."""
    with kernel_isa(isa):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        if library is not None:
            register_kernels(options, library)
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                    providers=["CPUExecutionProvider"])

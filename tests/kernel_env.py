"""The kernel library's instruction-set override for a block of test code, and sessions made under it.

The library reads ``HADANORM_KERNELS_ISA`` when a kernel is created (a session is made), so a session keeps the path
it was made with after the block.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort

from runtime.kernels import register_kernels

ISA_VARIABLE = "HADANORM_KERNELS_ISA"
ALL_ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni", "amx", "neondot")


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

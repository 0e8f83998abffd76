"""onnxruntime sessions whose numbers match the graph as written.

onnxruntime's default optimizations fuse ``DequantizeLinear + MatMul`` into ``com.microsoft::MatMulNBits`` with
accuracy level 4, which quantizes a float activation to int8 on the fly. Measured on a 1152x1152 int4 weight
(256 tokens, onnxruntime 1.31 CPU): max abs error vs float64 maths 0.098 with the default, 2.0e-5 with accuracy
level 1 (fp32 compute), 5.3e-6 with QDQ fusions disabled. With per-token activation QDQ in front (our site MatMuls)
the default already kept the numbers; the float mean-token MatMul of ``float-token`` bias correction is the case
the default changes.

* `NumericsMode.AS_WRITTEN` (default everywhere in hn-export): ``session.disable_quant_qdq = 1``: every Q/DQ node
  runs as written. The only mode that runs every bit width: for 5-8-bit activations (uint8 containers) the default
  QDQ fusion builds ``MatMulIntegerToFloat``, which refuses per-token zero points ("input a zero point must be a
  scalar") and the session fails at run time.
* `NumericsMode.FP32`: ``session.qdq_matmulnbits_accuracy_level = 1``: ``MatMulNBits`` computing in fp32. An
  isolated 1024 x 1152 int4 MatMul ran faster (56 ms vs 86 ms), but the whole 4-block PixArt graph ran 39% slower
  than as written (benchmarks/runtime_latency.md). Up to 4 bits only.
* `NumericsMode.FAST`: onnxruntime's defaults (int8 activations inside MatMulNBits): opt-in, different numbers
  (33.6 dB vs as written after one call of the 4-block model), and 48% slower there too.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence

import onnxruntime as ort


class NumericsMode(enum.Enum):
    AS_WRITTEN = "as-written"
    FP32 = "fp32"
    FAST = "fast"

    @property
    def session_config(self) -> dict[str, str]:
        return _SESSION_CONFIG[self]


_SESSION_CONFIG: dict[NumericsMode, dict[str, str]] = {
    NumericsMode.FP32: {"session.qdq_matmulnbits_accuracy_level": "1"},
    NumericsMode.AS_WRITTEN: {"session.disable_quant_qdq": "1"},
    NumericsMode.FAST: {},
}


def session_options(mode: NumericsMode = NumericsMode.AS_WRITTEN, threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in mode.session_config.items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    return options


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def create_session(
    model: str | os.PathLike | bytes,
    mode: NumericsMode = NumericsMode.AS_WRITTEN,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> ort.InferenceSession:
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, session_options(mode, threads), providers=list(providers or ["CPUExecutionProvider"]))

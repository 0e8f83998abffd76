"""The one place that creates onnxruntime sessions in hn-export (`create_session`), and what runs in them.

Session options (`NumericsMode`):

* `NumericsMode.AS_WRITTEN` (default everywhere): ``session.disable_quant_qdq = 1``: every Q/DQ node runs as
  written. onnxruntime's default QDQ fusions change a ``qdq`` graph's numbers (DequantizeLinear + MatMul on a float
  activation becomes ``MatMulNBits`` with int8 activations inside; `tests/test_session_options.py` measures the
  gap) or fail (5-8-bit activations become ``MatMulIntegerToFloat``, which refuses per-token zero points). The
  price: constant folding turns every weight DequantizeLinear of a ``qdq`` graph into a float32 initializer, so a
  ``qdq`` graph holds float weights in memory and runs float MatMuls. The ``nbits`` and ``fused`` formats carry no
  weight DequantizeLinear (their weights stay packed 4-bit data: ``tests/test_int_formats.py`` checks
  onnxruntime's optimized model), so this option costs them nothing.
* `NumericsMode.FP32`: ``session.qdq_matmulnbits_accuracy_level = 1`` (MatMulNBits computing in fp32), and
  `NumericsMode.FAST`: onnxruntime's defaults; both opt-in, for ``qdq`` graphs only
  (`benchmarks/bench_runtime_latency.py` measures them).

onnxruntime's `SkipLayerNormFusion` is turned off in every session (`DISABLED_OPTIMIZERS`): its CPU
``SkipLayerNormalization`` kernel ran 2.5-3.5x slower than the ``Add`` + ``LayerNormalization`` it replaces
(PixArt-Sigma's final residual + ``norm_out``: [2, 256, 1152] 1.96 -> 0.57 ms, [2, 4096, 1152] 47.5 -> 16.7 ms,
medians of interleaved runs, 2 threads, `python benchmarks/bench_skip_layer_norm.py [--tokens 4096 --runs 30]`; the
same sums within float rounding: 3.6e-6 max abs).

`implementation` says which code runs a graph's quantized linears and hadanorm ops, so that a reported number
can be tied to what produced it: ``fused: kernels (avx512vnni)``, ``fused: function bodies``,
``nbits: MatMulNBits, transforms: kernels``, ``qdq: as written, transforms: function bodies``, ``float``.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from runtime.domain import ATTENTION_KEY, FORMAT_KEY, TRANSFORM_OPS_KEY
from runtime.kernel_isa import library_attention_path, library_isa
from runtime.kernels import library_path, register_kernels


# onnxruntime graph optimizers every session turns off (module docstring)
DISABLED_OPTIMIZERS: tuple[str, ...] = ("SkipLayerNormFusion",)


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


def session_options(mode: NumericsMode = NumericsMode.AS_WRITTEN, threads: int | None = None,
                    spinning: bool = True, cpu_arena: bool = True, priority_order: bool = False) -> ort.SessionOptions:
    """`spinning=False`: onnxruntime's intra-op threads sleep after a run instead of spinning (several sessions
    timed in turn in one process would otherwise steal each other's cores). `cpu_arena=False`: no onnxruntime CPU
    memory arena (tensors from malloc): a run's peak memory stays the same call after call, where the arena grows
    with fragmentation (28-block 1024 px fused graph: 1.34 GB steady against 2.04 GB from the second call, the same
    speed; benchmarks/peers/README.md). `priority_order=True`: onnxruntime's priority-based execution order, which
    runs a branch that only feeds a graph output (calibration's per-site reductions) as soon as its input is ready;
    the default order left them to the end, every site's activation alive until then (28-block 1024 px calibration:
    4.7 GB instead of 22.7 GB peak). The same kernels and results either way."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors are raised as exceptions and reported in one line: not logged too
    for key, value in mode.session_config.items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not cpu_arena:
        options.enable_cpu_mem_arena = False
    if priority_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return options


def resolve_library(kernel_library: bool | str | os.PathLike | None) -> Path | None:
    """True: the built library if any; False/None: none; a path: that library."""
    if kernel_library is True:
        return library_path()
    return Path(kernel_library) if kernel_library else None


def create_session(
    model: str | os.PathLike | bytes,
    mode: NumericsMode = NumericsMode.AS_WRITTEN,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    *,
    kernel_library: bool | str | os.PathLike | None = False,
    external_data_folder: str | os.PathLike | None = None,
    optimized_model_path: str | os.PathLike | None = None,
    profile_prefix: str | None = None,
    spinning: bool = True,
    cpu_arena: bool = True,
    priority_order: bool = False,
    disabled_optimizers: Sequence[str] = DISABLED_OPTIMIZERS,
) -> ort.InferenceSession:
    """A session for a model file or serialized bytes.

    `kernel_library`: register the hadanorm kernel library (True: the built one, if any). Raises
    `runtime.kernels.KernelLibraryError` (one line with the fix) when a named library cannot be registered.
    `external_data_folder`: where the weights of a model passed as bytes live. `optimized_model_path`: write
    onnxruntime's optimized graph there (what it holds in memory). `profile_prefix`: enable onnxruntime's profiler.
    `disabled_optimizers`: onnxruntime graph optimizers to turn off (default: `DISABLED_OPTIMIZERS`; () for
    onnxruntime's own defaults, as the peer benchmarks run them).
    """
    options = session_options(mode, threads, spinning, cpu_arena, priority_order)
    library = resolve_library(kernel_library)
    if library is not None:
        register_kernels(options, library)
    if external_data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         os.fspath(external_data_folder))
    if optimized_model_path is not None:
        options.optimized_model_filepath = os.fspath(optimized_model_path)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=list(providers or ["CPUExecutionProvider"]),
                                disabled_optimizers=list(disabled_optimizers))


def implementation(metadata: dict[str, str], kernel_library: Path | None) -> str:
    """Which code runs a graph's quantized linears and hadanorm ops (from hn-export's model metadata)."""
    fmt = metadata.get(FORMAT_KEY, "")
    transforms = [op for op in metadata.get(TRANSFORM_OPS_KEY, "").split(",") if op and op != "Attention"]
    kernels = f"kernels ({library_isa(kernel_library)})" if kernel_library is not None else "function bodies"
    attention = "".join(
        f", attention: hadanorm::Attention {p}, " + (f"kernels ({library_attention_path(kernel_library, p)})"
                                                     if kernel_library is not None else "function bodies")
        for p in metadata.get(ATTENTION_KEY, "none").split(",") if p in ("float", "bf16", "int8", "fast"))
    if fmt == "fused":
        return f"fused: {kernels}{attention}"
    if not fmt and not transforms:
        return f"float{attention}"
    head = {"nbits": "nbits: MatMulNBits", "qdq": "qdq: as written", "float": "float"}.get(fmt, fmt or "qdq")
    return (f"{head}, transforms: {kernels}" if transforms else head) + attention

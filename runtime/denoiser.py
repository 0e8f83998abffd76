"""One denoiser call on the device (any model family): load a graph, pick a provider, check inputs, run.

`Denoiser` wraps an onnxruntime session:
* loads the graph (external data included: onnxruntime resolves ``model.onnx.data`` beside the file);
* registers the hadanorm kernel library when one is built (`runtime.kernels.library_path()`) and says which
  implementation of the hadanorm ops is active: ``kernels`` or ``function bodies`` (or ``none`` for graphs without
  hadanorm ops). onnxruntime runs a registered custom-op kernel in place of a model-local function of the same
  domain and name (verified in tests/test_kernels.py with a call log); the kernels are float32 and CPU-only;
* picks the execution provider: the one asked for, else the first available of CUDA, QNN, CoreML, CPU;
* sets the session options of `runtime.session` so DequantizeLinear+MatMul fusions do not change the numbers;
* checks feeds (names, ranks, static dims, dtypes, equal batch, caption length) before onnxruntime sees them. The
  batched inputs are those whose first axis has the same symbolic name as ``hidden_states``' (or the first input's);
  inputs with a static first axis (e.g. Flux's position ids) are checked against their static shape only;
* runs a split graph (`hn-export split-prompt`: a step graph whose metadata names its prompt graph, beside it) as the
  whole graph it came from: it takes the same feeds, runs the prompt graph only when the per-prompt feeds (the
  caption embedding, ...) differ from those of one of the last `PROMPT_CACHE_SIZE` prompts (bitwise), and the step
  graph with the values the prompt graph handed over. A denoising loop pays the prompt part once per prompt instead
  of once per step; every call computes the whole graph's ops (fused graphs: the same bits; onnxruntime may fuse
  float ops differently at the cut). The pair must come from one split: the same split id in both files' metadata,
  the values handed over those the step graph names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.domain import CARRIED_KEY, HADANORM_DOMAIN, PROMPT_GRAPH_KEY, SPLIT_ID_KEY, TRANSFORM_OPS_KEY
from runtime.errors import RuntimeInputError
from runtime.kernels import KernelLibraryError
from runtime.session import NumericsMode, create_session, implementation, resolve_library

logger = logging.getLogger(__name__)

PROVIDER_PREFERENCE: tuple[str, ...] = (
    "CUDAExecutionProvider",
    "QNNExecutionProvider",
    "CoreMLExecutionProvider",
    "CPUExecutionProvider",
)

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def choose_providers(provider: str | None = None) -> list[str]:
    available = ort.get_available_providers()
    if provider is not None:
        name = provider if provider.endswith("ExecutionProvider") else f"{provider}ExecutionProvider"
        matches = [p for p in available if p.lower() == name.lower()]
        if not matches:
            raise RuntimeInputError(
                f"execution provider {provider!r} is not available in this onnxruntime; "
                f"available: {', '.join(available)}"
            )
        return [matches[0]] + (["CPUExecutionProvider"] if matches[0] != "CPUExecutionProvider" else [])
    ordered = [p for p in PROVIDER_PREFERENCE if p in available]
    return ordered or ["CPUExecutionProvider"]


class Denoiser:
    """A loaded denoiser graph. Call it with feeds (numpy arrays) to get ``sample``."""

    def __init__(
        self,
        path: str | os.PathLike,
        provider: str | None = None,
        mode: NumericsMode = NumericsMode.AS_WRITTEN,
        threads: int | None = None,
        kernel_library: str | os.PathLike | None | bool = True,
        profile_prefix: str | None = None,
        spinning: bool = True,
        cpu_arena: bool = True,
        shrink_arena: bool = False,
    ):
        """`kernel_library`: True = the built library if any, False/None = function bodies only, or a path.
        `cpu_arena=False`: no onnxruntime memory arena (`runtime.session.session_options`; large resolutions).
        `shrink_arena=True`: onnxruntime returns its CPU arena's memory after every call (run option
        memory.enable_memory_arena_shrinkage), so every call peaks as the first one does, where a kept arena grows on
        the next calls (PixArt-Sigma's 28 blocks at 1024 px: 1068 MB the first call, 1620 MB from the second; shrunk,
        1075 MB at the same speed: benchmarks/peers/pixart-sigma-1024-28blocks-memory-onepass.txt)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise RuntimeInputError(f"model file {self.path} does not exist; check the path")
        self.kernel_library = resolve_library(kernel_library)
        self.providers = choose_providers(provider)
        try:
            self.session = create_session(self.path, mode, self.providers, threads,
                                          kernel_library=self.kernel_library, profile_prefix=profile_prefix,
                                          spinning=spinning, cpu_arena=cpu_arena)
        except KernelLibraryError as exc:
            raise RuntimeInputError(f"{exc} (or run without kernels)") from None
        except Exception as exc:  # onnxruntime raises several pybind types
            message = explain_run_error(str(exc), self.path) or self._explain_load_error(str(exc))
            raise RuntimeInputError(message) from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.transform_ops = [op for op in self.metadata.get(TRANSFORM_OPS_KEY, "").split(",") if op]
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.prompt_session = None  # the prompt graph of a split graph (module docstring)
        self.prompt_runs = 0  # how often the prompt graph ran (a split graph's cache misses)
        # (the caller's prompt key or None, a copy of the prompt feeds (None with a key), the carried values)
        self._prompt_cache: list[tuple[Hashable | None, dict[str, np.ndarray] | None, dict[str, np.ndarray]]] = []
        if self.metadata.get(PROMPT_GRAPH_KEY):
            self._load_prompt_graph(self.metadata[PROMPT_GRAPH_KEY], mode, threads, cpu_arena)
        self.batched_inputs = batched_inputs({name: spec.shape for name, spec in self.inputs.items()})
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.run_options = ort.RunOptions()
        if shrink_arena:
            self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def _load_prompt_graph(self, name: str, mode: NumericsMode, threads: int | None, cpu_arena: bool) -> None:
        """The prompt graph's session: its own intra-op pool, never spinning. It runs once per prompt and the step
        graph right after it: spinning threads of the prompt session (onnxruntime's workers spin 2^20 pause loops
        after their last task) would take the cores from the step graph's for tens of milliseconds."""
        prompt_path = self.path.parent / name
        if Path(name).name != name or not name.endswith(".onnx"):
            raise RuntimeInputError(f"{self.path} names its prompt graph {name!r}, not a file name beside it; "
                                    "re-split the model with `hn-export split-prompt`")
        if not prompt_path.is_file():
            raise RuntimeInputError(f"{self.path} is a step graph and needs its prompt graph {name} beside it; copy "
                                    f"{name} into {self.path.parent} (written by `hn-export split-prompt`)")
        try:
            self.prompt_session = create_session(prompt_path, mode, self.providers, threads,
                                                 kernel_library=self.kernel_library, spinning=False,
                                                 cpu_arena=cpu_arena)
        except Exception as exc:  # onnxruntime raises several pybind types
            message = explain_run_error(str(exc), prompt_path) or self._explain_load_error(str(exc), prompt_path)
            raise RuntimeInputError(message) from None
        self.carried = [o.name for o in self.prompt_session.get_outputs()]
        prompt_meta = dict(self.prompt_session.get_modelmeta().custom_metadata_map)
        ids = self.metadata.get(SPLIT_ID_KEY), prompt_meta.get(SPLIT_ID_KEY)
        if None in ids or ids[0] != ids[1] or self.metadata.get(CARRIED_KEY, "").split(",") != self.carried:
            raise RuntimeInputError(f"{prompt_path} is not the prompt graph of {self.path} (another split: split id "
                                    f"{ids[1]} against {ids[0]}); split the model again with `hn-export "
                                    "split-prompt` and keep the two files together")
        for out in self.prompt_session.get_outputs():  # a step graph input of the same element type and rank
            want = self.inputs.get(out.name)
            ranks = [None if spec is None or spec.shape is None else len(spec.shape) for spec in (out, want)]
            if want is None or out.type != want.type or None not in ranks and ranks[0] != ranks[1]:
                takes = "no such input" if want is None else f"{want.type} rank {ranks[1]}"
                raise RuntimeInputError(f"prompt graph {prompt_path} hands over {out.name} as {out.type} rank "
                                        f"{ranks[0]}, step graph {self.path} takes {takes}; the two files do not "
                                        "fit together: split the model again with `hn-export split-prompt`")
        self.prompt_inputs = [i.name for i in self.prompt_session.get_inputs()]
        step = {name: spec for name, spec in self.inputs.items() if name not in self.carried}
        self._step_reads = {name for name in self.prompt_inputs if name in step}  # read by both graphs
        self.inputs = {**step, **{i.name: i for i in self.prompt_session.get_inputs() if i.name not in step}}

    def _prompt_values(self, feeds: Mapping[str, np.ndarray], key: Hashable | None) -> dict[str, np.ndarray]:
        """The carried values for `feeds` (checked by `check_inputs` but for NaN in the prompt feeds): cached when
        `key` is a cached prompt's key or, without a key, when the prompt feeds are bitwise those of a cached prompt;
        else from a run of the prompt graph."""
        prompt = {name: np.asarray(feeds[name]) for name in self.prompt_inputs}
        for index, (seen_key, seen, values) in enumerate(self._prompt_cache):
            hit = seen_key == key if key is not None else (
                seen is not None and all(_same_bits(prompt[name], seen[name]) for name in seen))
            if hit:
                self._prompt_cache.insert(0, self._prompt_cache.pop(index))
                return values
        for name, array in prompt.items():
            _check_finite(name, array)
        values = dict(zip(self.carried, self.prompt_session.run(self.carried, prompt, self.run_options)))
        self.prompt_runs += 1
        seen = None if key is not None else {name: array.copy() for name, array in prompt.items()}
        self._prompt_cache.insert(0, (key, seen, values))
        del self._prompt_cache[PROMPT_CACHE_SIZE:]
        return values

    def clear_prompt_cache(self) -> None:
        """Forget the cached prompts: the next call runs the prompt graph (a split graph; no-op otherwise)."""
        self._prompt_cache.clear()

    @property
    def hadanorm_path(self) -> str:
        """Which implementation runs the hadanorm ops: 'kernels', 'function bodies' or 'none'."""
        if not self.transform_ops:
            return "none"
        return "kernels" if self.kernel_library is not None else "function bodies"

    @property
    def implementation(self) -> str:
        """What runs the quantized linears and hadanorm ops, e.g. ``fused: kernels (avx512vnni)``."""
        return implementation(self.metadata, self.kernel_library)

    def _explain_load_error(self, message: str, path: Path | None = None) -> str:
        """One line for a load failure of `path` (the step graph's own path by default)."""
        path = path or self.path
        first = message.strip().splitlines()[0] if message.strip() else "unknown error"
        if "external data" in message.lower() or ".onnx.data" in message or "No such file" in message:
            return (f"cannot load {path}: its external data file is missing or unreadable ({first[:200]}); "
                    f"keep {path.name}.data beside it")
        if HADANORM_DOMAIN in message:
            return (f"{path} uses {HADANORM_DOMAIN} ops but carries no function bodies and no kernel library is "
                    "registered; build the kernels with `python -m runtime.kernels.build` or re-quantize with "
                    "hn-export")
        if "Protobuf parsing failed" in message or "INVALID_PROTOBUF" in message:
            return f"{path} is not a readable ONNX model; re-export it with `hn-export export`"
        return f"onnxruntime cannot load {path}: {first[:300]}"

    def check_inputs(self, feeds: Mapping[str, np.ndarray], checked: set[str] = frozenset()) -> None:
        """One-line errors for feeds the graph cannot take; `checked`: names whose values are not scanned for NaN
        again (bitwise equal to feeds checked before)."""
        unknown = sorted(set(feeds) - set(self.inputs))
        missing = sorted(set(self.inputs) - set(feeds))
        if unknown or missing:
            raise RuntimeInputError(
                f"inputs {unknown or ''}{' are unknown' if unknown else ''}{'; ' if unknown and missing else ''}"
                f"{'missing ' + str(missing) if missing else ''}; the model takes {sorted(self.inputs)}"
            )
        batch = None
        for name, spec in self.inputs.items():
            array = feeds[name]
            want = _ORT_TYPES.get(spec.type)
            if want is not None and array.dtype != want:
                raise RuntimeInputError(f"input {name} has dtype {array.dtype}; the model takes {np.dtype(want)} "
                                        f"(cast with .astype(np.{np.dtype(want).name}))")
            if array.ndim != len(spec.shape):
                raise RuntimeInputError(f"input {name} has shape {list(array.shape)}; the model takes rank "
                                        f"{len(spec.shape)} {spec.shape}")
            for axis, (got, dim) in enumerate(zip(array.shape, spec.shape)):
                if isinstance(dim, int) and got != dim:
                    raise RuntimeInputError(f"input {name} has shape {list(array.shape)}; dimension {axis} must be "
                                            f"{dim} (model shape {spec.shape}; one file per resolution)")
            if name not in self.batched_inputs or not array.ndim:
                pass
            elif batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise RuntimeInputError(f"input {name} has batch {array.shape[0]}, other inputs {batch}; "
                                        "all inputs need the same batch size")
            if name not in checked:
                _check_finite(name, array)
        text, mask = feeds.get("encoder_hidden_states"), feeds.get("encoder_attention_mask")
        if text is not None and mask is not None and mask.shape[1] != text.shape[1]:
            raise RuntimeInputError(f"encoder_attention_mask has caption length {mask.shape[1]}, "
                                    f"encoder_hidden_states {text.shape[1]}; they must match")

    def __call__(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
                 prompt_key: Hashable | None = None) -> np.ndarray:
        """The graph's first output (or `outputs`) for `feeds`. A split graph: `prompt_key` names the per-prompt
        feeds for its cache (the caller promises the same key only with the same per-prompt feeds, e.g. a denoising
        loop's guidance group): found by the key, the feeds are not compared (nor scanned for NaN) again; without a
        key they are compared bitwise with the cached prompts'. Ignored by a whole graph."""
        try:
            if self.prompt_session is None:
                self.check_inputs(feeds)
                run_feeds = dict(feeds)
            else:
                self.check_inputs(feeds, checked=set(self.prompt_inputs))  # NaN in the prompt feeds: below
                run_feeds = {**{k: v for k, v in feeds.items() if k not in self.prompt_inputs or k in self._step_reads},
                             **self._prompt_values(feeds, prompt_key)}
            return self.session.run(list(outputs or self.output_names[:1]), run_feeds, self.run_options)[0]
        except Exception as exc:  # onnxruntime's pybind error types
            message = explain_run_error(str(exc), self.path)
            if message is None:
                raise
            raise RuntimeInputError(message) from None


PROMPT_CACHE_SIZE = 2  # prompts a split graph keeps the carried values of (a guidance pair run as two calls: 2)


def _check_finite(name: str, array: np.ndarray) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise RuntimeInputError(f"input {name} contains NaN or inf; pass finite values")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.nbytes % 8 == 0 and a.nbytes:
        return bool(np.array_equal(a.reshape(-1).view(np.uint64), b.reshape(-1).view(np.uint64)))
    return a.tobytes() == b.tobytes()


def batched_inputs(shapes: Mapping[str, Sequence[int | str | None]]) -> set[str]:
    """Inputs whose axis 0 is the batch, from input shapes (dims: int, a symbol's name, or None when unnamed): the
    same first dimension as ``hidden_states`` (else the first input), a named symbol or, for a static graph, the
    same size. An unnamed dynamic first dimension matches nothing."""
    if not shapes:
        return set()
    anchor = shapes.get("hidden_states") or next(iter(shapes.values()))
    first = anchor[0] if anchor else None
    return {name for name, shape in shapes.items() if shape and first is not None and shape[0] == first}


_PACKED_OPS = ("IntMatMul4", "IntMatMul8", "FloatMatMul4", "FloatMatMul8")


def explain_run_error(message: str, path: Path) -> str | None:
    """One line for a failure of a ``fused`` graph's packed-weight ops (kernels at run time, or their inlined
    function bodies at load or run time), or None for other errors."""
    op = next((name for name in _PACKED_OPS if name in message), None)
    if op is None:
        return None
    first = " ".join(message.split())
    detail = first[first.index(op):][:240] if op in first else first[:240]
    return (f"{path}: a packed weight does not match its declared shape ({detail}); "
            "re-quantize the model with `hn-export MODEL.onnx --format fused`")

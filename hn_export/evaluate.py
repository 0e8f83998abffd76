"""Compare a candidate graph with a reference graph on identical inputs.

* single call: one denoiser call per sample (CFG batch of 2, a mid-schedule timestep), outputs concatenated;
* end of denoising: the final latents of an N-step run of the family's denoising loop (PixArt: DPM-Solver++) of each
  graph from the same seeds.

SQNR is taken over all samples together.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np

from hn_export.denoise import DenoiseConfig, ModelSignature, denoise, first_call_feeds
from hn_export.errors import UserError
from hn_export.metadata_keys import PROMPT_GRAPH_KEY
from hn_export.metrics import Comparison
from hn_export.model_files import load_model, save_model
from runtime.denoiser import Denoiser
from runtime.errors import RuntimeInputError
from runtime.kernels import KernelLibraryError, check_selected_isa, library_path

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class Evaluation:
    single_call: Comparison
    end_of_denoising: Comparison | None


def feeds_signature(path: Path, model=None) -> ModelSignature:
    """The signature of the feeds a graph file takes: its inputs, or for a step graph (`hn-export split-prompt`)
    those of the whole graph it came from (its own less the values its prompt graph hands over, and the prompt
    graph's), which `runtime.denoiser.Denoiser` takes for it."""
    import onnx_ir as ir

    model = load_model(path) if model is None else model
    prompt_name = model.metadata_props.get(PROMPT_GRAPH_KEY)
    if prompt_name:
        prompt = load_model(path.parent / prompt_name, "prompt graph")
        carried = {value.name for value in prompt.graph.outputs}
        keep = [value for value in model.graph.inputs if value.name not in carried]
        names = {value.name for value in keep}
        extra = [ir.Value(name=v.name, type=v.type, shape=v.shape) for v in prompt.graph.inputs if v.name not in names]
        model.graph.inputs.clear()
        model.graph.inputs.extend(keep + extra)
    return ModelSignature.of(model)


class GraphRunner:
    """A graph file run through `runtime.Denoiser`, callable with feeds -> `sample` (float32)."""

    def __init__(self, path: Path, provider: str | None = None, kernels: bool = True):
        self._imported: tempfile.TemporaryDirectory | None = None
        library = library_path() if kernels else None
        if library is not None:
            try:  # a bad HADANORM_KERNELS_ISA: its own reason, before any session
                check_selected_isa(library)
            except KernelLibraryError as exc:
                raise UserError(f"{exc} (or run without kernels)") from None
        try:
            model = load_model(path)  # lazy: weights stay on disk
        except UserError:
            # another opset (or another problem load_graph names in one line): run the imported copy
            runs = self._import(path)
            self.signature = ModelSignature.of(load_model(runs))
        else:  # a step graph's prompt graph problems are its own (one line), not an opset's
            self.signature = feeds_signature(path, model)
            runs = path
        try:
            self.denoiser = Denoiser(runs, provider=provider, kernel_library=kernels)
        except RuntimeInputError:
            if runs != path:
                raise
            # a graph from another exporter that onnxruntime refuses as written (the no-op Squeeze inside an If):
            # run its imported copy, the graph hn-export quantizes
            self.denoiser = Denoiser(self._import(path), provider=provider, kernel_library=kernels)

    def _import(self, path: Path) -> Path:
        """Write the imported graph (`hn_export.graph_import`) to a temporary folder; its errors are one line."""
        from hn_export.graph_import import load_graph

        model = load_graph(path)
        self._imported = tempfile.TemporaryDirectory(prefix="hn-export-imported-")
        copy = Path(self._imported.name) / path.name
        save_model(model, copy)
        logger.warning("%s is run from its imported copy (opset 21, exporter fixes applied)", path)
        return copy

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        cast = {k: v.astype(self.signature.dtype) if v.dtype.kind == "f" else v for k, v in feeds.items()}
        return self.denoiser(cast).astype(np.float32)

    def close(self) -> None:
        self.denoiser = None
        if self._imported is not None:
            self._imported.cleanup()
            self._imported = None

    def __enter__(self) -> GraphRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def single_call_outputs(runner: GraphRunner, sig: ModelSignature, config: DenoiseConfig) -> np.ndarray:
    outs = []
    for index in range(config.samples):
        outs.append(runner(first_call_feeds(sig, config, index)))
    return np.concatenate(outs)


def final_latents(runner: GraphRunner, sig: ModelSignature, config: DenoiseConfig) -> np.ndarray:
    return np.concatenate([denoise(runner, sig, config, i) for i in range(config.samples)])


def reference_outputs(reference: GraphRunner, config: DenoiseConfig, with_denoising: bool) -> dict[str, np.ndarray]:
    sig = reference.signature
    out = {"single_call": single_call_outputs(reference, sig, config)}
    if with_denoising:
        out["end_of_denoising"] = final_latents(reference, sig, config)
    return out


def evaluate(candidate: GraphRunner, reference: dict[str, np.ndarray], config: DenoiseConfig) -> Evaluation:
    sig = candidate.signature
    single = Comparison.of(reference["single_call"], single_call_outputs(candidate, sig, config))
    end = None
    if "end_of_denoising" in reference:
        end = Comparison.of(reference["end_of_denoising"], final_latents(candidate, sig, config))
    return Evaluation(single, end)

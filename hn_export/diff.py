"""`hn-export diff`: a candidate graph against a reference graph on identical inputs.

Reported per output: SQNR (dB), cosine similarity, max abs error, relative L2, for one denoiser call and for the
final latents of an N-step denoising run. ``--per-layer`` compares the output of every activation site's linears
(the value after the bias Add, whose name the quantization passes keep), found in the reference graph and requested
as extra outputs of both graphs.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graph_passes.linears import find_activation_sites
from hn_export.families import selection_for
from hn_export.input_arrays import check_same_inputs
from hn_export.denoise import DenoiseConfig, ModelSignature
from hn_export.errors import UserError
from hn_export.metadata_keys import PROMPT_GRAPH_KEY
from hn_export.evaluate import GraphRunner, final_latents, single_call_outputs
from hn_export.metrics import Comparison
from hn_export.graph_import import load_graph
from hn_export.model_files import load_model, save_model
from runtime.denoiser import Denoiser


@dataclasses.dataclass(frozen=True)
class LayerComparison:
    site: str
    role: str
    block: int | None
    comparison: Comparison


def compare_outputs(candidate: GraphRunner, reference: GraphRunner, config: DenoiseConfig,
                    feeds: dict[str, np.ndarray] | None) -> dict[str, Comparison]:
    """Single call (the given feeds, else seeded ones) and, with steps > 0, end of denoising."""
    sig = reference.signature
    check_pair(sig, candidate.signature, config, feeds)
    if feeds is not None:
        single = Comparison.of(reference(feeds), candidate(feeds))
    else:
        single = Comparison.of(single_call_outputs(reference, sig, config),
                               single_call_outputs(candidate, candidate.signature, config))
    out = {"single_call": single}
    if config.steps > 0:
        out["end_of_denoising"] = Comparison.of(final_latents(reference, sig, config),
                                                final_latents(candidate, candidate.signature, config))
    return out


def check_pair(sig: ModelSignature, candidate: ModelSignature, config: DenoiseConfig,
               feeds: dict[str, np.ndarray] | None) -> None:
    """The two graphs take the same inputs, and seeded inputs or a denoising loop have the reference's family."""
    check_same_inputs(sig, candidate, "candidate")
    if not sig.family and (feeds is None or config.steps > 0):
        raise UserError(f"the reference's inputs {sorted(sig.shapes)} match no supported model family, so diff "
                        "cannot make seeded inputs or run a denoising loop",
                        "pass --inputs FILE.npz (named like the graph inputs) and --steps 0")


def _with_outputs(model: ir.Model, names: list[str]) -> None:
    values = {v.name: v for node in model.graph for v in node.outputs}
    for name in names:
        value = values[name]
        if value.type is None:
            value.type = model.graph.outputs[0].type
        if not value.is_graph_output():
            model.graph.outputs.append(value)


def per_layer(candidate: Path, reference: Path, feeds: dict[str, np.ndarray]) -> list[LayerComparison]:
    # the reference as the quantizer saw it (exporter fixes, Gemm linears as MatMul: output names are kept)
    ref_model, cand_model = load_graph(reference, "reference"), load_model(candidate, "candidate")
    for path, model in ((reference, ref_model), (candidate, cand_model)):
        if model.metadata_props.get(PROMPT_GRAPH_KEY):
            raise UserError(f"{path} is a step graph (`hn-export split-prompt`): its caption part is in "
                            f"{model.metadata_props[PROMPT_GRAPH_KEY]}", "--per-layer needs the whole graph it came from")
    cand_values = {v.name for node in cand_model.graph for v in node.outputs}
    plan: list[tuple[str, str, int | None, list[str]]] = []
    for site in find_activation_sites(ref_model, selection_for(ref_model)):
        names = [(lin.bias_add or lin.node).outputs[0].name for lin in site.linears]
        if all(n in cand_values for n in names):
            plan.append((site.name, site.role, site.block, names))
    if not plan:
        raise UserError("no activation-site outputs are shared by the two graphs",
                        "--per-layer needs a candidate quantized from the reference's export")
    names = [n for *_, group in plan for n in group]
    results: dict[str, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="hn-export-diff-") as tmp:
        for key, model in (("reference", ref_model), ("candidate", cand_model)):
            _with_outputs(model, names)
            path = Path(tmp) / f"{key}.onnx"
            save_model(model, path)
            denoiser = Denoiser(path)
            sig_dtype = np.float16 if denoiser.inputs["hidden_states"].type == "tensor(float16)" else np.float32
            cast = {k: v.astype(sig_dtype) if v.dtype.kind == "f" else v for k, v in feeds.items()}
            arrays = denoiser.session.run(names, cast)
            results[key] = dict(zip(names, arrays))
            del denoiser
    out = []
    for site, role, block, group in plan:
        ref = np.concatenate([results["reference"][n].astype(np.float64).ravel() for n in group])
        cand = np.concatenate([results["candidate"][n].astype(np.float64).ravel() for n in group])
        out.append(LayerComparison(site, role, block, Comparison.of(ref, cand)))
    return out

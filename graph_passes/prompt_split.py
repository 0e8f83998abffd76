"""Split a denoiser graph in two by what its inputs change: a prompt graph and a step graph.

A denoising loop calls the denoiser once per step with new latents (``hidden_states``) and a new ``timestep``; the
other inputs (the caption embedding, its mask, pooled text embeddings, ids) stay the same for the whole generation.
Every node that depends on those other inputs alone computes the same values at every step: PixArt's caption
projection and each block's cross-attention K and V projections (about a sixth of a 256 px call's multiply-adds).

`split_prompt_graph` moves those nodes into a *prompt graph* (the per-prompt inputs -> the values the rest of the
graph reads from them, the *carried* values) and leaves the rest as a *step graph* (the step inputs and the carried
values -> the outputs). Running the prompt graph once and the step graph at every step computes what the whole graph
computes, node for node: the same ops on the same inputs (the same bits where the runtime runs each op alike;
onnxruntime may fuse ops differently at the cut, and float sums then round differently).

Which node goes where, from graph structure alone (no family knowledge):

* a node that depends (through any path) on a step input stays in the step graph;
* a node that depends on no step input and on at least one prompt input moves to the prompt graph;
* a node that depends on no input at all (a Constant, a Shape of an initializer) moves with its consumers: to the
  prompt graph only when every consumer moved there, else it stays (and its prompt-side consumers stay with it);
* an initializer read on both sides is held by both graphs (the same tensor data, two values).

Graphs with control flow (a node with a graph attribute: If, Loop, Scan) are refused: their subgraphs may read
outer values that this split does not follow.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Sequence

import onnx_ir as ir

from graph_passes.errors import GraphInputError

logger = logging.getLogger(__name__)

# What a denoising loop changes at every step (the export's input names, shared by every family).
STEP_INPUTS: tuple[str, ...] = ("hidden_states", "timestep")
# Ops that only move or describe data: a prompt graph of these alone saves nothing worth a second file.
_DATA_MOVEMENT_OPS = frozenset({"Shape", "Reshape", "Transpose", "Concat", "Gather", "Unsqueeze", "Squeeze", "Cast",
                                "Constant", "ConstantOfShape", "Slice", "Identity", "Expand", "Flatten", "Split"})


@dataclasses.dataclass(frozen=True)
class PromptSplit:
    """The two graphs of a split and what passes between them."""

    prompt: ir.Model  # per-prompt inputs -> carried values
    step: ir.Model  # step inputs + carried values (graph inputs of the same names) -> the original outputs
    carried: tuple[str, ...]  # the values the prompt graph hands to the step graph
    prompt_inputs: tuple[str, ...]  # the original inputs the prompt graph reads
    prompt_ops: dict[str, int]  # op type -> count of the nodes moved
    prompt_weight_bytes: int  # bytes of the initializers the prompt graph holds
    split_id: str  # sha256 of the carried names and the prompt graph's weights: the pair's mark (`split_id_of`)


def split_prompt_graph(model: ir.Model, step_inputs: Sequence[str] = STEP_INPUTS) -> PromptSplit:
    """Split `model` (consumed: its graph becomes the step graph) into a prompt graph and a step graph (module
    docstring). Raises `GraphInputError` when a step input is missing, when no computing node depends on the other
    inputs alone, when an output would come from the prompt graph, or for control flow."""
    graph = model.graph
    graph.sort()  # the classification below reads each node after its producers
    names = [value.name for value in graph.inputs]
    missing = [name for name in step_inputs if name not in names]
    if missing:
        raise GraphInputError(f"the graph has no input {missing[0]!r} (inputs: {', '.join(names)}); a denoiser "
                              "graph from `hn-export export` takes hidden_states and timestep")
    control = next((node for node in graph if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                                  for a in node.attributes.values())), None)
    if control is not None:
        raise GraphInputError(f"node {control.name!r} ({control.op_type}) holds a subgraph; graphs with control flow "
                              "are not split (use the whole graph)")
    moved = _prompt_nodes(graph, set(step_inputs))
    if not any(node.op_type not in _DATA_MOVEMENT_OPS for node in moved):
        raise GraphInputError("no computing node depends on the prompt inputs alone "
                              f"({', '.join(n for n in names if n not in step_inputs) or 'there are none'}); "
                              "nothing to split: use the whole graph")
    moved_ids = {id(node) for node in moved}
    carried = _carried_values(graph, moved, moved_ids)
    prompt_inputs = [value for value in graph.inputs if value.name not in step_inputs
                     and any(id(use.node) in moved_ids for use in value.uses())]

    # the step graph's side of each carried value: a new graph input of the same name, type and shape
    for value in carried:
        stand_in = ir.Value(name=value.name, type=value.type, shape=value.shape)
        for use in list(value.uses()):
            if id(use.node) not in moved_ids:
                use.node.replace_input_with(use.idx, stand_in)
        graph.inputs.append(stand_in)
    # a prompt input the step graph also reads keeps a step-side input of its own
    prompt_side_inputs = []
    for value in prompt_inputs:
        step_uses = [use for use in value.uses() if id(use.node) not in moved_ids]
        if step_uses:
            twin = ir.Value(name=value.name, type=value.type, shape=value.shape)
            for use in step_uses:
                use.node.replace_input_with(use.idx, twin)
            graph.inputs[graph.inputs.index(value)] = twin
        else:
            graph.inputs.remove(value)
        prompt_side_inputs.append(value)
    initializers = _take_initializers(graph, moved, moved_ids)
    graph.remove(moved, safe=False)
    prompt_graph = ir.Graph(prompt_side_inputs, list(carried), nodes=moved, initializers=initializers,
                            opset_imports=dict(graph.opset_imports), name=f"{graph.name or 'graph'}_prompt")
    prompt = ir.Model(prompt_graph, ir_version=model.ir_version, producer_name=model.producer_name,
                      producer_version=model.producer_version, functions=list(model.functions.values()))
    prompt.metadata_props.update(model.metadata_props)
    ops = dict(collections.Counter(node.op_type for node in moved))
    weight_bytes = sum(v.const_value.nbytes for v in initializers if v.const_value is not None)
    logger.info("prompt graph: %d nodes (%s), %d carried values, %.1f MB of weights", len(moved),
                ", ".join(f"{op} {n}" for op, n in sorted(ops.items())), len(carried), weight_bytes / 1e6)
    return PromptSplit(prompt=prompt, step=model, carried=tuple(v.name for v in carried),
                       prompt_inputs=tuple(v.name for v in prompt_side_inputs), prompt_ops=ops,
                       prompt_weight_bytes=weight_bytes, split_id=split_id_of(carried, initializers))


def split_id_of(carried: Sequence[ir.Value], initializers: Sequence[ir.Value]) -> str:
    """A mark both files of a split carry (the same inputs give the same mark): two files of different splits, e.g. of
    two checkpoints of one model, differ in it (the runtime refuses such a pair)."""
    digest = hashlib.sha256()
    for value in carried:
        digest.update(value.name.encode() + b"\0")
    for value in sorted(initializers, key=lambda v: v.name):
        digest.update(value.name.encode() + b"\0")
        if value.const_value is not None:
            digest.update(value.const_value.tobytes())
    return digest.hexdigest()[:32]


def _prompt_nodes(graph: ir.Graph, step_inputs: set[str]) -> list[ir.Node]:
    """The nodes that move (module docstring), in graph order."""
    nodes = list(graph)
    step_dep: set[int] = set()  # depends on a step input
    input_dep: set[int] = set()  # depends on any graph input
    for node in nodes:
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            if producer is None:
                if value.is_graph_input():
                    input_dep.add(id(node))
                    if value.name in step_inputs:
                        step_dep.add(id(node))
            else:
                if id(producer) in step_dep:
                    step_dep.add(id(node))
                if id(producer) in input_dep:
                    input_dep.add(id(node))
    prompt = {id(node) for node in nodes if id(node) not in step_dep}
    changed = True
    while changed:  # input-free nodes move only with all their consumers; what reads a node that stays, stays
        changed = False
        for node in nodes:
            if id(node) not in prompt:
                continue
            stays = (id(node) not in input_dep and any(id(use.node) not in prompt
                                                       for out in node.outputs for use in out.uses()))
            stays = stays or any(v is not None and v.producer() is not None and id(v.producer()) not in prompt
                                 for v in node.inputs)
            if stays:
                prompt.discard(id(node))
                changed = True
    held = [node for node in nodes if id(node) in input_dep and id(node) not in step_dep and id(node) not in prompt]
    if held:  # they read an input-free node the step graph reads too (a shared Constant), and stay with it
        logger.info("%d nodes that depend on the prompt inputs alone stay in the step graph (first: %s)", len(held),
                    held[0].name)
    return [node for node in nodes if id(node) in prompt]


def _carried_values(graph: ir.Graph, moved: Iterable[ir.Node], moved_ids: set[int]) -> list[ir.Value]:
    outputs = {id(value) for value in graph.outputs}
    carried = []
    for node in moved:
        for value in node.outputs:
            if id(value) in outputs:
                raise GraphInputError(f"graph output {value.name!r} depends on the prompt inputs alone; nothing "
                                      "would be left for the step graph to compute it from: use the whole graph")
            if any(id(use.node) not in moved_ids for use in value.uses()):
                if value.type is None:
                    raise GraphInputError(f"value {value.name!r} passes from the prompt graph to the step graph "
                                          "without a known type; run shape inference on the graph first")
                carried.append(value)
    return carried


def _take_initializers(graph: ir.Graph, moved: Iterable[ir.Node], moved_ids: set[int]) -> list[ir.Value]:
    """The initializers the moved nodes read, taken out of the step graph (or copied, when both sides read them)."""
    taken: dict[int, ir.Value] = {}
    for node in moved:
        for index, value in enumerate(node.inputs):
            if value is None or not value.is_initializer():
                continue
            if id(value) in taken:
                node.replace_input_with(index, taken[id(value)])
                continue
            if all(id(use.node) in moved_ids for use in value.uses()):
                graph.initializers.pop(value.name)
                taken[id(value)] = value
            else:
                twin = ir.Value(name=value.name, type=value.type, shape=value.shape, const_value=value.const_value)
                taken[id(value)] = twin
                node.replace_input_with(index, twin)
    return list(taken.values())

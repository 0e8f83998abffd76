"""Convert a graph to another ONNX opset with onnx's version converter, weights untouched.

What: `convert_opset(model, target)` returns a new `ir.Model` at opset `target` of the default domain (other domains
keep their versions: the converter passes their nodes through). The weights are not copied: the converter sees
placeholders (`graph_passes.onnx_proto.weights_left_out`) and the converted model gets the very same tensor objects
back, so a model whose weights sit in an external data file converts without reading them.

Why: the passes write opset 21 (blocked ``QuantizeLinear``), and the exporters people use write older opsets
(torch's TorchScript exporter defaults to 17 or 18; optimum exports at 14 to 18).

What is kept: node names and value names (the converter keeps them), the model's metadata, and each node's
``metadata_props`` (the converter drops them; they are copied back by the node's first output name: the dynamo
exporter's module paths live there). The IR version is left as the converter writes it.

What fails: a default-domain op with no ONNX schema, a node of a domain the model does not import, or an op the
converter has no adapter for (for example ``Attention`` of opset 23 going down to 21). Each raises a one-line
`GraphInputError` naming the op.
"""

from __future__ import annotations

import logging
import re

import onnx
import onnx.defs
import onnx.version_converter
import onnx_ir as ir

from graph_passes.errors import GraphInputError
from graph_passes.onnx_proto import restore_weights, weights_left_out

logger = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: ir.Model) -> int | None:
    """The model's opset of the default (``ai.onnx``) domain, or None when it imports none."""
    for domain in _DEFAULT_DOMAINS:
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


def _nodes(model: ir.Model):
    for graph in model.graphs():
        yield from graph  # model.graphs() already visits every subgraph: iterate each one flat


def _check_convertible(model: ir.Model, source: int, target: int) -> None:
    """One-line errors for what the converter would fail on with an unreadable assertion."""
    imported = set(model.opset_imports)
    for node in _nodes(model):
        where = f"node {node.name!r} ({node.op_type})" if node.name else f"a {node.op_type} node"
        if node.domain not in _DEFAULT_DOMAINS and node.domain not in imported:
            raise GraphInputError(
                f"{where} uses the operator domain {node.domain!r}, which the model does not import, so its opset "
                f"cannot be converted from {source} to {target}; re-export the model at opset {target}"
            )
        if node.domain in _DEFAULT_DOMAINS and not _in_opset(node.op_type, source):
            what = (f"is not in ONNX opset {source} (it came in opset {_first_opset(node.op_type)})"
                    if onnx.defs.has(node.op_type) else "is not an ONNX operator")
            raise GraphInputError(
                f"{where} {what}, so the model cannot be converted from opset {source} to {target}; "
                f"re-export the model at opset {target}"
            )


def _in_opset(op_type: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return True


def _first_opset(op_type: str) -> int:
    return min(s.since_version for s in onnx.defs.get_all_schemas_with_history()
               if s.name == op_type and s.domain in _DEFAULT_DOMAINS)


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    text = text.rsplit("failed: ", 1)[-1]  # C++ assertions: keep the message, not the source location
    text = re.sub(r"\[\w+Error\]\s*", "", text)
    return text[:200]


def _copy_node_metadata(source: ir.Model, converted: ir.Model) -> None:
    by_output = {}
    for node in _nodes(source):
        if node.metadata_props and node.outputs and node.outputs[0].name:
            by_output[node.outputs[0].name] = node.metadata_props
    for node in _nodes(converted):
        props = by_output.get(node.outputs[0].name) if node.outputs else None
        if props and not node.metadata_props:
            node.metadata_props.update(props)


def convert_opset(model: ir.Model, target: int) -> ir.Model:
    """`model` converted to opset `target` (a new model sharing the weight tensors; `model` is left unchanged)."""
    source = default_opset(model)
    if source is None:
        raise GraphInputError(f"the model imports no ONNX (ai.onnx) opset; re-export the model at opset {target}")
    if source == target:
        return model
    _check_convertible(model, source, target)
    with weights_left_out(model) as weights:
        proto = ir.serde.serialize_model(model)
    try:
        converted_proto = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises RuntimeError, InferenceError, ValidationError...
        raise GraphInputError(
            f"onnx's version converter cannot convert this model from opset {source} to {target} "
            f"({_reason(exc)}); re-export the model at opset {target}"
        ) from None
    del proto
    converted = ir.serde.deserialize_model(converted_proto)
    del converted_proto
    missing = restore_weights(converted, weights)
    if missing:  # the converter renamed or rewrote a weight: never seen, but never write a model without its data
        raise GraphInputError(
            f"onnx's version converter changed the weights {missing[:3]} while converting from opset {source} to "
            f"{target}; re-export the model at opset {target}"
        )
    _copy_node_metadata(model, converted)
    converted.metadata_props.update({k: v for k, v in model.metadata_props.items()
                                     if k not in converted.metadata_props})
    logger.info("converted the graph from opset %d to %d", source, target)
    return converted

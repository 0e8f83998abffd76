"""The online transform of a site as graph nodes (the emitters' `graph_passes.emit.SiteEmitter.site_input`).

For a site with transform ``x~ = H S^-1 (x - mu)`` the site's linears read ``x~`` instead of ``x``:
``hadanorm.<Op>(x, mul, h_left, h_right) -> (x~[, mean~])`` with ``mul = sign / s`` (`insert_transform`). A
single-Hadamard site (HQ-DM) reads ``x^ = ScaleRotate(Q(x~), 1, H_L^T, H_R^T) = Q(x~) H`` instead
(`insert_rotate_back`: the activation quantizer goes between the two), and its weights are not rotated. The op's
function body is added to the model so stock onnxruntime runs it. The weights the linears multiply are the plan's
``W~^T = H S W^T`` (`graph_passes.site_plan`), so the graph computes ``(x - mu) W^T``: equal to the original for
methods without centering, and completed by the bias correction (`graph_passes.bias_correction`) for centered ones.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.domain import HADANORM_DOMAIN
from graph_passes.graph_utils import add_initializer, make_node, tensor_name
from graph_passes.function_ops import ensure_function
from graph_passes.hadanorm_ops import TransformOp
from graph_passes.site_transforms import SiteTransform


def float_dtype(value: ir.Value) -> np.dtype:
    return value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)


def transform_inputs(graph: ir.Graph, site: str, transform: SiteTransform, dtype: np.dtype) -> list[ir.Value]:
    """The op's parameters as initializers: ``mul`` and, for a rotation, ``h_left``, ``h_right``."""
    name = tensor_name(site)
    inputs = [add_initializer(graph, f"{name}.mul", transform.channel_mul().astype(dtype))]
    if transform.hadamard is not None:
        inputs.append(add_initializer(graph, f"{name}.h_left", transform.hadamard.left.astype(dtype)))
        inputs.append(add_initializer(graph, f"{name}.h_right", transform.hadamard.right.astype(dtype)))
    return inputs


def insert_transform(model: ir.Model, site: str, transform: SiteTransform, x: ir.Value, before: ir.Node) -> ir.Node:
    """``<Op>(x, ...) -> (x~[, mean~])`` inserted before `before`; `transform.op` must not be None."""
    spec = transform.op
    node = make_node(spec.op_type, [x, *transform_inputs(model.graph, site, transform, float_dtype(x))],
                     f"{tensor_name(site)}.transform", domain=HADANORM_DOMAIN, num_outputs=spec.num_outputs)
    node.outputs[0].shape, node.outputs[0].type = x.shape, x.type
    if spec.center:
        node.outputs[1].type = x.type
    ensure_function(model, spec)
    model.graph.insert_before(before, node)
    return node


def insert_rotate_back(model: ir.Model, site: str, transform: SiteTransform, rotated: ir.Value,
                       before: ir.Node) -> ir.Value:
    """``x~ H``: ScaleRotate with the transposed factors (``(A (x) B)^T = A^T (x) B^T``) and no scale."""
    graph, hadamard, dtype = model.graph, transform.hadamard, float_dtype(rotated)
    assert hadamard is not None and hadamard.signs is None, "single-Hadamard sites take no random signs"
    name = tensor_name(site)
    ones = add_initializer(graph, f"{name}.ones", np.ones(hadamard.dim, dtype=dtype))
    h_left = add_initializer(graph, f"{name}.h_left_t", hadamard.left.T.astype(dtype))
    h_right = add_initializer(graph, f"{name}.h_right_t", hadamard.right.T.astype(dtype))
    spec = TransformOp(center=False, rotate=True)
    node = make_node(spec.op_type, [rotated, ones, h_left, h_right], f"{name}.rotate_back", domain=HADANORM_DOMAIN)
    node.outputs[0].shape, node.outputs[0].type = rotated.shape, rotated.type
    ensure_function(model, spec)
    graph.insert_before(before, node)
    return node.outputs[0]

"""Pass (b): insert the online transform before each tagged site and fuse its inverse into the weights.

For a site with transform ``x~ = H S^-1 (x - mu)`` the site's MatMuls (or convs, through their token view) read
``x~`` instead of ``x``: ``hadanorm.<Op>(x, mul, h_left, h_right) -> (x~[, mean~])`` with ``mul = sign / s``.
A single-Hadamard site (HQ-DM) reads ``x^ = ScaleRotate(x~, 1, H_L^T, H_R^T) = x~ H`` instead (the back rotation,
tagged ``hadanorm.rotate_back``; the quantize pass puts the activation quantizer before it), and its weights are not
rotated. The op's function body is added
to the model so stock onnxruntime runs it. The same pass then replaces each weight ``W^T`` by ``W~^T = H S W^T``
(`graph_passes.fuse_weights`), so the graph it leaves computes ``(x - mu) W^T``: equal to the original for methods
without centering, and completed by the bias correction (pass d) for centered ones.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes import tags
from graph_passes.fuse_weights import fuse_site_weights
from graph_passes.graph_utils import add_initializer, make_node, site_input, tagged_matmuls, tensor_name
from graph_passes.hadanorm_ops import TransformOp, ensure_function
from graph_passes.site_transforms import SiteTransform
from graph_passes.domain import HADANORM_DOMAIN



class InsertTransformsPass(ir.passes.InPlacePass):
    def __init__(self, transforms: dict[str, SiteTransform]):
        super().__init__()
        self.transforms = transforms

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for site, matmuls in tagged_matmuls(graph, tags.ROLE_MAIN).items():
            transform = self.transforms[site]
            spec = transform.op
            if spec is None:
                continue
            consumer, index = site_input(matmuls[0])
            activation = consumer.inputs[index]
            dtype = activation.dtype.numpy() if activation.dtype is not None else np.float32
            inputs = [activation, add_initializer(graph, f"{tensor_name(site)}.mul", transform.channel_mul().astype(dtype))]
            if spec.rotate:
                inputs.append(add_initializer(graph, f"{tensor_name(site)}.h_left", transform.hadamard.left.astype(dtype)))
                inputs.append(add_initializer(graph, f"{tensor_name(site)}.h_right", transform.hadamard.right.astype(dtype)))
            node = make_node(spec.op_type, inputs, f"{tensor_name(site)}.transform", domain=HADANORM_DOMAIN,
                             num_outputs=spec.num_outputs, metadata={tags.SITE: site})
            node.outputs[0].shape = activation.shape
            node.outputs[0].type = activation.type
            if spec.center:
                node.outputs[1].type = activation.type
            ensure_function(model, spec)
            graph.insert_before(consumer, node)
            result = node.outputs[0]
            if transform.rotate_back:
                back = self._rotate_back(model, site, transform, result, dtype)
                graph.insert_before(consumer, back)
                result = back.outputs[0]
            for matmul in matmuls:
                reader, position = site_input(matmul)
                reader.replace_input_with(position, result)
            modified = True
        fuse_site_weights(graph, self.transforms)
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _rotate_back(model: ir.Model, site: str, transform: SiteTransform, rotated: ir.Value, dtype) -> ir.Node:
        """``x~ H``: ScaleRotate with the transposed factors (``(A (x) B)^T = A^T (x) B^T``) and no scale."""
        graph = model.graph
        hadamard = transform.hadamard
        assert hadamard is not None and hadamard.signs is None, "single-Hadamard sites take no random signs"
        ones = add_initializer(graph, f"{tensor_name(site)}.ones", np.ones(hadamard.dim, dtype=dtype))
        h_left = add_initializer(graph, f"{tensor_name(site)}.h_left_t", hadamard.left.T.astype(dtype))
        h_right = add_initializer(graph, f"{tensor_name(site)}.h_right_t", hadamard.right.T.astype(dtype))
        spec = TransformOp(center=False, rotate=True)
        node = make_node(spec.op_type, [rotated, ones, h_left, h_right], f"{tensor_name(site)}.rotate_back",
                         domain=HADANORM_DOMAIN, metadata={tags.SITE: site, tags.ROTATE_BACK: site})
        node.outputs[0].shape, node.outputs[0].type = rotated.shape, rotated.type
        ensure_function(model, spec)
        return node

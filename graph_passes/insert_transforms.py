"""Pass (b): insert the online transform before each tagged site and fuse its inverse into the weights.

For a site with transform ``x~ = H S^-1 (x - mu)`` the site's MatMuls read ``x~`` instead of ``x``:
``hadanorm.<Op>(x, mul, h_left, h_right) -> (x~[, mean~])`` with ``mul = sign / s``. The op's function body is added
to the model so stock onnxruntime runs it. The same pass then replaces each weight ``W^T`` by ``W~^T = H S W^T``
(`graph_passes.fuse_weights`), so the graph it leaves computes ``(x - mu) W^T``: equal to the original for methods
without centering, and completed by the bias correction (pass d) for centered ones.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes import tags
from graph_passes.fuse_weights import fuse_site_weights
from graph_passes.graph_utils import add_initializer, make_node, tagged_matmuls
from graph_passes.hadanorm_ops import ensure_function
from graph_passes.site_transforms import SiteTransform
from graph_passes.domain import HADANORM_DOMAIN


def _safe(name: str) -> str:
    return name.replace("#", "_")


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
            activation = matmuls[0].inputs[0]
            dtype = activation.dtype.numpy() if activation.dtype is not None else np.float32
            inputs = [activation, add_initializer(graph, f"{_safe(site)}.mul", transform.channel_mul().astype(dtype))]
            if spec.rotate:
                inputs.append(add_initializer(graph, f"{_safe(site)}.h_left", transform.hadamard.left.astype(dtype)))
                inputs.append(add_initializer(graph, f"{_safe(site)}.h_right", transform.hadamard.right.astype(dtype)))
            node = make_node(spec.op_type, inputs, f"{_safe(site)}.transform", domain=HADANORM_DOMAIN,
                             num_outputs=spec.num_outputs, metadata={tags.SITE: site})
            node.outputs[0].shape = activation.shape
            node.outputs[0].type = activation.type
            if spec.center:
                node.outputs[1].type = activation.type
            ensure_function(model, spec)
            graph.insert_before(matmuls[0], node)
            for matmul in matmuls:
                matmul.replace_input_with(0, node.outputs[0])
            modified = True
        fuse_site_weights(graph, self.transforms)
        return ir.passes.PassResult(model, modified=modified)

"""The weight half of pass (b): fuse the inverse transform into each consuming weight, in float64.

ONNX stores ``W^T`` as ``[in, out]`` (a Conv: ``W`` [out, in, kh, kw], fused at every tap); the pass replaces it by
``W~^T = H S W^T`` (``S W^T`` for single-Hadamard sites) (computed in float64, cast to the
weight's dtype at the end), so that ``x~ W~^T = (x - mu) W^T``. A weight also read outside its site (tied weights)
is copied first, so the other reader keeps the original.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from graph_passes import tags
from graph_passes.graph_utils import add_initializer, tagged_matmuls
from graph_passes.site_transforms import SiteTransform

logger = logging.getLogger(__name__)


def fuse_site_weights(graph: ir.Graph, transforms: dict[str, SiteTransform]) -> None:
    """Replace every transformed site's weights by ``W~^T = H S W^T`` (called by `InsertTransformsPass`, whose
    inserted transform ops make the graph correct again only together with this)."""
    done: set[tuple[str, int]] = set()  # per site: a weight tied across two sites is fused once for each
    for site, matmuls in tagged_matmuls(graph, tags.ROLE_MAIN).items():
        transform = transforms[site]
        if transform.op is None:
            continue
        for matmul in matmuls:
            weight = matmul.inputs[1]
            if (site, id(weight)) in done:
                continue
            done.add((site, id(weight)))
            original = weight.const_value.numpy()
            fuse = transform.fuse_conv_weight if matmul.op_type == "Conv" else transform.fuse_weight
            fused = fuse(original).astype(original.dtype)
            outside = [n for n, _ in weight.uses() if tags.site_of(n) != site]
            if outside:
                logger.info("weight %s of site %s is shared outside the site: fusing a copy", weight.name, site)
                copy = add_initializer(graph, f"{weight.name}.{site}", fused)
                for node, index in list(weight.uses()):
                    if tags.site_of(node) == site:
                        node.replace_input_with(index, copy)
            else:
                weight.const_value = ir.tensor(fused, name=weight.name)

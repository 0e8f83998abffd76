"""Pass (a'): give every tagged Conv site the token layout the site passes work on.

The site passes transform and quantize tokens ``[..., N, C]`` (channels last). A 2-D convolution reads
``x`` ``[B, C, H, W]``; its pixels are its tokens:

    t = Reshape(Transpose(x, [0, 2, 3, 1]), [0, -1, C])            [B, H*W, C]

* A 1x1 convolution with unit strides and no padding is a linear on every pixel, ``y_t = t W[:, :, 0, 0]^T + b``:
  it becomes ``MatMul`` (+ ``Add`` of the bias) on ``t`` and the result goes back to ``[B, out, H, W]``. From then on
  it is a linear site like any other: centering, every output format.
* Any other ungrouped convolution keeps its kernel and reads the inverse view of ``t``,
  ``Transpose(Reshape(t, [B, H, W, C]), [0, 3, 1, 2])``, whose Reshape carries ``hadanorm.conv_view`` (the site
  passes find the site's input there: `graph_passes.graph_utils.site_input`). A channel transform
  ``x~ = H S^-1 x`` per pixel commutes with the convolution: ``conv(W, x) = conv(W~, x~)`` with
  ``W~[:, :, i, j] = W[:, :, i, j] S H^T`` at every tap (zero padding: ``H S^-1 0 = 0``); strides and dilations
  only choose pixels. Centering does not commute at the border of a padded kernel, so those sites are not centered
  (`ActivationSite.can_center`).

Without transforms or quantizers the graph computes exactly what it did (views are permutations).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes import tags
from graph_passes.graph_utils import (
    NodeSequence,
    add_initializer,
    drop_dead,
    redirect_uses,
    tagged_matmuls,
    tensor_name,
)
from graph_passes.linears import is_pointwise_conv



class ConvSitesPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        views: dict[tuple[int, str], tuple[ir.Value, ir.Value]] = {}  # (id(x), site) -> (tokens, NHWC shape)
        modified = False
        for site, nodes in tagged_matmuls(graph, tags.ROLE_MAIN).items():
            for conv in [n for n in nodes if n.op_type == "Conv"]:
                x = conv.inputs[0]
                key = (id(x), site)
                if key not in views:
                    views[key] = self._tokens(graph, conv, site)
                tokens, nhwc_shape = views[key]
                if is_pointwise_conv(conv):
                    self._as_matmul(graph, conv, tokens, nhwc_shape)
                else:
                    self._read_view(graph, conv, tokens, nhwc_shape, site)
                modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _tokens(graph: ir.Graph, conv: ir.Node, site: str) -> tuple[ir.Value, ir.Value]:
        x = conv.inputs[0]
        channels = int(conv.inputs[1].const_value.shape[1])
        seq = NodeSequence(f"{tensor_name(site)}.tokens")
        nhwc = seq.op("Transpose", [x], perm=[0, 2, 3, 1])
        shape = seq.op("Shape", [nhwc])
        target = add_initializer(graph, f"{tensor_name(site)}.token_shape", np.array([0, -1, channels], dtype=np.int64))
        tokens = seq.op("Reshape", [nhwc, target])
        tokens.type = x.type
        dims = x.shape.dims if x.shape is not None else None
        if dims is not None and len(dims) == 4:
            hw = dims[2] * dims[3] if isinstance(dims[2], int) and isinstance(dims[3], int) else None
            tokens.shape = ir.Shape([dims[0], hw, channels])
        graph.insert_before(conv, seq.nodes)
        return tokens, shape

    @staticmethod
    def _read_view(graph: ir.Graph, conv: ir.Node, tokens: ir.Value, nhwc_shape: ir.Value, site: str) -> None:
        name = tensor_name(conv.name or site)
        seq = NodeSequence(f"{name}.pixels")
        back = seq.op("Reshape", [tokens, nhwc_shape])
        seq.nodes[-1].metadata_props[tags.CONV_VIEW] = site
        nchw = seq.op("Transpose", [back], perm=[0, 3, 1, 2])
        nchw.type, nchw.shape = conv.inputs[0].type, conv.inputs[0].shape
        graph.insert_before(conv, seq.nodes)
        conv.replace_input_with(0, nchw)

    @staticmethod
    def _as_matmul(graph: ir.Graph, conv: ir.Node, tokens: ir.Value, nhwc_shape: ir.Value) -> None:
        weight = conv.inputs[1]
        w = weight.const_value.numpy()
        out_channels = int(w.shape[0])
        name = tensor_name(conv.name or weight.name or "conv")
        w_t = add_initializer(graph, f"{weight.name}.matmul", np.ascontiguousarray(w[:, :, 0, 0].T))
        matmul = ir.Node("", "MatMul", [tokens, w_t], name=conv.name, metadata_props=dict(conv.metadata_props))
        matmul.outputs[0].name = f"{name}.matmul_out"
        matmul.outputs[0].type = conv.outputs[0].type
        seq = NodeSequence(f"{name}.pixels_out")
        y = matmul.outputs[0]
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        extra = [matmul]
        if bias is not None:
            add = ir.Node("", "Add", [y, bias], name=f"{name}.bias")
            add.outputs[0].name = f"{name}.bias_out"
            extra.append(add)
            y = add.outputs[0]
        lead = seq.op("Slice", [nhwc_shape, add_initializer(graph, f"{name}.zero", np.array([0], np.int64)),
                                add_initializer(graph, f"{name}.three", np.array([3], np.int64))])
        out_shape = seq.op("Concat", [lead, add_initializer(graph, f"{name}.out_channels",
                                                            np.array([out_channels], np.int64))], axis=0)
        nchw = seq.op("Transpose", [seq.op("Reshape", [y, out_shape])], perm=[0, 3, 1, 2])
        graph.insert_before(conv, extra + seq.nodes)
        redirect_uses(conv.outputs[0], nchw, keep=seq.nodes)
        old_inputs = list(conv.inputs)
        graph.remove(conv, safe=True)
        for value in old_inputs[1:2]:
            drop_dead(graph, value)

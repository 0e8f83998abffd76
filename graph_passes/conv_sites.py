"""Conv sites in the token layout the site emitters work on (`graph_passes.emit`).

The emitters transform and quantize tokens ``[..., N, C]`` (channels last). A 2-D convolution reads
``x`` ``[B, C, H, W]``; its pixels are its tokens (`conv_tokens`, one view per site; `pixel_tokens` writes the view
for anything else that reads a conv input as tokens, such as calibration):

    t = Reshape(Transpose(x, [0, 2, 3, 1]), [0, -1, C])            [B, H*W, C]

* A 1x1 convolution with unit strides and no padding is a linear on every pixel, ``y_t = t W[:, :, 0, 0]^T + b``:
  it becomes ``MatMul`` (+ ``Add`` of the bias) on ``t`` and the result goes back to ``[B, out, H, W]``
  (`pointwise_matmul`). From then on it is a linear site like any other: centering, every output format.
* Any other ungrouped convolution keeps its kernel and reads the inverse view of the site's tokens,
  ``Transpose(Reshape(t~, [B, H, W, C]), [0, 3, 1, 2])`` (`read_view`). A channel transform ``x~ = H S^-1 x`` per
  pixel commutes with the convolution: ``conv(W, x) = conv(W~, x~)`` with ``W~[:, :, i, j] = W[:, :, i, j] S H^T``
  at every tap (zero padding: ``H S^-1 0 = 0``); strides and dilations only choose pixels. Centering does not
  commute at the border of a padded kernel, so those sites are not centered (`ActivationSite.can_center`).

Without transforms or quantizers the graph computes exactly what it did (views are permutations).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graph_passes.graph_utils import NodeSequence, add_initializer, drop_dead, redirect_uses, tensor_name


@dataclasses.dataclass(frozen=True)
class ConvTokens:
    """A conv site's pixels as tokens."""

    tokens: ir.Value  # [B, H*W, C]
    nhwc_shape: ir.Value  # the shape of the [B, H, W, C] view (the way back)


def pixel_tokens(seq: NodeSequence, x: ir.Value, token_shape: ir.Value,
                 with_shape: bool = False) -> tuple[ir.Value, ir.Value | None]:
    """``Reshape(Transpose(x, [0, 2, 3, 1]), token_shape)``: a ``[B, C, H, W]`` tensor's pixels as tokens (for a
    conv input `token_shape` holds ``[0, -1, C]``), appended to `seq`; with the ``[B, H, W, C]`` view's shape (the
    way back) when `with_shape`, else None."""
    nhwc = seq.op("Transpose", [x], perm=[0, 2, 3, 1])
    shape = seq.op("Shape", [nhwc]) if with_shape else None
    return seq.op("Reshape", [nhwc, token_shape]), shape


def conv_tokens(graph: ir.Graph, conv: ir.Node, site: str) -> ConvTokens:
    """The token view of `conv`'s input, inserted before `conv`."""
    x = conv.inputs[0]
    channels = int(conv.inputs[1].const_value.shape[1])
    seq = NodeSequence(f"{tensor_name(site)}.tokens")
    target = add_initializer(graph, f"{tensor_name(site)}.token_shape", np.array([0, -1, channels], dtype=np.int64))
    tokens, shape = pixel_tokens(seq, x, target, with_shape=True)
    tokens.type = x.type
    dims = x.shape.dims if x.shape is not None else None
    if dims is not None and len(dims) == 4:
        hw = dims[2] * dims[3] if isinstance(dims[2], int) and isinstance(dims[3], int) else None
        tokens.shape = ir.Shape([dims[0], hw, channels])
    graph.insert_before(conv, seq.nodes)
    return ConvTokens(tokens, shape)


def read_view(graph: ir.Graph, conv: ir.Node, tokens: ir.Value, view: ConvTokens, site: str) -> None:
    """Make the k x k `conv` read `tokens` (the site's transformed / quantized tokens) as ``[B, C, H, W]``."""
    seq = NodeSequence(f"{tensor_name(conv.name or site)}.pixels")
    nchw = seq.op("Transpose", [seq.op("Reshape", [tokens, view.nhwc_shape])], perm=[0, 3, 1, 2])
    nchw.type, nchw.shape = conv.inputs[0].type, conv.inputs[0].shape
    graph.insert_before(conv, seq.nodes)
    conv.replace_input_with(0, nchw)


def pointwise_matmul(graph: ir.Graph, conv: ir.Node, view: ConvTokens) -> tuple[ir.Node, ir.Node | None]:
    """Replace the 1x1 `conv` by ``MatMul(t, W[:, :, 0, 0]^T)`` (weight ``<W>.matmul``), its bias ``Add`` and the
    way back to ``[B, out, H, W]``; returns the MatMul and the bias Add (None without a bias)."""
    weight = conv.inputs[1]
    w = weight.const_value.numpy()
    name = tensor_name(conv.name or weight.name or "conv")
    w_t = add_initializer(graph, f"{weight.name}.matmul", np.ascontiguousarray(w[:, :, 0, 0].T))
    matmul = ir.Node("", "MatMul", [view.tokens, w_t], name=conv.name, metadata_props=dict(conv.metadata_props))
    matmul.outputs[0].name = f"{name}.matmul_out"
    matmul.outputs[0].type = conv.outputs[0].type
    y = matmul.outputs[0]
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    extra, add = [matmul], None
    if bias is not None:
        add = ir.Node("", "Add", [y, bias], name=f"{name}.bias")
        add.outputs[0].name = f"{name}.bias_out"
        extra.append(add)
        y = add.outputs[0]
    seq = NodeSequence(f"{name}.pixels_out")
    lead = seq.op("Slice", [view.nhwc_shape, add_initializer(graph, f"{name}.zero", np.array([0], np.int64)),
                            add_initializer(graph, f"{name}.three", np.array([3], np.int64))])
    out_shape = seq.op("Concat", [lead, add_initializer(graph, f"{name}.out_channels",
                                                        np.array([w.shape[0]], np.int64))], axis=0)
    nchw = seq.op("Transpose", [seq.op("Reshape", [y, out_shape])], perm=[0, 3, 1, 2])
    graph.insert_before(conv, extra + seq.nodes)
    redirect_uses(conv.outputs[0], nchw, keep=seq.nodes)
    graph.remove(conv, safe=True)
    drop_dead(graph, weight)
    return matmul, add

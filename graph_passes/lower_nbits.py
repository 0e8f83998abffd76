"""Pass: lower the ``qdq`` graph to the ``nbits`` format (stock onnxruntime, ``com.microsoft::MatMulNBits``).

Per site MatMul ``MatMul(DQ_act(x), DQ_w)``: ``MatMulNBits(DQ_act(x), B, scales[, zero_points])`` with
``bits`` 4 (weights of 2-4 bits) or 8 (5-8 bits), ``block_size`` the weight block (a power of two >= 16; a
single shorter block is zero-padded, as MatMulNBits pads K), ``accuracy_level = 4``: onnxruntime quantizes the
(already A-bit) activation rows to int8 per block of ``block_size`` inside and runs int8 dot products. The weight
integers and scales are the qdq graph's; ``B`` is ``[N, k_blocks, block_size * bits / 8]`` uint8, low nibble first,
unsigned with zero point 8 (4 bits) or 128 (8 bits) unless ``zero_points`` is given.

Centered sites in ``float-token`` mode: the float mean token ``mean~`` is appended to the activation rows of the
same MatMulNBits (one packed weight in memory, not two) and its output row is added to every token:
``y = Y[..., :N, :] + Y[..., N:, :]``; inside MatMulNBits the mean row is quantized to int8 per block (not to A
bits). ``exact`` mode keeps its int8 DequantizeLinear + MatMul. The activation quantizers stay Q/DQ, whatever
they are (per-token dynamic, static per-timestep, or followed by an HQ-DM back rotation: MatMulNBits reads the
float result and the unrotated int4 weight). Conv sites stay Q/DQ around a float Conv.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes import tags
from graph_passes.graph_utils import add_initializer, make_node, redirect_uses, shared_constant, tensor_name
from graph_passes.lowering import single_use, weight_codes, weight_dq
from graph_passes.methods import BiasCorrection

MS_DOMAIN = "com.microsoft"
ACCURACY_LEVEL = 4



def nbits_block_size(block: int, k: int) -> int:
    """MatMulNBits' block size for a qdq weight block (a single block shorter than 16 or not a power of two is
    padded to the next power of two)."""
    if block >= k:  # one block: pad
        size = 16
        while size < k:
            size *= 2
        return size
    if block < 16 or block & (block - 1):
        raise ValueError(f"--format nbits needs a power-of-two weight block >= 16, got {block}; "
                         "use --weight-block 128")
    return block


def pack_nbits(dq: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int, int, int]:
    """``(B, scales [N, k_blocks], zero_points | None, bits, block_size, K, N)`` for MatMulNBits."""
    q, scale, zp, block, bits = weight_codes(dq)
    k, n = q.shape
    size = nbits_block_size(block, k)
    signed = dq.inputs[0].dtype in (ir.DataType.INT4, ir.DataType.INT8)
    offset = (8 if bits == 4 else 128) if signed else 0
    default_zp = 8 if bits == 4 else 128
    k_blocks = scale.shape[0]
    zp_full = (np.full(scale.shape, default_zp, dtype=np.int64) if zp is None else zp + offset)
    u = np.repeat(zp_full, size, axis=0)  # padding rows hold the zero point
    u[:k] = q + offset
    u = u.T.reshape(n, k_blocks, size)  # [N, k_blocks, block]
    if bits == 4:
        b = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    else:
        b = u.astype(np.uint8)
    zero_points = None
    if zp is not None:
        z = zp_full.T  # [N, k_blocks]
        if bits == 4:
            if k_blocks % 2:
                z = np.concatenate([z, np.full((n, 1), default_zp, dtype=z.dtype)], axis=1)
            zero_points = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
        else:
            zero_points = z.astype(np.uint8)
    return b, np.ascontiguousarray(scale.T), zero_points, bits, size, k, n


class LowerToNBitsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        concats: dict[tuple[int, int], ir.Value] = {}
        modified = False
        for node in list(graph):
            if node.op_type != "MatMul" or tags.role_of(node) != tags.ROLE_MAIN:
                continue
            w_dq = weight_dq(node.inputs[1])
            if w_dq is None:  # not quantized
                continue
            self._lower(model, node, w_dq, concats)
            modified = True
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            graph.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=modified)

    def _lower(self, model: ir.Model, matmul: ir.Node, w_dq: ir.Node, concats: dict) -> None:
        graph = model.graph
        b, scales, zero_points, bits, size, k, n = pack_nbits(w_dq)
        base = tensor_name(w_dq.inputs[0].name or "w")
        dtype = w_dq.inputs[1].const_value.numpy().dtype
        inputs = [matmul.inputs[0], add_initializer(graph, f"{base}.nbits", b),
                  add_initializer(graph, f"{base}.nbits_scales", scales.astype(dtype))]
        if zero_points is not None:
            inputs.append(add_initializer(graph, f"{base}.nbits_zero_points", zero_points))
        out = matmul.outputs[0]
        correction = self._float_token_correction(out)
        extra: list[ir.Node] = []
        name = tensor_name(matmul.name)
        if correction is not None:
            add, mean = correction
            key = (id(matmul.inputs[0]), id(mean))
            if key not in concats:
                concat = make_node("Concat", [matmul.inputs[0], mean], f"{name}.with_mean", axis=-2)
                concat.outputs[0].type = matmul.inputs[0].type
                extra.append(concat)
                concats[key] = concat.outputs[0]
            inputs[0] = concats[key]
        node = make_node("MatMulNBits", inputs, f"{name}.nbits", domain=MS_DOMAIN,
                         metadata={tags.SITE: tags.site_of(matmul) or "", tags.ROLE: tags.ROLE_MAIN},
                         K=k, N=n, bits=bits, block_size=size, accuracy_level=ACCURACY_LEVEL)
        node.outputs[0].type = out.type
        extra.append(node)
        if correction is None:
            graph.insert_before(matmul, extra)
            redirect_uses(out, node.outputs[0], keep=extra)
            return
        axes = shared_constant(graph, "hadanorm.token_axis", np.array([-2], dtype=np.int64))
        start = shared_constant(graph, "hadanorm.zero", np.array([0], dtype=np.int64))
        last = shared_constant(graph, "hadanorm.minus_one", np.array([-1], dtype=np.int64))
        end = shared_constant(graph, "hadanorm.int64_max", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        tokens = make_node("Slice", [node.outputs[0], start, last, axes], f"{name}.tokens")
        mean_row = make_node("Slice", [node.outputs[0], last, end, axes], f"{name}.mean_row")
        total = make_node("Add", [tokens.outputs[0], mean_row.outputs[0]], f"{name}.add_mean")
        extra += [tokens, mean_row, total]
        graph.insert_before(matmul, extra)
        redirect_uses(add.outputs[0], total.outputs[0], keep=extra)

    @staticmethod
    def _float_token_correction(out: ir.Value) -> tuple[ir.Node, ir.Value] | None:
        """``(Add(out, MatMul(mean~, W)), mean~)`` for a float-token bias correction, else None."""
        add = single_use(out)
        if add is None or add.op_type != "Add":
            return None
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        correction = other.producer()
        if correction is None or tags.role_of(correction) != tags.ROLE_BIAS_CORRECTION:
            return None
        if correction.metadata_props.get(tags.BIAS_CORRECTION) != BiasCorrection.FLOAT_TOKEN.value:
            return None
        return add, correction.inputs[0]

"""The ``nbits`` format: stock onnxruntime's ``com.microsoft::MatMulNBits`` for every MatMul linear.

Per MatMul linear: ``MatMulNBits(r, B, scales[, zero_points])`` where ``r`` is what the ``qdq`` format's MatMul
reads (the A-bit QDQ activation: per-token dynamic, static per-timestep, or an HQ-DM back rotation of it) and
``B`` the plan's integers (the ``qdq`` format's, `graph_passes.site_plan`) with ``bits`` 4 (weights of 2-4 bits)
or 8 (5-8 bits), ``block_size`` the weight block (a power of two >= 16; a single shorter block is zero-padded, as
MatMulNBits pads K), ``accuracy_level = 4``: onnxruntime quantizes the (already A-bit) activation rows to int8 per
block of ``block_size`` inside and runs int8 dot products. ``B`` is ``[N, k_blocks, block_size * bits / 8]`` uint8,
low nibble first, unsigned with zero point 8 (4 bits) or 128 (8 bits) unless ``zero_points`` is given.

Centered sites in ``float-token`` mode: the float mean token ``mu~`` is appended to the activation rows of the same
MatMulNBits (one packed weight in memory, not two) and its output row is added to every token:
``y = Y[..., :N, :] + Y[..., N:, :]``; inside MatMulNBits the mean row is quantized to int8 per block (not to A
bits). ``exact`` mode keeps its int8 ``DequantizeLinear`` + MatMul; ``quantized-token`` its Slice / Add. k x k conv
sites are written as in ``qdq`` (Q/DQ around a float Conv).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.bias_correction import add_mean_product, add_mean_row
from graph_passes.emit import MatMulSlot, SiteInput
from graph_passes.emit_qdq import QdqEmitter
from graph_passes.graph_utils import add_initializer, make_node, redirect_uses, tensor_name
from graph_passes.methods import BiasCorrection
from graph_passes.quantization import QuantizedWeight
from graph_passes.site_plan import LinearPlan, SitePlan, WeightPlan

MS_DOMAIN = "com.microsoft"
ACCURACY_LEVEL = 4


def nbits_block_size(block: int, k: int) -> int:
    """MatMulNBits' block size for a weight block (a single block shorter than 16 or not a power of two is padded
    to the next power of two)."""
    if block >= k:  # one block: pad
        size = 16
        while size < k:
            size *= 2
        return size
    if block < 16 or block & (block - 1):
        raise ValueError(f"--format nbits needs a power-of-two weight block >= 16, got {block}; "
                         "use --weight-block 128")
    return block


def pack_nbits(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int, int, int]:
    """``(B, scales [N, k_blocks], zero_points | None, bits, block_size, K, N)`` for MatMulNBits."""
    q = qw.q.astype(np.int64)
    zp = None if qw.zero_point is None else qw.zero_point.astype(np.int64)
    bits = 4 if qw.bits <= 4 else 8
    k, n = q.shape
    size = nbits_block_size(qw.block, k)
    default_zp = 8 if bits == 4 else 128
    offset = default_zp if qw.symmetric else 0
    k_blocks = qw.scale.shape[0]
    zp_full = np.full(qw.scale.shape, default_zp, dtype=np.int64) if zp is None else zp + offset
    u = np.repeat(zp_full, size, axis=0)  # padding rows hold the zero point
    u[:k] = q + offset
    u = u.T.reshape(n, k_blocks, size)  # [N, k_blocks, block]
    b = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else u.astype(np.uint8)
    zero_points = None
    if zp is not None:
        z = zp_full.T  # [N, k_blocks]
        if bits == 4:
            if k_blocks % 2:
                z = np.concatenate([z, np.full((n, 1), default_zp, dtype=z.dtype)], axis=1)
            zero_points = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
        else:
            zero_points = z.astype(np.uint8)
    return b, np.ascontiguousarray(qw.scale.T), zero_points, bits, size, k, n


class NBitsEmitter(QdqEmitter):
    def start(self) -> None:
        super().start()
        self.with_mean: dict[tuple[int, int], ir.Value] = {}  # (id(r), id(mu~)) -> Concat([r, mu~])

    def _packed(self, plan: SitePlan, weight: WeightPlan, node: ir.Node) -> tuple[list[ir.Value], dict]:
        key = ("nbits", id(weight))
        if key not in self.weights:
            qw = weight.quantized
            b, scales, zero_points, bits, size, k, n = pack_nbits(qw)
            base = tensor_name(f"{self.weight_name(plan, weight, node)}.q{qw.bits}")
            inputs = [add_initializer(self.graph, f"{base}.nbits", b),
                      add_initializer(self.graph, f"{base}.nbits_scales", scales.astype(qw.scale.dtype))]
            if zero_points is not None:
                inputs.append(add_initializer(self.graph, f"{base}.nbits_zero_points", zero_points))
            self.weights[key] = (inputs, {"K": k, "N": n, "bits": bits, "block_size": size})
        return self.weights[key]

    def matmul(self, plan: SitePlan, i: int, lp: LinearPlan, slot: MatMulSlot, site_in: SiteInput) -> None:
        graph, node = self.graph, slot.node
        self.model.opset_imports.setdefault(MS_DOMAIN, 1)
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
        weights, attributes = self._packed(plan, lp.weight, node)
        name, out, mode, read = tensor_name(node.name), node.outputs[0], plan.bias_correction, site_in.read
        extra: list[ir.Node] = []
        if mode is BiasCorrection.FLOAT_TOKEN:  # the mean token as one more row of the same MatMulNBits
            key = (id(read), id(site_in.mean))
            if key not in self.with_mean:
                concat = make_node("Concat", [read, site_in.mean], f"{name}.with_mean", axis=-2)
                concat.outputs[0].type = read.type
                extra.append(concat)
                self.with_mean[key] = concat.outputs[0]
            read = self.with_mean[key]
        nbits = make_node("MatMulNBits", [read, *weights], f"{name}.nbits", domain=MS_DOMAIN, **attributes,
                          accuracy_level=ACCURACY_LEVEL)
        nbits.outputs[0].type = out.type
        extra.append(nbits)
        if mode is BiasCorrection.FLOAT_TOKEN:
            extra += add_mean_row(graph, nbits.outputs[0], name, mean="mean_row")
        elif mode is BiasCorrection.QUANTIZED_TOKEN:
            extra += add_mean_row(graph, nbits.outputs[0], f"{tensor_name(plan.name)}.{i}")
        elif mode is BiasCorrection.EXACT:
            int8 = self.correction_weight(plan, lp.weight, None, node)
            extra += add_mean_product(nbits.outputs[0], site_in.mean, int8, f"{tensor_name(plan.name)}.{i}")
        graph.insert_before(node, extra)
        redirect_uses(out, extra[-1].outputs[0], keep=extra)
        graph.remove(node, safe=True)

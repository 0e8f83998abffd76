"""Pass: ``*ScaleQuantize(Add(Mul(x, x_scale), x_shift), ...)`` becomes one ``Modulate*ScaleQuantize(x, ...,
x_scale, x_shift)`` (`graph_passes.int_ops`).

What: a DiT block modulates each normalized activation before its linears (adaLN: ``x * (1 + scale) + shift``, one
row of ``scale`` and ``shift`` per batch element); in the ``fused`` format the modulated activation is read only by
the quantize op of the linears' site. The op now reads ``x``, ``x_scale`` and ``x_shift`` and forms
``x * x_scale + x_shift`` itself, token by token in the core's cache (and channel block by channel block for the
token mean), instead of onnxruntime's ``Mul`` and ``Add`` each re-reading and re-writing the whole ``[B, N, d]``
activation. The maths is the graph's: the op's function body is that ``Mul`` and ``Add``, then the quantize op's
body; the kernel rounds the product, then the sum, as those ops do (the same bits as the unfused graph).

Matched from graph structure only: the quantize op (one with a ``mul`` input: ``ScaleQuantize``,
``ScaleRotateQuantize``, ``CenterScaleQuantize``, ``CenterScaleRotateQuantize``) reads an ``Add`` whose other input
is ``x_shift``, the ``Add`` reads a ``Mul`` of ``x`` (the quantize op's shape) and ``x_scale``; ``x_scale`` and
``x_shift`` have shape ``[d]`` or ``[..., 1, d]`` with ``x``'s leading dimensions; the ``Mul``'s and the ``Add``'s
outputs are read only there and are not graph outputs; everything float32 with known shapes. Anything else stays.

Why: in PixArt-Sigma's ``fused`` graph at 256 px, the modulation before the self-attention and the feed-forward
was a ``Mul`` and an ``Add`` of about 0.08 and 0.12 ms each per block (2 threads), 0.4 ms of a block's 15 ms. One
site alone, one thread (`python benchmarks/bench_ops_ab.py modulate LIB`, [2, 256, 1152], block Hadamard): 0.79 ->
0.65 ms (unfused -> fused, busy host).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from graph_passes.domain import HADANORM_DOMAIN
from graph_passes.function_ops import ensure_function
from graph_passes.graph_utils import is_row_of, is_standard_binary, known_dims, only_reader, redirect_uses
from graph_passes.hadanorm_ops import TransformOp
from graph_passes.int_ops import QuantizeOp

logger = logging.getLogger(__name__)

_SCALE_QUANTIZE_OPS = {QuantizeOp(TransformOp(c, r)).op_type: TransformOp(c, r) for c in (False, True)
                       for r in (False, True)}


def _row_shaped(value: ir.Value | None, x_dims: tuple) -> bool:
    """[d], or [..., 1, d] with x's leading dimensions (the kernel's two layouts of x_scale and x_shift)."""
    return value is not None and value.dtype == ir.DataType.FLOAT and is_row_of(known_dims(value), x_dims)


def _modulation(quantize: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value, list[ir.Node]] | None:
    """(x, x_scale, x_shift, the Mul and Add) when `quantize` reads a modulation, else None."""
    modulated = quantize.inputs[0]
    add = modulated.producer() if modulated is not None else None
    x_dims = known_dims(modulated)
    if not is_standard_binary(add, "Add") or x_dims is None or modulated.dtype != ir.DataType.FLOAT:
        return None
    if only_reader(modulated) is not quantize:
        return None
    for mul_input, shift in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        mul = mul_input.producer() if mul_input is not None else None
        if not is_standard_binary(mul, "Mul") or only_reader(mul_input) is not add or not _row_shaped(shift, x_dims):
            continue
        for x, scale in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
            if known_dims(x) == x_dims and x.dtype == ir.DataType.FLOAT and _row_shaped(scale, x_dims):
                return x, scale, shift, [add, mul]
    return None


class FuseModulationPass(ir.passes.InPlacePass):
    """Fuse the adaLN modulation ``x * x_scale + x_shift`` into the quantize op that reads it (main graph)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fused = 0
        for node in list(graph):
            transform = _SCALE_QUANTIZE_OPS.get(node.op_type) if node.domain == HADANORM_DOMAIN else None
            if transform is None:
                continue
            found = _modulation(node)
            if found is None:
                continue
            x, scale, shift, removed = found
            spec = QuantizeOp(transform, modulate=True)
            ensure_function(model, spec)
            new = ir.Node(HADANORM_DOMAIN, spec.op_type, [x, *node.inputs[1:], scale, shift],
                          attributes=list(node.attributes.values()), num_outputs=len(node.outputs))
            graph.insert_after(node, new)
            names = [value.name for value in node.outputs]
            for old, replacement in zip(node.outputs, new.outputs):
                redirect_uses(old, replacement)
            node_name = node.name
            graph.remove([node, *removed], safe=True)
            new.name = node_name  # the site's node keeps its name (names end in the linear's module path)
            for value, name in zip(new.outputs, names):
                value.name = name
            fused += 1
        if fused:
            logger.info("fused %d modulations into their quantize ops", fused)
        return ir.passes.PassResult(model, modified=fused > 0)

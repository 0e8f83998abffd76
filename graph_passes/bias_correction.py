"""Pass (d): add the bias correction ``W mu`` to every centered site.

After centering, a site's MatMul computes ``x~ W~^T = (x - mu) W^T``; the output needs ``+ mu W^T`` back. The op's
second output is the transformed mean token ``mu~ = mu S^-1 H^T`` and ``mu~ W~^T = mu W^T``. Three ways:

* ``quantized-token`` (the paper): ``Concat([x~, mu~], axis=-2)`` goes through the MatMul (and later its activation
  quantizer) as one more token; ``y = y_all[..., :N, :] + y_all[..., N:, :]``.
* ``float-token``: ``y = MatMul(x~, W~) + MatMul(mu~, W~)``; the second MatMul keeps ``mu~`` in float and later reads
  the same dequantized weight (no extra weights).
* ``exact``: like float-token, but the quantize pass gives the correction MatMul an int8 per-output-channel copy of
  ``W~`` (extra bytes, reported).

Without quantization all three equal the original linear exactly.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes import tags
from graph_passes.graph_utils import make_node, redirect_uses, shared_constant, tagged_matmuls, tensor_name
from graph_passes.methods import BiasCorrection
from graph_passes.domain import HADANORM_DOMAIN


class BiasCorrectionPass(ir.passes.InPlacePass):
    def __init__(self, mode: BiasCorrection):
        super().__init__()
        self.mode = mode

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for site, matmuls in tagged_matmuls(graph, tags.ROLE_MAIN).items():
            transform = matmuls[0].inputs[0].producer()
            if transform is None or transform.domain != HADANORM_DOMAIN or len(transform.outputs) < 2:
                continue
            name = tensor_name(site)
            mean_token = transform.outputs[1]
            if self.mode is BiasCorrection.QUANTIZED_TOKEN:
                tokens = make_node("Concat", [transform.outputs[0], mean_token], f"{name}.with_mean", axis=-2)
                tokens.outputs[0].type = transform.outputs[0].type  # the quantizer reads its dtype (fp16 graphs)
                graph.insert_after(transform, tokens)
            for i, matmul in enumerate(matmuls):
                matmul.metadata_props[tags.BIAS_CORRECTION] = self.mode.value
                out = matmul.outputs[0]
                if self.mode is BiasCorrection.QUANTIZED_TOKEN:
                    matmul.replace_input_with(0, tokens.outputs[0])
                    new = self._split_and_add(graph, out, f"{name}.{i}")
                else:
                    correction = make_node("MatMul", [mean_token, matmul.inputs[1]], f"{name}.{i}.mean_matmul",
                                           metadata={tags.SITE: site, tags.ROLE: tags.ROLE_BIAS_CORRECTION,
                                                     tags.BIAS_CORRECTION: self.mode.value})
                    add = make_node("Add", [out, correction.outputs[0]], f"{name}.{i}.add_mean")
                    new = [correction, add]
                redirect_uses(out, new[-1].outputs[0], keep=new)
                if self.mode is BiasCorrection.QUANTIZED_TOKEN:
                    out.shape = None  # now N + 1 tokens
                graph.insert_after(matmul, new)
                modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _split_and_add(graph: ir.Graph, out: ir.Value, name: str) -> list[ir.Node]:
        axes = shared_constant(graph, "hadanorm.token_axis", np.array([-2], dtype=np.int64))
        start = shared_constant(graph, "hadanorm.zero", np.array([0], dtype=np.int64))
        last = shared_constant(graph, "hadanorm.minus_one", np.array([-1], dtype=np.int64))
        end = shared_constant(graph, "hadanorm.int64_max", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        tokens = make_node("Slice", [out, start, last, axes], f"{name}.tokens")
        mean = make_node("Slice", [out, last, end, axes], f"{name}.mean")
        add = make_node("Add", [tokens.outputs[0], mean.outputs[0]], f"{name}.add_mean")
        return [tokens, mean, add]

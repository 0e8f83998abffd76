"""Hand a model to onnx's C++ tools (shape inference, the version converter) without copying its weights.

Those tools take a ``ModelProto``; serializing a 600M-parameter transformer would copy 2.4 GB (and for weights kept
in an external data file, read them all). Inside `weights_left_out(model)` every initializer over `limit` bytes (and
every external one) holds a placeholder: an external-data reference to a file that does not exist, with the
tensor's dtype and shape but no data. ``ir.to_proto(model)`` is then as small as the graph itself, and a model read
back from the tools' output gets its weights back with `restore_weights` (by initializer name; the tensors are the
same objects, so lazily loaded external weights stay on disk).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx_ir as ir

PLACEHOLDER_LOCATION = "hn-export-weight-placeholder.bin"  # never written or read
SMALL_TENSOR_BYTES = 1024  # shape and axes constants stay inline: shape inference reads them


@contextlib.contextmanager
def weights_left_out(model: ir.Model, limit: int = SMALL_TENSOR_BYTES) -> Iterator[dict[str, ir.TensorProtocol]]:
    """Within the block the model's large initializers (all graphs) are placeholders; yields name -> real tensor.

    The model is restored on leaving the block, whether or not the block raised.
    """
    saved: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or not (isinstance(tensor, ir.ExternalTensor) or tensor.nbytes > limit):
                    continue
                saved.append((value, tensor))
                value.const_value = ir.ExternalTensor(
                    PLACEHOLDER_LOCATION, offset=0, length=tensor.nbytes, dtype=tensor.dtype,
                    shape=ir.Shape(tensor.shape), name=value.name or "",
                )
        yield {value.name or "": tensor for value, tensor in saved}
    finally:
        for value, tensor in saved:
            value.const_value = tensor


def restore_weights(model: ir.Model, weights: dict[str, ir.TensorProtocol]) -> list[str]:
    """Put the real tensors back into a model read from a tool's output; returns placeholders left unmatched."""
    missing = []
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if name in weights:
                value.const_value = weights[name]
            elif isinstance(tensor, ir.ExternalTensor) and str(tensor.location) == PLACEHOLDER_LOCATION:
                missing.append(name)
    return missing

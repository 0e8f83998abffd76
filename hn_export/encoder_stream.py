"""The T5 text encoder exported from its checkpoint one tensor at a time: what lets the bundle command write
PixArt-Sigma's full T5-XXL encoder (4.76 B parameters, 19 GB in float32) on a 24 GB machine.

The loaded path (`hn_export.bundle_components.text_encoder_graph` on a ``T5EncoderModel``, then onnxruntime's
``MatMulNBitsQuantizer`` on the serialized proto) holds the float32 weights three times (the torch module, the
graph, the proto). Here nothing holds more than a few weight tensors:

1. the encoder's module is built on torch's ``meta`` device from ``text_encoder/config.json`` (no weights) and
   exported by the same exporter, without its optimizer (constant folding would read the weights);
2. every parameter initializer becomes an ``onnx_ir.LazyTensor`` that reads its tensor from the checkpoint's
   safetensors when the graph is saved (`CheckpointTensors`; bfloat16 / float16 checkpoints are widened to
   float32); a ``Transpose`` of a parameter (``nn.Linear``'s ``x W^T``) is folded into the lazy tensor, as the
   optimizer would fold it; then the exporter's optimizer runs on the lazy graph (its pattern matcher reads a few
   weights, the layer norms' and the attention projections', one at a time and never kept);
3. `nbits_weights` replaces every ``MatMul`` by a constant 2-D weight with ``com.microsoft.MatMulNBits`` exactly
   as ``MatMulNBitsQuantizer`` writes it (the same node, names and attributes; the packed weight and scales from
   its own block quantizer, ``DefaultWeightOnlyQuantizer.qbits_block_quant``, so the bytes are the same), the
   packed tensors lazy again;
4. ``onnx_ir`` saves the initializers to the external data file one by one (its writer evaluates each lazy tensor,
   writes it and drops it).

Peak memory: the largest few tensors (T5-XXL: the 32128 x 4096 embedding, 0.5 GB) plus the graph.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from hn_export.errors import UserError

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_WRAPPER_PREFIX = "encoder."  # the exported module wraps T5EncoderModel as `.encoder`
# T5EncoderModel's encoder.embed_tokens is its `shared` embedding: checkpoints store one of the two names.
_TIED = {"encoder.embed_tokens.weight": "shared.weight", "shared.weight": "encoder.embed_tokens.weight"}


class CheckpointTensors:
    """The tensors of a safetensors checkpoint folder (``model.safetensors`` or a sharded
    ``model.safetensors.index.json``), read one at a time as float32 numpy arrays."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{index} is not a safetensors index (no weight_map)",
                                "re-save the text encoder with save_pretrained") from None
            if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
                raise UserError(f"{index} is not a safetensors index (weight_map is not names of shard files)",
                                "re-save the text encoder with save_pretrained")
            outside = sorted(n for n in set(weight_map.values()) if Path(n).name != n or n.startswith("."))
            if outside:
                raise UserError(f"{index} names shard {outside[0]!r} outside its folder",
                                "use the checkpoint's own index (shards are plain file names beside it)")
            self.files = {key: self.folder / name for key, name in weight_map.items()}
        elif single.is_file():
            self.files = {key: single for key in _keys(single)}
        else:
            raise UserError(f"{self.folder} has no model.safetensors or model.safetensors.index.json",
                            "save the text encoder with save_pretrained(safe_serialization=True)")
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise UserError(f"the text encoder's shard {missing[0]} is missing", "copy the whole checkpoint folder")

    def key_of(self, name: str) -> str | None:
        """The checkpoint key of the parameter `name` (a state-dict key of T5EncoderModel), tied names resolved."""
        if name in self.files:
            return name
        tied = _TIED.get(name)
        return tied if tied in self.files else None

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.files[key]), "pt") as handle:
                sl = handle.get_slice(key)
                return tuple(sl.get_shape()), sl.get_dtype()
        except Exception as exc:  # safetensors raises its own error types for a bad header or a short file
            raise _unreadable(self.files[key], exc) from None

    def read(self, key: str) -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(str(self.files[key]), "pt") as handle:
            tensor = handle.get_tensor(key)
        return tensor.to(torch.float32).numpy()


def _unreadable(path: Path, exc: Exception) -> UserError:
    first = " ".join(str(exc).split())[:200]
    return UserError(f"cannot read the text encoder's weights in {path} ({type(exc).__name__}: {first})",
                     "check that the checkpoint folder is complete (re-copy it)")


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for a bad header or a short file
        raise _unreadable(path, exc) from None


def _lazy(name: str, shape: tuple[int, ...], make: Callable[[], np.ndarray]) -> ir.LazyTensor:
    return ir.LazyTensor(lambda: ir.tensor(make(), name=name), ir.DataType.FLOAT, ir.Shape(shape), name=name)


def _is_plain_transpose(node: ir.Node, rank: int) -> bool:
    perm = node.attributes.get("perm")
    return perm is None or list(perm.as_ints()) == list(range(rank))[::-1]


def stream_text_encoder_graph(folder: Path, subfolder: str = "text_encoder") -> ir.Model:
    """The T5 text encoder of pipeline folder `folder` (``SUBFOLDER/config.json`` + safetensors; SD3's is
    ``text_encoder_3``) as the graph `hn_export.bundle_components.text_encoder_graph` writes, its weights lazy (read
    when the graph is saved)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from hn_export.bundle_components import text_encoder_graph

    source = Path(folder) / subfolder
    tensors = CheckpointTensors(source)
    try:
        config = T5Config.from_pretrained(source, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad config
        raise UserError(f"cannot read the text encoder's config in {source} ({type(exc).__name__})",
                        "pass a pipeline folder whose text_encoder/ holds a T5 config.json") from None
    with torch.device("meta"):
        module = T5EncoderModel(config).eval()
    model = text_encoder_graph(module, optimize=False)
    graph = model.graph
    streamed = 0
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        raw = getattr(tensor, "raw", None)
        if not (isinstance(raw, torch.Tensor) and raw.is_meta):  # a parameter of the meta module
            continue
        key = tensors.key_of(value.name[len(_WRAPPER_PREFIX):]) if value.name.startswith(_WRAPPER_PREFIX) else None
        if key is None:
            raise UserError(f"the text encoder's checkpoint in {source} has no tensor for parameter "
                            f"{value.name[len(_WRAPPER_PREFIX):]}", "pass a complete T5 encoder checkpoint")
        shape, _ = tensors.shape_dtype(key)
        if tuple(value.shape.dims) != shape:
            raise UserError(f"the text encoder's {key} is {list(shape)} in {source}, its config says "
                            f"{list(value.shape.dims)}", "pass a checkpoint that matches its config.json")
        read = functools.partial(tensors.read, key)
        uses = list(value.uses())
        if uses and all(u.node.op_type == "Transpose" and _is_plain_transpose(u.node, len(shape)) for u in uses):
            transposed = ir.Value(name=f"{value.name}_transposed", shape=ir.Shape(shape[::-1]), type=value.type)
            transposed.const_value = _lazy(transposed.name, shape[::-1], lambda read=read: read().T.copy())
            graph.register_initializer(transposed)
            for use in uses:
                out = use.node.outputs[0]
                out.replace_all_uses_with(transposed)
                if out in graph.outputs:
                    raise UserError("the text encoder graph outputs a transposed weight", "report this model")
                graph.remove(use.node, safe=True)
            graph.initializers.pop(value.name)
        else:
            value.const_value = _lazy(value.name, shape, read)
        streamed += 1
    from onnxscript import optimizer

    optimizer.optimize(model)  # reads a few weights to match its patterns (never caches one: LazyTensor)
    logger.info("text encoder: %d weight tensors streamed from %s", streamed, source)
    return model


class _PackedPair:
    """One weight's packed codes (0) and scales (1), quantized when the first is read and dropped once both have
    been: the writer holds one weight's pair at a time (a cache per weight would keep every pair until the save
    ends: 4.7 GB for T5-XXL at int8)."""

    def __init__(self, quantize: Callable[[], tuple[np.ndarray, np.ndarray]]):
        self._quantize = quantize
        self._pair: tuple[np.ndarray, np.ndarray] | None = None
        self._left: set[int] = set()

    def take(self, index: int) -> np.ndarray:
        if self._pair is None:
            self._pair, self._left = self._quantize(), {0, 1}
        value = self._pair[index]
        self._left.discard(index)
        if not self._left:
            self._pair = None
        return value


def nbits_weights(model: ir.Model, bits: int, block_size: int) -> ir.Model:
    """Every ``MatMul`` whose second input is a constant 2-D float weight (lazy or not) becomes
    ``com.microsoft.MatMulNBits`` (symmetric blocks of `block_size` along K): the node ``MatMulNBitsQuantizer``
    writes, with its quantizer's packed weight ``<W>_Q<bits>`` [N, K / block, block * bits / 8] and scales
    ``<W>_scales`` [N, K / block], both lazy (one weight quantized at a time, `_PackedPair`)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                DefaultWeightOnlyQuantizer)

    from hn_export.bundle_components import check_encoder_options

    check_encoder_options(bits, block_size)
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                                                        bits=bits))
    graph = model.graph
    done = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[1]
        if weight is None or not weight.is_initializer() or weight.const_value is None:
            continue
        if weight.const_value.dtype != ir.DataType.FLOAT or len(weight.const_value.shape) != 2:
            continue
        rows, cols = (int(d) for d in weight.const_value.shape)
        source = weight.const_value

        pair = _PackedPair(lambda source=source: quantizer.qbits_block_quant(
            source.numpy().astype(np.float32, copy=False))[:2])

        k_blocks = (rows + block_size - 1) // block_size
        blob = (block_size * bits + 7) // 8
        q = ir.Value(name=f"{weight.name}_Q{bits}", shape=ir.Shape((cols, k_blocks, blob)),
                     type=ir.TensorType(ir.DataType.UINT8))
        q.const_value = ir.LazyTensor(lambda n=q.name, pair=pair: ir.tensor(pair.take(0), name=n), ir.DataType.UINT8,
                                      ir.Shape((cols, k_blocks, blob)), name=q.name)
        s = ir.Value(name=f"{weight.name}_scales", shape=ir.Shape((cols, k_blocks)),
                     type=ir.TensorType(ir.DataType.FLOAT))
        s.const_value = ir.LazyTensor(lambda n=s.name, pair=pair: ir.tensor(pair.take(1), name=n), ir.DataType.FLOAT,
                                      ir.Shape((cols, k_blocks)), name=s.name)
        graph.register_initializer(q)
        graph.register_initializer(s)
        replacement = ir.node("MatMulNBits", [node.inputs[0], q, s], domain=MS_DOMAIN,
                              attributes={"K": rows, "N": cols, "bits": bits, "block_size": block_size},
                              name=f"{node.name}_Q{bits}" if node.name else "", num_outputs=1)
        replacement.outputs[0].name = node.outputs[0].name
        replacement.outputs[0].shape, replacement.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], node.outputs,
                                                replacement.outputs)
        if not weight.uses():
            graph.initializers.pop(weight.name)
        done += 1
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    logger.info("text encoder: %d MatMuls as MatMulNBits int%d (block %d, streamed)", done, bits, block_size)
    return model

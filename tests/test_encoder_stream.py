"""The text encoder streamed from its safetensors (`hn_export.encoder_stream`) against the loaded path
(`text_encoder_graph` on the torch module + onnxruntime's ``MatMulNBitsQuantizer``), the per-layer seeded writer of
the full-size presets (`models.pipelines.write_text_encoder_per_layer`), laziness (the embedding and the feed-forward
weights, most of the bytes, untouched until the save; each tensor read once by it), and bad checkpoint files."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from hn_export import encoder_stream  # noqa: E402
from hn_export.bundle import _load_text_encoder  # noqa: E402
from hn_export.bundle_components import quantize_weights, text_encoder_graph  # noqa: E402
from hn_export.encoder_stream import nbits_weights, stream_text_encoder_graph  # noqa: E402
from hn_export.model_files import load_model, save_model  # noqa: E402
from runtime.session import create_session  # noqa: E402


@pytest.fixture(scope="module")
def per_layer_pipeline(tmp_path_factory) -> Path:
    """The tiny pipeline with a 3-layer encoder written a layer at a time (as the full T5-XXL presets are)."""
    import models.pipelines as mp

    name = "tiny-per-layer-test"
    preset = dataclasses.replace(mp.PIPELINE_PRESETS["tiny"], encoder_per_layer=True,
                                 text_encoder={**mp.TINY_T5, "num_layers": 3})
    mp.PIPELINE_PRESETS[name] = preset
    try:
        return mp.write_pipeline_folder(name, tmp_path_factory.mktemp("pl") / "pipeline", seed=0)
    finally:
        del mp.PIPELINE_PRESETS[name]


def _feeds() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(3, 190, (2, 23), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(model: ir.Model, path: Path) -> np.ndarray:
    save_model(model, path)
    return create_session(path).run(None, _feeds())[0]


def _nbits_tensors(path: Path) -> list[bytes]:
    model = load_model(path)
    weights = []
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            weights.append(node.inputs[1].const_value.numpy().tobytes() + node.inputs[2].const_value.numpy().tobytes())
    return sorted(weights)


def test_per_layer_folder_layout_and_init(per_layer_pipeline):
    """Sharded safetensors a layer each, readable by transformers; T5's initialisation (std of q = (d_model
    d_kv)^-1/2, of wo = d_ff^-1/2, norms 1) in every layer, the layers different."""
    from transformers import T5EncoderModel

    folder = per_layer_pipeline / "text_encoder"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert json.loads((per_layer_pipeline / "model_index.json").read_text())["text_encoder"] == [
        "transformers", "T5EncoderModel"]
    model = T5EncoderModel.from_pretrained(folder, local_files_only=True)
    q = [model.encoder.block[k].layer[0].SelfAttention.q.weight.detach().numpy() for k in range(3)]
    wo = model.encoder.block[2].layer[1].DenseReluDense.wo.weight.detach().numpy()
    assert all(abs(w.std() - (32 * 8) ** -0.5) < 0.2 * (32 * 8) ** -0.5 for w in q)  # 1024 samples each
    assert abs(wo.std() - 64 ** -0.5) < 0.15 * 64 ** -0.5
    assert not np.array_equal(q[1], q[2])
    assert np.all(model.encoder.block[1].layer[0].layer_norm.weight.detach().numpy() == 1.0)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_streamed_equals_loaded(per_layer_pipeline, tmp_path, bits):
    """The same outputs as the loaded path (bit for bit) and, quantized, the same MatMulNBits weights and scales."""
    loaded = text_encoder_graph(_load_text_encoder(per_layer_pipeline))
    streamed = stream_text_encoder_graph(per_layer_pipeline)
    if bits is not None:
        save_model(loaded, tmp_path / "fp.onnx")
        loaded = quantize_weights(load_model(tmp_path / "fp.onnx"), bits)
        streamed = nbits_weights(streamed, bits, 128)
    want = _run(loaded, tmp_path / "loaded.onnx")
    got = _run(streamed, tmp_path / "streamed.onnx")
    assert np.array_equal(got, want)
    if bits is not None:
        assert sum(n.op_type == "MatMulNBits" for n in load_model(tmp_path / "streamed.onnx").graph) == 3 * 7
        assert _nbits_tensors(tmp_path / "streamed.onnx") == _nbits_tensors(tmp_path / "loaded.onnx")


def test_weights_read_when_saved_once_each(per_layer_pipeline, tmp_path, monkeypatch):
    reads: list[str] = []
    original = encoder_stream.CheckpointTensors.read

    def counting(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(encoder_stream.CheckpointTensors, "read", counting)
    model = nbits_weights(stream_text_encoder_graph(per_layer_pipeline), 8, 128)
    # the optimizer's pattern matcher reads some while building (none is kept: LazyTensor without cache)
    assert not any("DenseReluDense" in key or "shared" in key for key in reads), reads
    reads.clear()
    save_model(model, tmp_path / "enc.onnx")
    weights = json.loads((per_layer_pipeline / "text_encoder" / "model.safetensors.index.json").read_text())
    assert len(reads) == len(set(reads))  # once each (a weight's packed bytes and scales share one read)
    # every tensor but the layer norms the optimizer merged into one (seeded: all ones, equal initializers)
    unread = set(weights["weight_map"]) - set(reads)
    assert unread and all("layer_norm" in key for key in unread), unread


def test_bad_encoder_files(per_layer_pipeline, tmp_path, hn_cli):
    missing = tmp_path / "missing"
    shutil.copytree(per_layer_pipeline, missing)
    (missing / "text_encoder" / "model-00002-of-00003.safetensors").unlink()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(per_layer_pipeline, corrupt)
    (corrupt / "text_encoder" / "model-00003-of-00003.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}")
    escaping = tmp_path / "escaping"
    shutil.copytree(per_layer_pipeline, escaping)
    index_path = escaping / "text_encoder" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["shared.weight"] = "../../corrupt/text_encoder/model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    cases = {missing: "the text encoder's shard", corrupt: "cannot read the text encoder's weights in",
             escaping: "names shard '../../corrupt/text_encoder/model-00001-of-00003.safetensors' outside its folder"}
    for folder, message in cases.items():
        out = tmp_path / f"out-{folder.name}"
        result = hn_cli("bundle", "--checkpoint", folder, "-o", out, "--no-progress", "--no-quantize")
        lines = result.err.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (folder.name, lines)
        assert not out.exists()

"""Exports at a latent (height, width) other than the model's own square size (`export_transformer(latent_hw=...)`,
`ModelFamily.example_inputs_at`): PixArt traces any size made of patches and matches torch at it; PixArt-Alpha's
resolution conditions follow the size; the other families refuse anything but their own size; bad sizes are one
line (`ModelInputError`)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from hn_export.export import export_transformer, to_onnx
from models.build import ModelSource, build_transformer
from models.errors import ModelInputError
from models.families import FAMILIES


@pytest.fixture(scope="module")
def tiny_model():
    return build_transformer(ModelSource(preset="tiny", seed=0))


def test_pixart_non_square_export_matches_torch(tiny_model, tmp_path):
    """The tiny PixArt-Sigma (own latent 8 x 8) traced at latent 4 high x 8 wide: the graph's hidden_states and
    sample are [B, C, 4, 8] and it equals the torch model run at that size (batch 3, 5 caption tokens; measured
    relative L2 9.9e-7)."""
    family = FAMILIES["pixart-sigma"]
    path = tmp_path / "wide.onnx"
    export_transformer(tiny_model, path, progress=False, latent_hw=(4, 8), metadata={"hn_export.size": "64x32"})
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes["hidden_states"] == ["batch", 4, 4, 8] and sess.get_outputs()[0].shape == ["batch", 8, 4, 8]
    inputs = family.example_inputs(tiny_model, 3, 5, 1, torch.float32, False, latent_hw=(4, 8))
    with torch.no_grad():
        reference = family.forward(tiny_model, inputs).numpy()
    out = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    assert out.shape == (3, 8, 4, 8)
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) <= 1e-5
    assert tiny_model.config.sample_size == 8  # the model is not changed


def test_default_is_the_own_square_size(tiny_model):
    family = FAMILIES["pixart-sigma"]
    assert family.check_latent_hw(tiny_model, None) == (8, 8)
    own = family.example_inputs(tiny_model, 2, 3, 0, torch.float32, False)
    at = family.example_inputs_at(tiny_model, 2, 3, 0, torch.float32, False, (8, 8))
    assert all(torch.equal(own[k], at[k]) for k in own) and own["hidden_states"].shape == (2, 4, 8, 8)


def test_alpha_conditions_follow_the_size():
    """PixArt-Alpha's resolution = (8 h, 8 w) pixels and aspect_ratio = h / w, as PixArtAlphaPipeline passes them."""
    model = build_transformer(ModelSource(preset="pixart-alpha-tiny", seed=0))
    inputs = FAMILIES["pixart-alpha"].example_inputs_at(model, 2, 3, 0, torch.float32, False, (4, 8))
    assert inputs["hidden_states"].shape == (2, 4, 4, 8)
    assert inputs["resolution"].tolist() == [[32.0, 64.0]] * 2 and inputs["aspect_ratio"].tolist() == [[0.5]] * 2


def test_bad_latent_sizes(tiny_model):
    family = FAMILIES["pixart-sigma"]
    for hw in ((5, 8), (0, 8), (8, -2), (514, 8)):
        with pytest.raises(ModelInputError, match=r"is not made of multiples of the patch size 2 between 2 and 512"):
            family.check_latent_hw(tiny_model, hw)
    with pytest.raises(ModelInputError, match=r"latent size 5x8"):
        to_onnx(tiny_model, latent_hw=(5, 8))


def test_other_families_refuse_other_sizes():
    """A family without `any_latent_hw` exports at its own square size only (one line, before tracing)."""
    model = build_transformer(ModelSource(preset="dit-tiny", seed=0))
    family = FAMILIES["dit"]
    own = family.latent_size(model)
    assert family.check_latent_hw(model, (own, own)) == (own, own)
    with pytest.raises(ModelInputError, match=rf"the dit family exports at the model's own latent size {own}x{own}, "
                                              rf"not 4x8 \(height x width\); export at the model's own size"):
        to_onnx(model, latent_hw=(4, 8))

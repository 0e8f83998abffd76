"""`runtime.seeded_noise` against torch: ``torch_randn(shape, seed)`` is ``torch.randn(shape,
generator=torch.Generator().manual_seed(seed))`` bit for bit (both of ATen's paths: Box-Muller on blocks of 16 with the
tail block redrawn, and the cached float64 pairs below 16 values), float16 too, a `TorchGenerator` stream call after
call, and the starting latents of diffusers' pipelines (``prepare_latents`` with a CPU generator)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor

from runtime.seeded_noise import TorchGenerator, torch_randn

SHAPES = [(1, 4, 32, 32), (1, 16, 24, 24), (2, 3, 5), (16,), (17,), (31,), (15,), (1,), (7, 3), (0,), (1, 4, 7, 9)]
SEEDS = [0, 1, 42, 2024, 2 ** 32 + 7, 2 ** 63 - 1, -1]


def reference(shape, seed, dtype=torch.float32) -> np.ndarray:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).numpy()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_randn_is_torchs(seed):
    for shape in SHAPES:
        assert same_bits(torch_randn(shape, seed), reference(shape, seed)), shape


def test_float16_and_int_shape():
    for shape in [(40,), (5,), (1, 4, 8, 9), (16,)]:
        assert same_bits(torch_randn(shape, 3, np.float16), reference(shape, 3, torch.float16)), shape
    assert same_bits(torch_randn(20, 5), reference(20, 5))
    with pytest.raises(ValueError, match="dtype float64 is not implemented; use float32 or float16"):
        torch_randn((4,), 0, np.float64)


def test_generator_stream():
    """Successive draws (odd counts below 16 leave a cached normal for the next call, as torch's generator)."""
    ours, theirs = TorchGenerator(11), torch.Generator().manual_seed(11)
    for shape in [(3,), (20,), (1,), (5,), (33,), (2, 2), (1, 4, 8, 8), (7,)]:
        assert same_bits(ours.randn(shape), torch.randn(shape, generator=theirs).numpy()), shape
    assert same_bits(TorchGenerator().randn((18,)), torch.randn((18,), generator=torch.Generator()).numpy())


@pytest.mark.parametrize("pipeline", [PixArtSigmaPipeline, StableDiffusion3Pipeline])
def test_pipeline_starting_latents(pipeline):
    """The pipeline's own ``prepare_latents`` (batch 1, 256 px, vae scale 8) with generator=manual_seed(seed)."""
    channels = 16 if pipeline is StableDiffusion3Pipeline else 4
    stub = types.SimpleNamespace(vae_scale_factor=8, scheduler=types.SimpleNamespace(init_noise_sigma=1.0))
    for seed in (0, 1234):
        latents = pipeline.prepare_latents(stub, 1, channels, 256, 256, torch.float32, torch.device("cpu"),
                                           torch.Generator().manual_seed(seed))
        assert same_bits(torch_randn((1, channels, 32, 32), seed), latents.numpy())
    drawn = randn_tensor((1, 4, 32, 32), generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    assert same_bits(torch_randn((1, 4, 32, 32), 5), drawn.numpy())

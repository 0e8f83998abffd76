"""An onnxruntime-backed PixArt transformer that drops into `diffusers.PixArtSigmaPipeline` as its ``transformer``.

    pipe = PixArtSigmaPipeline(tokenizer=..., text_encoder=..., vae=..., scheduler=...,
                               transformer=OnnxPixArtTransformer("model.w4a4.onnx", config=torch_transformer.config))

The graph runs through `runtime.Denoiser` (kernels when built, onnxruntime session options that keep the numbers);
torch and diffusers are imported here only, never by `runtime`. Graphs exported without ``encoder_attention_mask``
ignore the pipeline's mask: padded caption tokens then take part in cross-attention (a warning says so once).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from hn_export.denoise import ModelSignature
from hn_export.model_files import load_model
from runtime.denoiser import Denoiser

logger = logging.getLogger(__name__)


class OnnxPixArtTransformer(torch.nn.Module):
    def __init__(self, path: str | os.PathLike, config: dict[str, Any] | None = None, provider: str | None = None,
                 kernels: bool = True):
        super().__init__()
        self.signature = ModelSignature.of(load_model(path))
        self.denoiser = Denoiser(path, provider=provider, kernel_library=kernels)
        channels, height, _ = self.signature.latent_shape
        out_channels = self.denoiser.session.get_outputs()[0].shape[1]
        derived = {"in_channels": channels, "out_channels": out_channels if isinstance(out_channels, int) else 2 * channels,
                   "sample_size": height, "caption_channels": self.signature.caption_channels}
        self.config = FrozenDict({**derived, **dict(config or {})})
        self._np_dtype = self.signature.dtype
        self._warned_mask = False
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self._np_dtype == np.float16 else torch.float32

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def _numpy(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().to("cpu", torch.float32).numpy().astype(self._np_dtype)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                added_cond_kwargs: dict | None = None, return_dict: bool = True, **_: Any):
        batch = hidden_states.shape[0]
        if timestep is None:
            raise ValueError("timestep is required")
        timestep = torch.as_tensor(timestep).reshape(-1).expand(batch)
        feeds = {
            "hidden_states": self._numpy(hidden_states),
            "timestep": self._numpy(timestep),
            "encoder_hidden_states": self._numpy(encoder_hidden_states),
        }
        if self.signature.has_mask:
            mask = encoder_attention_mask if encoder_attention_mask is not None else torch.ones(feeds["encoder_hidden_states"].shape[:2])
            feeds["encoder_attention_mask"] = self._numpy(mask)
        elif encoder_attention_mask is not None and not bool(torch.all(encoder_attention_mask == 1)) and not self._warned_mask:
            logger.warning("the ONNX graph has no encoder_attention_mask input: padded caption tokens are attended; "
                           "export with --with-mask to honour the mask")
            self._warned_mask = True
        sample = torch.from_numpy(self.denoiser(feeds).astype(np.float32)).to(hidden_states.device, hidden_states.dtype)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

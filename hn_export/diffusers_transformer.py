"""An onnxruntime-backed transformer that drops into the diffusers pipeline of its family as its ``transformer``.

    pipe = PixArtSigmaPipeline(tokenizer=..., text_encoder=..., vae=..., scheduler=...,
                               transformer=OnnxTransformer("model.w4a4.onnx", config=torch_transformer.config))

The same class serves every family (`StableDiffusion3Pipeline`, `DiTPipeline`, ...): the pipeline's keyword
arguments are matched to the graph inputs by name (entries of ``added_cond_kwargs`` too); a scalar timestep is
expanded to the batch. Pass the torch model's config so that the pipeline reads the values it expects.

The graph runs through `runtime.Denoiser` (kernels when built, onnxruntime session options that keep the numbers);
torch and diffusers are imported here only, never by `runtime`. Graphs exported without ``encoder_attention_mask``
ignore the pipeline's mask: padded caption tokens then take part in cross-attention (a warning says so once).
"""

from __future__ import annotations

import contextlib
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


class OnnxTransformer(torch.nn.Module):
    def __init__(self, path: str | os.PathLike, config: dict[str, Any] | None = None, provider: str | None = None,
                 kernels: bool = True):
        super().__init__()
        self.signature = ModelSignature.of(load_model(path))
        self.denoiser = Denoiser(path, provider=provider, kernel_library=kernels)
        latent = self.signature.latent_shape
        derived: dict[str, Any] = {}
        if len(latent) == 3:  # [C, H, W]; a packed latent [N, C] (Flux) leaves these to `config`
            out_channels = self.denoiser.session.get_outputs()[0].shape[1]
            derived = {"in_channels": latent[0], "sample_size": latent[1],
                       "out_channels": out_channels if isinstance(out_channels, int) else 2 * latent[0]}
        if self.signature.caption_channels is not None:
            derived["caption_channels"] = self.signature.caption_channels
        self.config = FrozenDict({**derived, **dict(config or {})})
        self._np_dtype = self.signature.dtype
        self._warned_mask = False
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    def cache_context(self, name: str):
        """Pipelines that cache attention (FluxPipeline) enter this context around each call; nothing to cache."""
        return contextlib.nullcontext()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self._np_dtype == np.float16 else torch.float32

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def _numpy(self, tensor: torch.Tensor, ort_type: str = "tensor(float)") -> np.ndarray:
        if ort_type in ("tensor(int64)", "tensor(int32)"):
            return tensor.detach().to("cpu", torch.int64).numpy().astype(np.int32 if "32" in ort_type else np.int64)
        return tensor.detach().to("cpu", torch.float32).numpy().astype(self._np_dtype)

    def forward(self, hidden_states: torch.Tensor, return_dict: bool = True, **kwargs: Any):
        batch = hidden_states.shape[0]
        given = {**(kwargs.pop("added_cond_kwargs", None) or {}), **kwargs, "hidden_states": hidden_states}
        feeds = {}
        for name, spec in self.denoiser.inputs.items():
            value = given.get(name)
            if value is None and name == "encoder_attention_mask":
                value = torch.ones(given["encoder_hidden_states"].shape[:2])
            if value is None:
                raise ValueError(f"the ONNX transformer needs input {name!r}, which the pipeline did not pass")
            value = torch.as_tensor(value)
            if name in self.denoiser.batched_inputs and value.ndim <= 1 and len(spec.shape) == 1:
                value = value.reshape(-1).expand(batch)  # a scalar timestep / guidance
            feeds[name] = self._numpy(value, spec.type)
        mask = given.get("encoder_attention_mask")
        if (not self.signature.has_mask and mask is not None and not bool(torch.all(torch.as_tensor(mask) == 1))
                and not self._warned_mask):
            logger.warning("the ONNX graph has no encoder_attention_mask input: padded caption tokens are attended; "
                           "export with --with-mask to honour the mask")
            self._warned_mask = True
        sample = torch.from_numpy(self.denoiser(feeds).astype(np.float32)).to(hidden_states.device, hidden_states.dtype)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


OnnxPixArtTransformer = OnnxTransformer  # the name of the PixArt-only version

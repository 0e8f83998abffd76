"""What runs on the device: onnxruntime + numpy only (no torch, no diffusers)."""

from runtime.domain import HADANORM_DOMAIN, HADANORM_OPSET_VERSION

__all__ = ["HADANORM_DOMAIN", "HADANORM_OPSET_VERSION"]

"""hn-export: diffusion transformers (PixArt, SD3, DiT, Flux) -> ONNX -> W4A4 with the HadaNorm transform."""

__version__ = "0.1.0"

"""ONNX -> ONNX rewrites on onnx-ir graphs. No torch import anywhere in this package."""

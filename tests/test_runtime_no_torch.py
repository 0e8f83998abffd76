"""The device side runs without torch, diffusers and transformers: `hn-run` in a subprocess where importing them
fails (a meta-path finder that refuses them, installed before anything else is imported) makes an image from the
tiny bundles of tests/test_bundle.py and test_bundle_sd3.py (float, and W4A4 `fused` with the int8 encoders; PixArt-Sigma
and Stable Diffusion 3), and none of them (nor onnx)
ends up in sys.modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest

from tests.conftest import PROMPT

BLOCKED = ("torch", "diffusers", "transformers")

SCRIPT = """
import importlib.abc, json, sys

BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: the device has no torch stack")
        return None

sys.meta_path.insert(0, Block())
from runtime.cli_run import main
try:
    main({args!r})
except SystemExit as exc:
    code = exc.code
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & (set(BLOCKED) | {{"onnx", "onnx_ir", "hn_export"}}))
print("RESULT " + json.dumps({{"code": code, "loaded": loaded}}))
"""


@pytest.mark.parametrize("bundle", ["fp_bundle", pytest.param("q_bundle", marks=pytest.mark.slow), "sd3_fp_bundle",
                                    pytest.param("sd3_q_bundle", marks=pytest.mark.slow)])
def test_hn_run_without_torch(bundle, request, tmp_path):
    """The float bundle, and the deployed one (W4A4 `fused` transformer, int8 MatMulNBits encoder; slow: it builds
    the quantized bundle unless tests/test_bundle.py's slow test already did)."""
    folder = request.getfixturevalue(bundle)
    out = tmp_path / "image.png"
    args = [str(folder), PROMPT, "-o", str(out), "--steps", "3", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=BLOCKED, args=args)], capture_output=True,
                          text=True, env=env, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stderr[-2000:]
    result = json.loads(line[0][len("RESULT "):])
    assert result == {"code": 0, "loaded": []}, proc.stderr[-2000:]
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (64, 64) and image.text["prompt"] == PROMPT
        pixels = np.asarray(image)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # a picture, not a constant fill

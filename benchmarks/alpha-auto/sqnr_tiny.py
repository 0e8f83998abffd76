"""One-call SQNR (dB) of quantized graphs vs their FP32 graph as tests/test_alpha_auto.py measures it (seed 7, 1 sample,
no denoising). Usage: python sqnr_tiny.py FP32.onnx Q1.onnx Q2.onnx ..."""
import sys
from pathlib import Path
from hn_export.denoise import DenoiseConfig
from hn_export.evaluate import GraphRunner, evaluate, reference_outputs
EVAL = DenoiseConfig(steps=4, samples=1, seed=7)
ref_path = Path(sys.argv[1])
with GraphRunner(ref_path) as r:
    ref = reference_outputs(r, EVAL, with_denoising=False)
for p in sys.argv[2:]:
    with GraphRunner(Path(p)) as r:
        print(p, round(evaluate(r, ref, EVAL).single_call.sqnr_db, 3))

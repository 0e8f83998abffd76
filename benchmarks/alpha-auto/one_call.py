"""One-call SQNR only (compare's seeded single call, seed 1000, 2 samples). Usage: FP32.onnx Q.onnx ..."""
import sys
from pathlib import Path
from hn_export.compare import EvaluationInputs, gather_samples
from hn_export.denoise import DenoiseConfig
from hn_export.evaluate import GraphRunner
from hn_export.metrics import Comparison

inputs = EvaluationInputs(DenoiseConfig(steps=20, samples=2, seed=1000))
def outs(path):
    with GraphRunner(Path(path)) as r:
        return gather_samples([inputs.sample_outputs(r, i, ("single_call",)) for i in range(2)])["single_call"]
ref = outs(sys.argv[1])
for q in sys.argv[2:]:
    print(f"{Path(q).name}: {Comparison.of(ref, outs(q)).sqnr_db:.2f}", flush=True)

"""One-call and end-of-denoising SQNR vs the FP32 graph, as `hn-export compare` measures them: seeded inputs
(EvaluationInputs(DenoiseConfig(steps, samples, seed=1000)), i.e. compare --seed 0 --samples S --steps 20), or with
--inputs FILE.npz the file's (unconditional, conditional) pairs (compare --inputs FILE).
Usage: python evaluate_graphs.py FP32.onnx STEPS SAMPLES [--inputs FILE.npz] Q1.onnx Q2.onnx ..."""
import json, sys
from pathlib import Path
from hn_export.compare import EvaluationInputs
from hn_export.denoise import DenoiseConfig, ModelSignature, load_input_file
from hn_export.evaluate import GraphRunner
from hn_export.model_files import load_model

fp, steps, samples = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
graphs = sys.argv[4:]
feeds = None
if graphs[0] == "--inputs":
    sig = ModelSignature.of(load_model(fp, any_opset=True))
    feeds = load_input_file(Path(graphs[1]), sig, "inputs file")
    graphs = graphs[2:]
inputs = EvaluationInputs(DenoiseConfig(steps=steps, samples=samples, seed=1000), feeds)
with GraphRunner(fp) as ref:
    ref_out = inputs.reference(ref)
rows = {}
for q in graphs:
    with GraphRunner(Path(q)) as runner:
        ev = inputs.evaluate(runner, ref_out)
    rows[Path(q).name] = {"single_call": round(float(ev.single_call.sqnr_db), 2),
                          "end_of_denoising": round(float(ev.end_of_denoising.sqnr_db), 2)}
    print(Path(q).name, rows[Path(q).name], flush=True)
json.dump(rows, sys.stdout, indent=1)

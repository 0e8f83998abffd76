"""onnxruntime's own 4-bit weight-only quantizers as reference rows next to `hn-export compare` (issue 21).

    python benchmarks/bench_ort_weight_only.py FP32.onnx OUT_DIR [--calib FILE.npz] [--inputs FILE.npz]
        [--steps 20] [--samples 2] [--calib-samples 2] [--calib-steps 20] [--seed 0] [--rows ort-rtn,ort-gptq]

Writes ``OUT_DIR/ort-rtn.onnx`` (``MatMulNBitsQuantizer`` as a user calls it: 4 bits, block 128, symmetric,
accuracy_level 4, its default round-to-nearest) and ``OUT_DIR/ort-gptq.onnx`` (the same with
``GPTQWeightOnlyQuantConfig``: percdamp 0.01, GPTQ batches of 128, no act-order, min/max ranges, on the calibration
inputs hn-export's own calibration sees: ``--calib FILE.npz``'s calls, else the FP32 graph's seeded denoising
trajectories, `--calib-samples` x `--calib-steps` calls), evaluates both against the FP32 graph exactly as
`hn-export compare` evaluates its points (one call and the end of `--steps` denoising steps; seeded inputs with
compare's held-out seed ``--seed + 1000``, or ``--inputs FILE.npz`` pairs) and writes ``OUT_DIR/ort.json``. Every MatMul with a constant weight is quantized
(onnxruntime's choice; hn-export's default quantizes the block linears only).

``--rows`` picks the rows (default ``ort-rtn,ort-gptq``, the two above); ``ort-w8a8`` adds ``OUT_DIR/ort-w8a8.onnx``,
onnxruntime's ``quantize_dynamic`` as ``benchmarks/bench_peers.py`` calls it (MatMul/Gemm, QInt8 weights, uint8
dynamic activations), evaluated the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

from hn_export.calibration import npz_batches
from hn_export.compare import EvaluationInputs
from hn_export.denoise import DenoiseConfig, ModelSignature, load_input_file, trajectory
from hn_export.evaluate import GraphRunner
from hn_export.model_files import load_model


def calibration_feeds(model: Path, args) -> list[dict[str, np.ndarray]]:
    sig = ModelSignature.of(load_model(model))
    if args.calib is not None:
        return list(npz_batches(args.calib, sig))
    feeds: list[dict[str, np.ndarray]] = []
    config = DenoiseConfig(samples=args.calib_samples, steps=args.calib_steps, seed=args.seed)
    with GraphRunner(model) as runner:
        def run(f):
            feeds.append({k: np.array(v) for k, v in f.items()})
            return runner(f)

        for index in range(config.samples):
            for _ in trajectory(run, sig, config, index):
                pass
    return feeds


class Reader:
    """onnxruntime's CalibrationDataReader over recorded feeds (deep-copied by the quantizer: restartable)."""

    def __init__(self, feeds):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def __iter__(self):
        self.i = 0
        return iter(list(self.feeds))

    def rewind(self):
        self.i = 0


def quantize(src: Path, dst: Path, feeds=None) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = None if feeds is None else GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(feeds),
                                                                  percdamp=0.01, block_size=128, actorder=False,
                                                                  mse=False, perchannel=True)
    quant = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=128, is_symmetric=True, accuracy_level=4,
                                 algo_config=config)
    quant.process()
    proto = quant.model.model  # the GPTQ path writes MatMulNBits without declaring its domain
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    quant.model.save_model_to_file(str(dst), use_external_data_format=True)


def quantize_w8a8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                     use_external_data_format=True)


ROWS = ("ort-rtn", "ort-gptq", "ort-w8a8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--inputs", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=2)
    parser.add_argument("--calib-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="ort-rtn,ort-gptq", help=f"comma list of {', '.join(ROWS)}")
    args = parser.parse_args()
    rows_wanted = [r for r in args.rows.split(",") if r]
    if not rows_wanted or any(r not in ROWS for r in rows_wanted):
        parser.error(f"--rows: a comma list of {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    graphs = {name: args.out / f"{name}.onnx" for name in rows_wanted}
    if "ort-rtn" in graphs and not graphs["ort-rtn"].exists():
        quantize(args.model, graphs["ort-rtn"])
    if "ort-gptq" in graphs and not graphs["ort-gptq"].exists():
        quantize(args.model, graphs["ort-gptq"], calibration_feeds(args.model, args))
    if "ort-w8a8" in graphs and not graphs["ort-w8a8"].exists():
        quantize_w8a8(args.model, graphs["ort-w8a8"])
    config = DenoiseConfig(steps=args.steps, samples=args.samples, seed=args.seed + 1000)  # held out, as compare
    if args.inputs is not None:
        sig = ModelSignature.of(load_model(args.model))
        inputs = EvaluationInputs(config, load_input_file(args.inputs, sig, "evaluation input file"),
                                  f"file:{args.inputs.name}")
    else:
        inputs = EvaluationInputs(config)
    with GraphRunner(args.model) as ref:
        reference = inputs.reference(ref)
    rows = {}
    for name, path in graphs.items():
        with GraphRunner(path) as runner:
            ev = inputs.evaluate(runner, reference)
        rows[name] = {"single_call_sqnr_db": ev.single_call.sqnr_db, "end_of_denoising_sqnr_db":
                      ev.end_of_denoising.sqnr_db}
        print(name, json.dumps(rows[name]))
    (args.out / "ort.json").write_text(json.dumps({"model": args.model.name, "inputs": inputs.source,
                                                   "steps": args.steps, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

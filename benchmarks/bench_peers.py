"""hn-export's fused graphs next to what a CPU user would try first, side by side in one run (issue 17).

Graphs (`--graphs`, onnxruntime FP32 always runs: it is the reference):

* ``fp32``      onnxruntime on the FP32 export (`hn-export export`, seed 0);
* ``ort-w8a8``  onnxruntime ``quantize_dynamic`` of it (MatMul/Gemm, QInt8 weights, uint8 dynamic activations);
* ``ort-w4``    onnxruntime ``MatMulNBitsQuantizer`` (4-bit, block 128, symmetric, accuracy_level 4);
* ``openvino``  OpenVINO ``core.compile_model(FP32 ONNX, "CPU")``, default precision (the report names it);
* ``hn-w4a4``   ``hn-export --w4a4 --format fused`` (HadaNorm), hadanorm kernel library;
* ``hn-w4a8``   ``hn-export --wbits 4 --abits 8 --format fused`` (the same calibration statistics);
* ``hn-w4a4-all``, ``hn-w4a8-all``: the same with ``--every-linear`` (the caption projection, timestep embedder,
  adaLN-single and final projection are sites too, at ``--outer-bits`` 8; the 4-channel patch-embedding conv stays
  float), calibrated once for both; ``hn-w4a4-all-block`` also with ``--hadamard block`` (block-diagonal Sylvester
  Hadamard, blocks of 128: the online rotation is fast Walsh-Hadamard transforms only, no dense 36 x 36 Paley factor);
  ``hn-w4a4-all-tl``, ``hn-w4a8-all-tl``, ``hn-w4a4-all-block-tl`` and ``hn-w4a8-all-block-tl`` also with
  ``--weight-scales two-level`` (each 4-bit weight's
  block scales a column unit times an integer 1..16: the kernels run it as an 8-bit weight of one block, with no
  per-block fold); ``hn-w4a4-all-block-tl-pc`` also with ``--outer-weight-block 0`` (the outer linears' 8-bit
  weights in one block per output channel: no per-block fold there either);
* the ``hn-*`` graphs have the fused attention (``hadanorm::Attention``, bf16, the ``--format fused`` default);
  the ``*-fattn`` graphs have it in fp32 (``--attention float``), the ``*-iattn`` graphs in int8 (``--attention
  int8``), ``hn-w4a4-noattn`` keeps MatMul -> Softmax -> MatMul (``--attention none``, the graphs before issue 18);
  ``fp32-attn`` is the FP32 graph with only the attention fused (``hn-export optimize --attention bf16``), on the
  kernel library;
* ``*-split``: the graph of the key before ``-split`` cut in two by ``hn-export split-prompt`` (a prompt graph for
  what depends on the caption alone, a step graph for the rest), run by `runtime.denoiser.Denoiser`, which runs the
  prompt graph once per prompt. Its "ms" is a step of a generation (the prompt's values cached: the timing feeds
  are the same every round); each round also times a first call (the cache cleared: prompt graph + step graph, the
  same work as the whole graph), and the table gives the mean cost of a step in a `--steps`-step generation,
  (first + (steps - 1) x step) / steps. ``ort-w8a8-split`` is onnxruntime's W8A8 graph split the same way (not how
  a user of onnxruntime runs it: not a peer; it shows what the split is worth to another graph; run by the Denoiser,
  its sessions also have onnxruntime's ``SkipLayerNormFusion`` off, which the ``ort`` workers keep on).

Each graph runs in its own worker process (this script with ``--worker``; under ``benchmarks/no_amx.py`` with
``--no-amx``), which loads it once and reports its RSS, then serves calls. The workers start one after the other
(warm-up calls each); then ``--rounds`` rounds, each calling every graph once (round-robin, starting one graph later
each round) on the same one-call feeds: medians of the times measured inside the workers. onnxruntime sessions
run with onnxruntime's default options except ``--threads`` intra-op threads and no thread spinning (an idle
worker must not steal the cores of the one being timed); OpenVINO gets ``INFERENCE_NUM_THREADS``. ``--spinning``:
onnxruntime's default spinning instead (how a process that runs one model gets it: the pool's threads spin between
parallel sections instead of sleeping), and a pause of ``SPIN_PAUSE_S`` before each timed call, so that the last
worker's threads have stopped spinning (onnxruntime's workers spin 2^20 pause loops after their last task, tens of
milliseconds). After the timing, quality against FP32 on inputs held out from hn-export's calibration (seed + 1000):
one call per sample, and the final latents of the family's denoising loop (`hn_export.denoise`, PixArt:
DPM-Solver++, guidance pair = batch 2), driven by each worker in turn. Peak RSS is each worker's VmHWM at its end.

    python benchmarks/bench_peers.py [--preset pixart-sigma-256] [--layers 4] [--rounds 15] [--threads 2]
        [--no-amx] [--spinning] [--graphs fp32,ort-w8a8,...] [--work-dir DIR] [--out RESULT.json]

Graphs are made once in ``--work-dir`` (``<preset>-<layers>blocks-seed<seed>/<graph>/model.onnx``, one process at a
time; a folder appears only when complete) and reused. ``--out X.json`` also writes ``X.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
NO_AMX = HERE / "no_amx.py"
MALLOC_HUGETLB = "glibc.malloc.hugetlb=1"
SPIN_PAUSE_S = 0.1  # --spinning: sleep before each timed call (onnxruntime's pool spins on after a run)


@dataclasses.dataclass(frozen=True)
class Graph:
    key: str
    label: str
    runtime: str  # "ort", "openvino", "hn"
    source: str  # the graph folder it runs ("openvino" runs the fp32 file)
    peer: bool  # not hn-export: counts for "vs the fastest peer"


GRAPHS = {g.key: g for g in (
    Graph("fp32", "onnxruntime FP32", "ort", "fp32", True),
    Graph("ort-w8a8", "onnxruntime `quantize_dynamic` W8A8 (MatMul/Gemm, QInt8 weights, uint8 activations)", "ort",
          "ort-w8a8", True),
    Graph("ort-w4", "onnxruntime `MatMulNBitsQuantizer` W4 (block 128, symmetric, accuracy_level 4)", "ort",
          "ort-w4", True),
    Graph("openvino", "OpenVINO `compile_model` of the FP32 ONNX", "openvino", "fp32", True),
    Graph("hn-w4a4", "hn-export `--w4a4 --format fused` (HadaNorm)", "hn", "hn-w4a4", False),
    Graph("hn-w4a8", "hn-export `--wbits 4 --abits 8 --format fused` (HadaNorm)", "hn", "hn-w4a8", False),
    Graph("hn-w4a4-all", "hn-export `--w4a4 --format fused`, every linear (outside the blocks W8A8)", "hn",
          "hn-w4a4-all", False),
    Graph("hn-w4a8-all", "hn-export `--wbits 4 --abits 8 --format fused`, every linear (outside the blocks W8A8)",
          "hn", "hn-w4a8-all", False),
    Graph("hn-w4a4-all-block", "hn-export `--w4a4 --format fused --every-linear --hadamard block` (block-diagonal "
          "Hadamard, blocks of 128)", "hn", "hn-w4a4-all-block", False),
    Graph("hn-w4a4-tl", "hn-export `--w4a4 --format fused --weight-scales two-level`", "hn", "hn-w4a4-tl", False),
    Graph("hn-w4a4-all-tl", "hn-export `--w4a4 --format fused --every-linear --weight-scales two-level` (block "
          "scales = column unit x integer 1..16: no per-block fold)", "hn", "hn-w4a4-all-tl", False),
    Graph("hn-w4a8-all-tl", "hn-export `--wbits 4 --abits 8 --format fused --every-linear --weight-scales two-level`",
          "hn", "hn-w4a8-all-tl", False),
    Graph("hn-w4a4-all-block-tl", "hn-export `--w4a4 --format fused --every-linear --hadamard block --weight-scales "
          "two-level` (block scales = column unit x integer 1..16: no per-block fold)", "hn", "hn-w4a4-all-block-tl",
          False),
    Graph("hn-w4a8-all-block-tl", "hn-export `--wbits 4 --abits 8 --format fused --every-linear --hadamard block "
          "--weight-scales two-level`", "hn", "hn-w4a8-all-block-tl", False),
    Graph("hn-w4a4-all-block-tl-pc", "hn-export `--w4a4 --format fused --every-linear --hadamard block --weight-scales "
          "two-level --outer-weight-block 0` (the outer linears' 8-bit weights per output channel: no fold)", "hn",
          "hn-w4a4-all-block-tl-pc", False),
    Graph("hn-w4a4-all-block-lr32", "hn-export `--w4a4 --format fused --every-linear --hadamard block --low-rank 32` "
          "(a rank-32 float branch beside each weight)", "hn", "hn-w4a4-all-block-lr32", False),
    Graph("hn-w4a4-all-block-tl-iattn", "hn-export `--w4a4 --format fused --every-linear --hadamard block "
          "--weight-scales two-level --attention int8` (int8 fused attention)", "hn", "hn-w4a4-all-block-tl-iattn",
          False),
    Graph("hn-w4a4-all-block-tl-pc-iattn", "hn-export `--w4a4 --format fused --every-linear --hadamard block "
          "--weight-scales two-level --outer-weight-block 0 --attention int8` (int8 fused attention)", "hn",
          "hn-w4a4-all-block-tl-pc-iattn", False),
    Graph("hn-w4a4-all-block-tl-fattn", "hn-export `--w4a4 --format fused --every-linear --hadamard block "
          "--weight-scales two-level --attention float` (fp32 fused attention)", "hn", "hn-w4a4-all-block-tl-fattn",
          False),
    Graph("hn-w4a4-fattn", "hn-export `--w4a4 --format fused --attention float` (fp32 fused attention)", "hn",
          "hn-w4a4-fattn", False),
    Graph("hn-w4a4-noattn", "hn-export `--w4a4 --format fused --attention none` (MatMul -> Softmax -> MatMul)", "hn",
          "hn-w4a4-noattn", False),
    Graph("fp32-attn", "FP32 with only the attention fused (`hn-export optimize --attention bf16`)", "hn",
          "fp32-attn", False),
)}
SPLIT_SUFFIX = "-split"


def _split(base: str, runtime: str = "hn", note: str = "") -> Graph:
    """The graph `base` cut by `hn-export split-prompt` (never a peer: run by the Denoiser)."""
    key = base + SPLIT_SUFFIX
    return Graph(key, f"{GRAPHS[base].label}, then `hn-export split-prompt`{note}", runtime, key, False)


GRAPHS.update({g.key: g for g in (
    _split("hn-w4a4-all-block-tl"), _split("hn-w4a4-all-block-tl-pc"),
    _split("ort-w8a8", "hn-ort", " (not a peer: what the split alone gives)"),
)})
GENERATION_STEPS = 20  # the generation a split graph's step cost is given for when --steps is 0


def fail(problem: str, fix: str, code: int = 2) -> None:
    print(f"error: {problem}; {fix}", file=sys.stderr)
    sys.exit(code)


def proc_status() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


# ---------------------------------------------------------------------------------------------------------------
# worker: one graph, one process
# ---------------------------------------------------------------------------------------------------------------


def load_runner(runtime: str, path: Path, threads: int, shrink_arena: bool, spinning: bool = False):
    """(run(feeds) -> float32 output, info, RSS in MB after the imports and before the load)."""
    import numpy as np

    if runtime == "openvino":
        import openvino as ov

        base = proc_status()[0]
        core = ov.Core()
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        props = {k: compiled.get_property(k) for k in ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS",
                                                         "INFERENCE_NUM_THREADS", "EXECUTION_MODE_HINT")}
        props = {k: v.get_type_name() if isinstance(v, ov.Type) else str(v) for k, v in props.items()}
        info = {"runtime": f"openvino {ov.__version__}", "properties": props,
                "runs_as": f"openvino CPU, {props['INFERENCE_PRECISION_HINT']}",
                "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))}

        def run(feeds):
            request.infer(feeds, share_inputs=True)
            return np.array(request.get_output_tensor(0).data, dtype=np.float32)

        return run, info, base

    import onnxruntime as ort

    run_options = ort.RunOptions()
    if shrink_arena:
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    if runtime in ("hn", "hn-ort"):
        from runtime.denoiser import Denoiser
        from runtime.session import NumericsMode

        base = proc_status()[0]
        if runtime == "hn":
            den = Denoiser(path, threads=threads, spinning=spinning, kernel_library=True)
            if den.kernel_library is None:
                raise RuntimeError("the hadanorm kernel library is not built (python -m runtime.kernels.build)")
        else:  # a peer's graph, split: onnxruntime's default session options but SkipLayerNormFusion (the Denoiser's)
            den = Denoiser(path, threads=threads, spinning=spinning, kernel_library=False, mode=NumericsMode.FAST)
        session, check = den.session, den.check_inputs
        info = {"runs_as": den.implementation + (", split: prompt graph once per prompt"
                                                 if den.prompt_session is not None else "")}
        if den.prompt_session is not None:  # a split graph runs through the Denoiser (its prompt cache)
            info["runtime"] = f"onnxruntime {ort.__version__}"

            def run_split(feeds):
                return np.asarray(den(feeds), dtype=np.float32)

            run_split.check = check
            run_split.clear = den.clear_prompt_cache
            return run_split, info, base
    else:
        from runtime.session import NumericsMode, create_session

        base = proc_status()[0]
        session = create_session(path, NumericsMode.FAST, ["CPUExecutionProvider"], threads, spinning=spinning,
                                 disabled_optimizers=())  # onnxruntime's defaults, as a user runs it
        check = None
        info = {"runs_as": "onnxruntime CPU, default session options"}
    info["runtime"] = f"onnxruntime {ort.__version__}"
    output = session.get_outputs()[0].name

    def run(feeds):
        return session.run([output], feeds, run_options)[0].astype(np.float32, copy=False)

    run.check = check
    return run, info, base


def worker(args: argparse.Namespace) -> None:
    """Serve one graph: JSON lines on stdin -> JSON lines on the original stdout (library output goes to stderr)."""
    import numpy as np

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(**msg):
        rss, hwm = proc_status()
        proto.write(json.dumps({**msg, "rss_mb": rss, "hwm_mb": hwm}) + "\n")

    from no_amx import amx_permitted

    run, info, base = load_runner(args.worker, Path(args.model), args.threads, args.ort_arena == "shrink",
                                  args.spinning)
    info["amx_permitted_after_load"] = amx_permitted()
    send(event="loaded", base_mb=base, info=info)
    timing = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "feeds":
            with np.load(msg["path"]) as data:
                timing = {k: data[k] for k in data.files}
            if getattr(run, "check", None) is not None:
                run.check(timing)
            send(event="ok")
        elif msg["cmd"] in ("time", "time-first"):
            if msg["cmd"] == "time-first":  # a split graph's first call of a generation: no cached prompt
                run.clear()
            start = time.perf_counter()
            run(timing)
            send(event="ok", ms=(time.perf_counter() - start) * 1000)
        elif msg["cmd"] == "run":
            with np.load(msg["path"]) as data:
                out = run({k: data[k] for k in data.files})
            np.save(msg["out"], out)
            send(event="ok", amx_permitted=amx_permitted())
        elif msg["cmd"] == "exit":
            send(event="bye")
            return


# ---------------------------------------------------------------------------------------------------------------
# parent: graphs, workers, rounds, report
# ---------------------------------------------------------------------------------------------------------------


def quantize_peer(kind: str, src: Path, dst: Path) -> None:
    """The onnxruntime quantizers as a user calls them (a subprocess of `prepare`)."""
    if kind == "ort-w8a8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                         use_external_data_format=True)
    elif kind == "ort-w4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quant = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=128, is_symmetric=True, accuracy_level=4)
        quant.process()
        quant.model.save_model_to_file(str(dst), use_external_data_format=True)
    else:
        raise ValueError(kind)


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def prepare(folder: Path, preset: str, layers: int, seed: int, keys: list[str], log) -> dict[str, dict]:
    """Make the graph folders that are missing (one process at a time); returns {folder: made.json contents}."""
    hn = [sys.executable, "-c", "from hn_export.cli import main; main()"]
    stats = folder / "calibration-stats.npz"
    fp32 = folder / "fp32" / "model.onnx"

    def command(key: str, out: Path) -> list[str]:
        if key == "fp32":
            return hn + ["export", "--preset", preset, "--layers", str(layers), "--seed", str(seed), "-o", str(out)]
        if key.endswith(SPLIT_SUFFIX):
            return hn + ["split-prompt", str(folder / key[:-len(SPLIT_SUFFIX)] / "model.onnx"), "-o", str(out)]
        if key in ("ort-w8a8", "ort-w4"):
            return [sys.executable, str(Path(__file__).resolve()), "--quantize-peer", key, str(fp32), str(out)]
        if key == "fp32-attn":
            return hn + ["optimize", str(fp32), "--attention", "bf16", "-o", str(out)]
        parts = key.split("-")
        bits = ["--w4a4"] if parts[1] == "w4a4" else ["--wbits", "4", "--abits", "8"]
        every = "all" in parts
        selection = ["--every-linear"] if every else []
        attention = {"noattn": ["--attention", "none"], "fattn": ["--attention", "float"],
                     "iattn": ["--attention", "int8"]}.get(parts[-1], [])
        rotation = ["--hadamard", "block"] if "block" in parts else []
        rotation += [opt for part in parts if part.startswith("lr") for opt in ("--low-rank", part[2:])]
        rotation += ["--weight-scales", "two-level"] if "tl" in parts else []
        rotation += ["--outer-weight-block", "0"] if "pc" in parts else []
        stats_file = folder / "calibration-stats-all.npz" if every else stats
        calib = ["--stats", str(stats_file)] if stats_file.exists() else ["--save-stats", str(stats_file)]
        return hn + ["quantize", str(fp32), *bits, *selection, *attention, *rotation, "--format", "fused", "--seed",
                     str(seed), "--no-progress", "-o", str(out), *calib]

    def sources(key: str) -> list[str]:  # a split graph needs the graph it is cut from, made first
        source = GRAPHS[key].source
        return ([source[:-len(SPLIT_SUFFIX)]] if source.endswith(SPLIT_SUFFIX) else []) + [source]

    needed = ["fp32"] + [source for k in keys if GRAPHS[k].source != "fp32" for source in sources(k)]
    made = {}
    for key in dict.fromkeys(needed):
        final = folder / key
        if not (final / "model.onnx").is_file():
            tmp = folder / f".{key}.tmp-{os.getpid()}"
            tmp.mkdir(parents=True)
            cmd = command(key, tmp / "model.onnx")
            log(f"making {key}: {shlex.join(cmd)}")
            start = time.time()
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                fail(f"making the {key} graph failed ({last})",
                     f"see the command above; the partial folder is {tmp}", 1)
            meta = {"command": shlex.join(cmd).replace(str(tmp), str(final)), "seconds": round(time.time() - start, 1),
                    "hn_export_commit": git_commit(), "made_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / "made.json").write_text(json.dumps(meta, indent=1) + "\n")
            os.rename(tmp, final)
        meta_file = final / "made.json"
        made[key] = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        made[key]["bytes"] = sum(p.stat().st_size for p in final.glob("model*.onnx*"))
    return made


def mem_available_mb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def worker_arena(choice: str, graph: Graph) -> str:
    """The arena policy of one worker: `shrink-peers` shrinks the onnxruntime peers' arenas (FP32 and W8A8 at 1024 px
    need 12 and 7 GB with theirs kept) and keeps hn-export's (onnxruntime's default, what a user of the graph runs)."""
    if choice == "shrink-peers":
        return "keep" if graph.runtime == "hn" else "shrink"
    return choice


class Worker:
    def __init__(self, graph: Graph, model: Path, args: argparse.Namespace, logdir: Path):
        self.graph = graph
        self.log = logdir / f"worker-{graph.key}{'-noamx' if args.no_amx else ''}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", graph.runtime, "--model", str(model),
               "--threads", str(args.threads), "--ort-arena", worker_arena(args.ort_arena, graph)]
        if args.spinning:
            cmd.append("--spinning")
        if args.no_amx:
            cmd = [sys.executable, str(NO_AMX), "--", *cmd]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
        if args.malloc_hugetlb:  # every worker alike, peers included
            env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), MALLOC_HUGETLB]))
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         cwd=ROOT, env=env, bufsize=1)
        self.times: list[float] = []
        self.first_times: list[float] = []  # a split graph's first calls (prompt cache cleared)
        self.split = graph.source.endswith(SPLIT_SUFFIX)
        self.last: dict = {}
        self.amx_permitted: bool | None = None  # reported after each quality call
        self.loaded = self.receive()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            why = f"exit {code}" if code >= 0 else f"signal {-code}" + (" (SIGKILL: out of memory?)" * (code == -9))
            tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
            fail(f"the {self.graph.key} worker died ({why}): {tail[-600:]}", f"full log: {self.log}", 1)
        self.last = json.loads(line)
        return self.last

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.last = self.ask(cmd="exit")
                self.proc.wait(timeout=60)
            except (OSError, SystemExit, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def probe_amx(no_amx: bool) -> str:
    cmd = [sys.executable, str(NO_AMX), "--probe"]
    if no_amx:
        cmd = [sys.executable, str(NO_AMX), "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip() or "probe failed"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("onnxruntime", "openvino", "numpy", "onnx", "hn-export"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["hn-export commit"] = git_commit()
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pixart-sigma-256")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="weights and hn-export calibration; evaluation uses seed+1000")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per worker before the rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--caption-length", type=int, default=300)
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the end-of-denoising SQNR (0: skip)")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--graphs", default=",".join(GRAPHS), help=f"comma-separated subset of {','.join(GRAPHS)}")
    p.add_argument("--no-amx", action="store_true", help="run every worker under benchmarks/no_amx.py")
    p.add_argument("--malloc-hugetlb", action="store_true",
                   help=f"run every worker with GLIBC_TUNABLES={MALLOC_HUGETLB}: glibc's malloc asks for transparent "
                        "huge pages (madvise) for its heap and large blocks")
    p.add_argument("--ort-arena", choices=("keep", "shrink", "shrink-peers"), default="keep",
                   help="shrink: onnxruntime frees its arena after every call (for sizes whose workers do not fit "
                        "in memory together; each call then pays its page faults); shrink-peers: only the "
                        "onnxruntime peers' (FP32, W8A8, W4) do, hn-export's graphs keep theirs (OpenVINO has no "
                        "onnxruntime arena either way)")
    p.add_argument("--spinning", action="store_true",
                   help="onnxruntime's default thread spinning in every onnxruntime worker (default: off), with a "
                        f"{SPIN_PAUSE_S:g} s pause before each timed call")
    p.add_argument("--work-dir", type=Path, help="graphs are made here once and reused (default: a temp folder)")
    p.add_argument("--out", type=Path, help="write the results here (.json) and the table beside it (.md)")
    p.add_argument("--no-build", action="store_true", help="use the kernel library as built, do not rebuild it")
    p.add_argument("--prepare-only", action="store_true", help="make the graphs in --work-dir, run nothing")
    p.add_argument("--worker", choices=("ort", "openvino", "hn", "hn-ort"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--quantize-peer", nargs=3, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    keys = [k.strip() for k in args.graphs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in GRAPHS]
    if unknown:
        fail(f"unknown graph(s) {', '.join(unknown)} in --graphs", f"choose from {','.join(GRAPHS)}")
    for name in ("layers", "rounds", "threads", "caption_length", "samples"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} is {getattr(args, name)}", "pass a positive number")
    if args.warmup < 0 or args.steps < 0:
        fail("--warmup and --steps cannot be negative", "pass 0 or more")
    if args.out is not None:
        if args.out.suffix != ".json":
            fail(f"--out {args.out} does not end in .json", "name the results file X.json (the table goes to X.md)")
        for path in (args.out, args.out.with_suffix(".md")):
            if path.exists() and not path.is_file():
                fail(f"{path} exists and is not a regular file", "choose another --out")
        if not args.out.parent.is_dir():
            fail(f"the folder of --out {args.out} does not exist", "create it first")
    if args.work_dir is not None and args.work_dir.exists() and not args.work_dir.is_dir():
        fail(f"--work-dir {args.work_dir} is not a folder", "pass a folder")
    if args.prepare_only and args.work_dir is None:
        fail("--prepare-only without --work-dir", "pass --work-dir DIR to keep the graphs")
    if "openvino" in keys:
        try:
            import openvino  # noqa: F401
        except ImportError:
            fail("openvino is not installed", "pip install -e '.[bench]' (or leave openvino out of --graphs)")
    return ["fp32"] + [k for k in keys if k != "fp32"]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def kernel_library(args: argparse.Namespace, keys: list[str]) -> Path | None:
    """The hadanorm kernel library the hn-export workers register (built unless --no-build), or None if unused."""
    from runtime.kernels import library_path

    if not any(GRAPHS[k].runtime == "hn" for k in keys):
        return None
    library = library_path()
    if not args.no_build:
        from runtime.kernels.build import BuildError, build

        try:
            library = build()
        except BuildError as exc:
            fail(f"the hadanorm kernel library does not build ({exc})", "fix the build or pass --no-build", 1)
    if library is None:
        fail("the hadanorm kernel library is not built", "run `python -m runtime.kernels.build`")
    return library


def start_workers(keys: list[str], folder: Path, feeds: Path, args: argparse.Namespace, logs: Path,
                  workers: dict[str, Worker]) -> None:
    """One after the other: load, timing feeds, warm-up calls; stop before memory runs out."""
    guard_mb = 0.0
    for i, key in enumerate(keys):
        graph = GRAPHS[key]
        log(f"starting the {key} worker")
        w = workers[key] = Worker(graph, folder / graph.source / "model.onnx", args, logs)
        w.ask(cmd="feeds", path=str(feeds))
        for _ in range(args.warmup):
            w.ask(cmd="time")
        guard_mb = max(guard_mb, w.last["hwm_mb"] - w.loaded["base_mb"])
        left = len(keys) - i - 1
        if left and mem_available_mb() < 1.1 * guard_mb + 512:
            fail(f"{mem_available_mb():.0f} MB left with {i + 1} workers loaded, {left} to go (one took "
                 f"{guard_mb:.0f} MB)", "pass --ort-arena shrink or fewer --graphs", 1)


def time_rounds(workers: dict[str, Worker], rounds: int, pause_s: float = 0.0) -> None:
    """Round-robin, one call per graph per round, starting one graph later each round (a split graph: its first call
    of a generation, then a step); `pause_s` seconds of sleep before each timed call."""
    keys = list(workers)

    def timed(worker: Worker, cmd: str) -> float:
        if pause_s:
            time.sleep(pause_s)
        return worker.ask(cmd=cmd)["ms"]

    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            if workers[key].split:
                workers[key].first_times.append(timed(workers[key], "time-first"))
            workers[key].times.append(timed(workers[key], "time"))


def quality_outputs(w: Worker, sig, config, one_call: list[dict], tmp: Path) -> dict:
    """One call per sample and the final latents of hn-export's denoising loop, run by worker `w`."""
    import numpy as np

    from hn_export.denoise import denoise

    def run(feeds: dict) -> np.ndarray:
        np.savez(tmp / "feeds.npz", **feeds)
        w.amx_permitted = w.ask(cmd="run", path=str(tmp / "feeds.npz"), out=str(tmp / "out.npy"))["amx_permitted"]
        return np.load(tmp / "out.npy")

    out = {"one_call": np.concatenate([run(f) for f in one_call])}
    if config.steps:
        out["end"] = np.concatenate([denoise(run, sig, config, i) for i in range(config.samples)])
    return out


def generation_step_ms(w: Worker, steps: int) -> float:
    """The mean time of a step in a `steps`-step generation: a split graph's first call (prompt graph + step graph),
    then `steps` - 1 steps with the prompt's values cached; any other graph: its one-call time."""
    step = statistics.median(w.times)
    if not w.split:
        return step
    return (statistics.median(w.first_times) + (steps - 1) * step) / steps


def graph_rows(workers: dict[str, Worker], outputs: dict[str, dict], made: dict[str, dict],
               steps: int) -> dict[str, dict]:
    from hn_export.metrics import sqnr_db

    median = {key: statistics.median(w.times) for key, w in workers.items()}
    fastest_peer = min(ms for key, ms in median.items() if GRAPHS[key].peer)
    per_step = {key: generation_step_ms(w, steps) for key, w in workers.items()}
    ref = outputs["fp32"]
    rows = {}
    for key, w in workers.items():
        rows[key] = {
            "label": GRAPHS[key].label, "runs_as": w.loaded["info"]["runs_as"], "info": w.loaded["info"],
            "median_ms": median[key], "min_ms": min(w.times), "max_ms": max(w.times), "times_ms": w.times,
            "speedup_vs_fp32": median["fp32"] / median[key], "speedup_vs_fastest_peer": fastest_peer / median[key],
            "split": w.split, "first_call_ms": statistics.median(w.first_times) if w.split else None,
            "first_times_ms": w.first_times, "generation_steps": steps, "generation_step_ms": per_step[key],
            "generation_speedup_vs_fastest_peer": fastest_peer / per_step[key],
            "rss_before_load_mb": w.loaded["base_mb"], "rss_after_load_mb": w.loaded["rss_mb"],
            "peak_rss_mb": w.last.get("hwm_mb"), "rss_at_end_mb": w.last.get("rss_mb"),
            "amx_permitted_in_worker": w.amx_permitted,
            "one_call_sqnr_db": None if key == "fp32" else sqnr_db(ref["one_call"], outputs[key]["one_call"]),
            "end_sqnr_db": None if key == "fp32" or "end" not in ref else sqnr_db(ref["end"], outputs[key]["end"]),
            "graph": made[GRAPHS[key].source],
        }
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        return worker(args)
    if args.quantize_peer:
        kind, src, dst = args.quantize_peer
        return quantize_peer(kind, Path(src), Path(dst))
    keys = check_args(args)
    command = "python benchmarks/bench_peers.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    sys.path[:0] = [str(ROOT), str(HERE)]
    import numpy as np

    from hn_export.denoise import DenoiseConfig, ModelSignature, first_call_feeds
    from hn_export.errors import UserError
    from hn_export.model_files import load_model
    from machine_info import machine
    from runtime.kernel_isa import library_isa

    library = kernel_library(args, keys)
    started, load_start = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp_name:
        tmp = Path(tmp_name)
        work = args.work_dir or tmp / "graphs"
        folder = work / f"{args.preset}-{args.layers}blocks-seed{args.seed}"
        folder.mkdir(parents=True, exist_ok=True)
        made = prepare(folder, args.preset, args.layers, args.seed, keys, log)
        if args.prepare_only:
            print("\n".join(f"{folder / key}: {meta['bytes'] / 1e6:.0f} MB, {meta.get('command', '?')}"
                            for key, meta in made.items()))
            return
        try:
            sig = ModelSignature.of(load_model(folder / "fp32" / "model.onnx"))
        except UserError as exc:
            fail(f"{exc.problem} (a cached graph)", f"delete {folder / 'fp32'} to remake it")
        config = DenoiseConfig(steps=args.steps, samples=args.samples, seed=args.seed + 1000,
                               caption_length=args.caption_length)
        one_call = [first_call_feeds(sig, config, i) for i in range(args.samples)]
        np.savez(tmp / "timing.npz", **one_call[0])
        logs = work / "logs"  # kept with --work-dir
        logs.mkdir(exist_ok=True)
        workers: dict[str, Worker] = {}
        try:
            start_workers(keys, folder, tmp / "timing.npz", args, logs, workers)
            log(f"{args.rounds} interleaved rounds")
            time_rounds(workers, args.rounds, SPIN_PAUSE_S if args.spinning else 0.0)
            load_timed = os.getloadavg()
            outputs = {}
            for key, w in workers.items():
                log(f"quality of {key}")
                outputs[key] = quality_outputs(w, sig, config, one_call, tmp)
        finally:
            for w in workers.values():
                w.close()
    rows = graph_rows(workers, outputs, made, args.steps or GENERATION_STEPS)
    result = {
        "command": command, "machine": machine(), "versions": versions(),
        "amx": "refused (benchmarks/no_amx.py)" if args.no_amx else "allowed",
        "amx_probe_in_workers": probe_amx(args.no_amx),
        "amx_held_by_workers": f"{sum(bool(r['amx_permitted_in_worker']) for r in rows.values())} of {len(rows)}",
        "kernel_library": {"path": str(library) if library else None,
                           "isa_in_parent": library_isa(library) if library else None,
                           "in_workers": sorted({r["runs_as"] for k, r in rows.items() if GRAPHS[k].runtime == "hn"})},
        "settings": {k: getattr(args, k) for k in ("preset", "layers", "seed", "rounds", "warmup", "threads",
                                                   "caption_length", "steps", "samples", "ort_arena",
                                                   "malloc_hugetlb", "spinning")},
        "batch": int(one_call[0][next(iter(sig.batched))].shape[0]) if sig.batched else None,
        "evaluation_seed": args.seed + 1000,
        "load_average": {"start": load_start, "after_rounds": load_timed, "end": os.getloadavg()},
        "seconds": round(time.time() - started, 1), "graphs": rows,
    }
    text = table(result)
    if args.out is not None:
        write_atomic(args.out, json.dumps(result, indent=1, default=str) + "\n")
        write_atomic(args.out.with_suffix(".md"), text)
    print(text)


def table(result: dict) -> str:
    s = result["settings"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    rows = result["graphs"]
    lines = [
        f"# Peers on the CPU: {s['preset']}, {s['layers']} blocks, AMX {result['amx']}", "",
        f"Command: `{result['command']}` ({result['seconds']:.0f} s)",
        f"Machine: {result['machine']}; AMX probe in a worker: {result['amx_probe_in_workers']}; workers holding the "
        f"AMX permission after their calls: {result['amx_held_by_workers']}; load average "
        f"{result['load_average']['start'][0]:.2f} at the start, {result['load_average']['after_rounds'][0]:.2f} "
        "after the rounds.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "; hadanorm kernels: "
        + (", ".join(result["kernel_library"]["in_workers"]) or "-"),
        f"One denoiser call, batch {result['batch']} (guidance pair), caption {s['caption_length']}, {s['threads']} "
        f"threads, each graph in its own process; median of {s['rounds']} interleaved rounds after {s['warmup']} "
        f"warm-up calls; onnxruntime arena: {s['ort_arena']}; onnxruntime thread spinning: "
        + ("on (its default), a pause before each timed call" if s.get("spinning") else "off")
        + (f"; every worker with GLIBC_TUNABLES={MALLOC_HUGETLB} (transparent huge pages for malloc)"
           if s.get("malloc_hugetlb") else "")
        + (" (the onnxruntime peers shrink theirs after every call; hn-export's graphs keep theirs, onnxruntime's "
           "default)" if s["ort_arena"] == "shrink-peers" else "") + f". SQNR vs onnxruntime FP32 on held-out inputs (seed "
        f"{result['evaluation_seed']}): one call per sample, and the final latents of {s['steps']} denoising steps, "
        f"{s['samples']} samples. RSS: absolute, of the worker process (its imports: the before-load column).",
        "",
        "| graph | runs as | ms | vs FP32 | vs fastest peer | RSS before load MB | RSS after load MB | peak RSS MB "
        "| one-call SQNR dB | end-of-denoising SQNR dB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows.values():
        ms = (f"{r['median_ms']:.1f} a step, {r['first_call_ms']:.1f} the first" if r.get("split") else
              f"{r['median_ms']:.1f}")
        lines.append(f"| {r['label']} | {r['runs_as']} | {ms} | {r['speedup_vs_fp32']:.2f}x | "
                     f"{r['speedup_vs_fastest_peer']:.2f}x | {r['rss_before_load_mb']:.0f} | "
                     f"{r['rss_after_load_mb']:.0f} | {fmt(r['peak_rss_mb'], '.0f')} | "
                     f"{fmt(r['one_call_sqnr_db'], '.1f')} | {fmt(r['end_sqnr_db'], '.1f')} |")
    lines += ["", "vs FP32 / vs fastest peer: speed-ups (time of FP32 / of the fastest non-hn-export graph over this "
              "graph's time; above 1 is faster). A split graph's ms: a step with the prompt's values cached, and the "
              "first call of a generation (prompt graph + step graph); its vs FP32 and vs fastest peer compare that "
              "step with the other graphs' one call (the generation table below amortizes its first call)."]
    split = [r for r in rows.values() if r.get("split")]
    if split:
        steps = split[0]["generation_steps"]
        lines += ["", f"A step of a {steps}-step generation, mean ((first call + {steps - 1} steps) / {steps}; graphs "
                  "that are not split: their one-call time):", "",
                  "| graph | ms a step | vs fastest peer |", "|---|---:|---:|"]
        lines += [f"| {r['label']} | {r['generation_step_ms']:.1f} | {r['generation_speedup_vs_fastest_peer']:.2f}x |"
                  for r in rows.values()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

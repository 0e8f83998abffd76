"""Static per-timestep activation scales (HQ-DM's temporal steps): calibration from trajectories, and the table file.

`calibrate_act_scales` builds the transformed (not quantized) graph with one probe output per site
(`graph_passes.activation_probe`: max |x~| of what the site's quantizer reads), runs the calibration trajectories
(or a ``--calib`` file) through it, and groups the calls by the timestep value fed: for step ``k`` (timestep
``t_k``, in the order first seen) and site ``i``, ``absmax[i][k]`` = the max over the calls at ``t_k`` (every sample
and both halves of the guidance pair). The graph picks step ``k`` from its timestep input at run time
(`graph_passes.static_act_quant`); a scale is ``absmax / (2^(b-1) - 1)``, so one table serves every bit width.

Table file (JSON, ``--save-act-scales`` writes it, ``--act-scales`` reads it; a hand-written schedule has the same
form): ``{"timestep_input": "timestep", "timesteps": [t_0, ...], "absmax": {"<site>": [a_0, ...], ...}}``.
``timesteps`` may be left out: then they are the family scheduler's timesteps for ``--calib-steps`` steps. Every
list must have one value per step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graph_passes.activation_probe import probe_name
from graph_passes.linears import ActivationSite, SiteSelection
from graph_passes.methods import TransformOptions
from graph_passes.pipeline import quantize_model
from graph_passes.site_transforms import SiteStats
from graph_passes.static_act_quant import ActScaleTable
from hn_export.calibration import npz_batches
from hn_export.denoise import DenoiseConfig, ModelSignature, family_of, trajectory
from hn_export.errors import UserError
from hn_export.model_files import write_atomic
from hn_export.ort_models import open_session

logger = logging.getLogger(__name__)


def calibrate_act_scales(model: ir.Model, sites: list[ActivationSite], stats: dict[str, SiteStats],
                         options: TransformOptions, selection: SiteSelection, config: DenoiseConfig,
                         inputs: Path | None = None, progress: bool = True) -> ActScaleTable:
    """The per-step table of the FP graph `model` (left unchanged) transformed by `options`."""
    sig = ModelSignature.of(model)
    timestep_input = family_of(sig).timestep_input
    probe = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    quantize_model(probe, stats, options, None, selection, probe=True)
    names = [probe_name(i) for i in range(len(sites))]
    output = probe.graph.outputs[0].name
    steps: dict[float, np.ndarray] = {}  # timestep -> [sites] running max
    with open_session(probe) as session:
        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            results = session.run([output, *names], feeds)
            t = float(np.asarray(feeds[timestep_input]).reshape(-1)[0])
            values = np.array([float(v) for v in results[1:]], dtype=np.float64)
            if not np.all(np.isfinite(values)):
                raise UserError("an activation became NaN or inf while calibrating the activation scales",
                                "check the model (an FP16 graph may overflow: calibrate the FP32 graph)")
            steps[t] = np.maximum(steps[t], values) if t in steps else values
            return results[0]

        if inputs is not None:
            for feeds in tqdm(list(npz_batches(inputs, sig)), desc="activation scales", unit="call",
                              disable=not progress):
                run(feeds)
        else:
            with tqdm(total=config.samples * config.steps, desc="activation scales", unit="call",
                      disable=not progress) as bar:
                for index in range(config.samples):
                    for _ in trajectory(run, sig, config, index):
                        bar.update(1)
    timesteps = np.array(list(steps), dtype=np.float64)
    table = np.stack(list(steps.values()), axis=1)  # [sites, steps]
    logger.info("activation scales: %d sites x %d timesteps", len(sites), len(timesteps))
    return ActScaleTable(timestep_input, timesteps, {site.name: table[i] for i, site in enumerate(sites)})


def schedule_timesteps(model: ir.Model, steps: int) -> np.ndarray:
    """The timestep values the family's scheduler feeds for `steps` steps (as the denoising loop passes them)."""
    sig = ModelSignature.of(model)
    return np.array([float(t) for t in family_of(sig).scheduler(steps, sig).timesteps], dtype=np.float64)


def save_act_scales(table: ActScaleTable, path: Path) -> None:
    data = {"timestep_input": table.timestep_input, "timesteps": [float(t) for t in table.timesteps],
            "absmax": {site: [float(v) for v in values] for site, values in table.absmax.items()}}
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def _number_list(value, what: str, path: Path) -> np.ndarray:
    """A flat JSON list of finite numbers (not a string, a scalar or nested lists)."""
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise UserError(f"{path}: {what} is not a flat list of numbers", "give one number per denoising step")
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise UserError(f"{path}: {what} holds a non-finite value", "give finite numbers")
    return array


def load_act_scales(path: Path, model: ir.Model, sites: list[ActivationSite], steps: int) -> ActScaleTable:
    """Read a table file for `sites`; every list must have `steps` values (one per denoising step), each max |x| a
    finite number the graph's float type holds."""
    if not path.exists():
        raise UserError(f"activation scale file {path} does not exist", "check the path, or omit --act-scales "
                        "to calibrate the per-timestep scales")
    not_table = UserError(f"{path} is not an activation scale table (JSON with an 'absmax' object of per-site lists)",
                          "write it with --save-act-scales, or follow the format in the README")
    if not path.is_file():
        raise not_table
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        raise not_table from None
    if not isinstance(data, dict) or not isinstance(data.get("absmax"), dict):
        raise not_table
    sig = ModelSignature.of(model)
    limit = float(np.finfo(sig.dtype).max) if np.issubdtype(sig.dtype, np.floating) else float(np.finfo(np.float32).max)
    timesteps = data.get("timesteps")
    if timesteps is None:
        timesteps = schedule_timesteps(model, steps)
    else:
        timesteps = _number_list(timesteps, "timesteps", path)
        if len(set(timesteps.tolist())) != len(timesteps):
            raise UserError(f"{path}: timesteps repeat a value", "give each step's timestep once")
    if len(timesteps) != steps:
        raise UserError(f"{path} has {len(timesteps)} timesteps but the schedule has {steps} steps (--calib-steps)",
                        f"give one value per step, or pass --calib-steps {len(timesteps)}")
    absmax = {}
    for site, values in data["absmax"].items():
        values = _number_list(values, f"absmax of site {site}", path)
        if len(values) != steps:
            raise UserError(f"{path} has {len(values)} values for site {site} but the schedule has {steps} steps "
                            "(--calib-steps)", "give one value per step")
        if np.any(values < 0) or np.any(values > limit):
            raise UserError(f"{path}: site {site} has a value outside 0..{limit:.4g} (the graph's {sig.dtype} range)",
                            "give max |x| per step")
        absmax[str(site)] = values
    missing = [site.name for site in sites if site.name not in absmax]
    if missing:
        raise UserError(f"{path} has no values for {len(missing)} site(s), e.g. {missing[0]}",
                        "list every site (`hn-export layers MODEL.onnx`), or recalibrate with --save-act-scales")
    timestep_input = data.get("timestep_input")
    if timestep_input is None:
        timestep_input = family_of(sig).timestep_input
    if not isinstance(timestep_input, str) or timestep_input not in sig.shapes:
        raise UserError(f"{path}: timestep_input {timestep_input!r} is not an input of the graph "
                        f"({sorted(sig.shapes)})", "name the graph's timestep input, or leave it out")
    return ActScaleTable(timestep_input, timesteps, absmax)  # lengths checked above

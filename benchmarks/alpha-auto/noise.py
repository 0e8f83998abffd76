"""How noisy is E(a) from 240 rows? Block-0 sites: errors from the default sample vs from ~all tokens of 10 calls."""
import dataclasses, sys
import numpy as np
from pathlib import Path
from graph_passes.alpha_search import site_errors
from graph_passes.linears import find_activation_sites
from graph_passes.methods import AlphaSearch, Method, TransformOptions, DEFAULT_ALPHA_GRID
from graph_passes.quantization import QuantConfig
from hn_export.calibration import SampleRequest, calibrate
from hn_export.denoise import DenoiseConfig
from hn_export.families import selection_for
from hn_export.graph_import import load_graph

path = Path(sys.argv[1]); method = Method(sys.argv[2]); prefix = sys.argv[3]
model = load_graph(path)
sites = find_activation_sites(model, selection_for(model))
index = {s.name: i for i, s in enumerate(sites)}
chosen = [s for s in sites if s.name.startswith(prefix)]
opts = TransformOptions(method=method, alpha=AlphaSearch())
q = QuantConfig(4, 4)
for label, config, budget in (("default 240 rows (2x20 calls)", DenoiseConfig(samples=2, steps=20), 256),
                              ("other seed 240 rows", DenoiseConfig(samples=2, steps=20, seed=5), 256),
                              ("big: 600 rows/call x 2x10 calls", DenoiseConfig(samples=2, steps=10, seed=9), 12000)):
    req = dataclasses.replace(SampleRequest.of(chosen, method.recipe.center), budget=budget)
    stats = calibrate(path, config, progress=False, model=model, samples=req)
    print("==", label)
    for s in chosen:
        e = site_errors(s, index[s.name], stats.sites[s.activation.name], stats.samples[s.activation.name], opts, q,
                        DEFAULT_ALPHA_GRID)
        print(f"{s.name:40s} n={stats.samples[s.activation.name].rows.shape[0]:6d} rel={np.round(e / e.min(), 3)} -> {DEFAULT_ALPHA_GRID[int(np.argmin(e))]}", flush=True)

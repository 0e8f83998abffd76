"""The quantization plan and its emitters: one `SitePlan` per site, three formats written from it.

* the plan is typed and frozen; a weight read by two linears of one site is planned once;
* the three formats store the same integers and scales (decoded from each file's own layout);
* an emitter refuses plans made for another model (onnx-ir's `requires`), and `quantize_model` finds no sites when
  it is given them (sites are found once per job);
* a written model of every format carries no ``hadanorm.*`` node metadata (the passes share no tags).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graph_passes.emit_fused import FusedEmitter
from graph_passes.emit_nbits import NBitsEmitter
from graph_passes.emit_qdq import QdqEmitter
from graph_passes.linears import find_activation_sites
from graph_passes.methods import BiasCorrection, Method, TransformOptions
from graph_passes.pipeline import quantize_model
from graph_passes.quantization import OutputFormat, QuantConfig
from graph_passes.site_plan import SitePlan, plan_sites
from tests.format_codes import assert_same_int4_codes
from tests.graphs import dit_like_input, mlp_model
from tests.roles import ALL_PIXART
from tests.test_passes import calibration_stats

OPTIONS = TransformOptions(method=Method.HADANORM, hadamard_block=8)
QUANT = QuantConfig(4, 4, weight_block=16)


def _plans(model: ir.Model, quant: QuantConfig | None = QUANT) -> tuple[SitePlan, ...]:
    x = dit_like_input(72)
    return plan_sites(find_activation_sites(model, ALL_PIXART), calibration_stats(model, x), OPTIONS, quant)


def test_plan_is_frozen_and_complete():
    plans = _plans(mlp_model(72, 288))
    assert [plan.name for plan in plans] == ["up", "down"]  # x -> up + side (one site), act -> down
    up = plans[0]
    assert [lp.layer.module_path for lp in up.linears] == ["up", "side"]
    assert up.act.bits == 4 and up.act.static is None and up.bias_correction is BiasCorrection.FLOAT_TOKEN
    assert up.transform.center and up.transform.hadamard is not None and all(lp.weight.low_rank is None for lp in up.linears)
    weight = up.linears[0].weight
    assert weight.quantized.bits == 4 and weight.quantized.q.shape == (72, 288) and weight.fused is None
    assert weight.quantized.scale.shape == (-(-72 // 16), 288) and weight.correction is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        up.act = None  # type: ignore[misc]
    float_plans = _plans(mlp_model(72, 288), quant=None)
    assert float_plans[0].act is None and float_plans[0].linears[0].weight.quantized is None
    assert float_plans[0].linears[0].weight.fused.dtype == np.float32


def test_weight_of_two_linears_in_one_site_is_planned_once():
    model = mlp_model(72, 72)
    next(n for n in model.graph if n.name == "side").replace_input_with(1, model.graph.initializers["w_up"])
    up = _plans(model)[0]
    assert [lp.layer.module_path for lp in up.linears] == ["up", "side"]
    assert up.linears[0].weight is up.linears[1].weight and not up.linears[0].weight.copy


def _quantized(fmt: OutputFormat) -> ir.Model:
    model = mlp_model(72, 288)
    x = dit_like_input(72)
    quantize_model(model, calibration_stats(model, x), OPTIONS, dataclasses.replace(QUANT, format=fmt), ALL_PIXART)
    return model


def _array(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


@pytest.mark.parametrize("weight", ["w_up", "w_side", "w_down"])
def test_three_formats_store_the_same_integers(weight):
    qdq, nbits, fused = (_quantized(fmt) for fmt in OutputFormat)
    assert_same_int4_codes(qdq, nbits, fused, weight)


@pytest.mark.parametrize("emitter", [QdqEmitter, NBitsEmitter, FusedEmitter])
def test_emitter_refuses_plans_of_another_model(emitter):
    plans = _plans(mlp_model(72, 288))
    with pytest.raises(ir.passes.PreconditionError, match="^the plan of site up was made for another graph$"):
        emitter(plans)(mlp_model(72, 288))


def test_sites_given_are_not_searched_again(monkeypatch):
    model = mlp_model(72, 288)
    sites = find_activation_sites(model, ALL_PIXART)
    stats = calibration_stats(model, dit_like_input(72))

    def search(*args, **kwargs):
        raise AssertionError("sites searched again")

    monkeypatch.setattr("graph_passes.pipeline.find_activation_sites", search)
    result = quantize_model(model, stats, OPTIONS, QUANT, ALL_PIXART, sites=sites)
    assert [plan.site for plan in result.plans] == sites


@pytest.mark.parametrize("args", [("--format", "qdq"), ("--format", "nbits"), ("--format", "fused"),
                                  ("--transform-only",), ("--method", "hqdm", "--hadamard-block", "8",
                                                          "--weight-block", "16", "--format", "fused")],
                         ids=["qdq", "nbits", "fused", "transform-only", "hqdm-fused"])
def test_written_model_carries_no_pass_tags(hn_cli, tiny_onnx, tmp_path, args):
    out = tmp_path / "out.onnx"
    result = hn_cli(tiny_onnx, *args, "--calib-samples", "1", "--calib-steps", "2", "-o", out, "--no-progress")
    assert result.exit_code == 0, result.err
    model = onnx.load(out)
    nodes = [*model.graph.node, *(node for function in model.functions for node in function.node)]
    assert any(n.domain == "hadanorm" for n in nodes)
    assert [(n.name, p.key) for n in nodes for p in n.metadata_props if p.key.startswith("hadanorm")] == []

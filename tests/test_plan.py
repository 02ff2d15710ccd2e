"""The plan: JSON round trip, schema, version and model checks, density."""

import json

import pytest

from compressor.errors import PlanError
from compressor.plan import (
    AttentionLayerPlan,
    DensePattern,
    LayerPlan,
    Plan,
    WindowPattern,
    causal_window_density,
    validate_schema,
)
from tests.conftest import tiny_model


def _mixed_plan(model) -> Plan:
    plan = Plan.dense(model)
    plan.layers[0] = LayerPlan(
        AttentionLayerPlan([WindowPattern(alpha=-64.0, beta=0.25, sink=4), DensePattern(),
                            WindowPattern(alpha=32.0, sink=0), DensePattern()], quant={"variant": "int8-qk/fp16-pv"}),
        linear={"self_attn.q_proj": {"precision": "w8a8-int8"}},
    )
    plan.recipe = {"name": "test"}
    return plan


def test_plan_round_trips_through_json_and_matches_schema():
    model = tiny_model()
    plan = _mixed_plan(model)
    doc = json.loads(plan.to_json())
    validate_schema(doc)
    again = Plan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    assert again.layers[0].attention.heads[0] == WindowPattern(alpha=-64.0, beta=0.25, sink=4)


def test_plan_of_another_version_is_refused():
    doc = _mixed_plan(tiny_model()).to_dict()
    doc["version"] = 99
    with pytest.raises(PlanError, match="version 99"):
        Plan.from_dict(doc)


def test_schema_rejects_a_window_without_alpha():
    doc = _mixed_plan(tiny_model()).to_dict()
    del doc["layers"][0]["attention"]["heads"][0]["alpha"]
    with pytest.raises(PlanError, match="layers.0.attention.heads.0"):
        Plan.from_dict(doc)


def test_unknown_pattern_type_is_named():
    doc = _mixed_plan(tiny_model()).to_dict()
    doc["layers"][1]["attention"]["heads"][2] = {"type": "windw"}
    with pytest.raises(PlanError, match="did you mean `window`"):
        Plan.from_dict(doc)


def test_plan_for_another_model_is_refused_naming_both_sides():
    plan = Plan.dense(tiny_model("llama"))
    other = tiny_model("qwen3")  # head_dim 16 either way, but let us change the head count
    other.config.num_attention_heads = 8
    with pytest.raises(PlanError, match="num_attention_heads: plan 4 vs model 8"):
        plan.check_against(other)


@pytest.mark.parametrize("sink,window,n", [(0, 5, 20), (3, 5, 20), (7, 1, 9), (4, 30, 20), (0, 1, 1), (64, 100, 300)])
def test_causal_window_density_matches_counting(sink, window, n):
    count = sum(1 for i in range(n) for j in range(i + 1) if i - j < window or j < sink)
    assert causal_window_density(sink, window, n) == pytest.approx(count / (n * (n + 1) / 2))


def test_window_for_length_is_clamped():
    p = WindowPattern(alpha=-100.0, beta=0.5, sink=0)
    assert [p.window_for_length(n) for n in (100, 200, 1000)] == [1, 1, 400]
    assert WindowPattern(alpha=5000.0).window_for_length(300) == 300


def test_window_pattern_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        WindowPattern(alpha=1.0, beta=1.5)


def test_save_is_atomic_and_load_reads_folder(tmp_path):
    plan = _mixed_plan(tiny_model())
    plan.save(tmp_path / "compression_plan.json")
    assert Plan.load(tmp_path).to_dict() == plan.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["compression_plan.json"]

"""The MoA method: candidate rules, budgeted search, and the whole calibrate-profile-search-score run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from compressor import runtime
from compressor.errors import CompressorError, RecipeError
from compressor.methods import METHODS, CompressionContext
from compressor.methods.moa import MoAConfig, candidate_rules, plan_from_heads, search_plan
from compressor.plan import DensePattern, Plan, WindowPattern
from compressor.recipe import parse_recipe
from conftest import tiny_model

LENGTHS = [192, 256]
MOA_SECTION = {
    "method": "moa", "density": 0.6, "sink": 8, "alpha_min": -64, "alpha_max": 256, "alpha_step": 32,
    "score_samples": 2, "answer_tokens": 4, "chunk": 48,
}


def tiny_recipe(**moa: object) -> dict:
    return {
        "name": "moa-tiny",
        "calibration": {"source": "corpus,passkey", "samples": 2, "lengths": LENGTHS, "seed": 0},
        "attention": {**MOA_SECTION, **moa},
        "report_lengths": [256, 512],
    }


def test_candidate_rules_fit_every_length():
    config = MoAConfig(sink=64, alpha_min=-2048, alpha_max=8192, alpha_step=1024)

    rules = candidate_rules(config, [2048, 4096, 8192])

    windows = [r.window_for_length(n) for r in rules if isinstance(r, WindowPattern) for n in (2048, 4096, 8192)]
    assert isinstance(rules[-1], DensePattern) and len(rules) > 10
    assert all(1 <= w for w in windows)
    assert all(1 <= np.floor(r.alpha + r.beta * n) <= n for r in rules[:-1] for n in (2048, 4096, 8192))


def test_config_errors_name_the_bad_value():
    with pytest.raises(RecipeError, match="density must be in"):
        parse_recipe(tiny_recipe(density=1.5))
    with pytest.raises(RecipeError, match="beta_steps"):
        parse_recipe(tiny_recipe(beta_steps=0))


def test_search_holds_the_budget_at_every_length_and_ties_kv_groups():
    rng = np.random.default_rng(0)
    rules = candidate_rules(MoAConfig(sink=8, alpha_min=-64, alpha_max=256, alpha_step=32), LENGTHS)
    loss = rng.exponential(size=(3, 4, len(rules), len(LENGTHS)))

    heads, record = search_plan(loss, rules, LENGTHS, 0.4, [], group=2, max_rules_per_layer=2)

    densities = [sum(p.density(n) for row in heads for p in row) / 12 for n in LENGTHS]
    assert all(d <= 0.4 for d in densities), densities
    assert all(row[0] == row[1] and row[2] == row[3] for row in heads)
    assert all(len(set(map(repr, row))) <= 2 for row in heads)
    assert record["status"] == "optimal"


@pytest.fixture(scope="module")
def moa_result(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.config.max_position_embeddings = 4096
    recipe = parse_recipe(tiny_recipe())
    ctx = CompressionContext(model=model, tokenizer=tokenizer, recipe=recipe, device=torch.device("cpu"))
    result = METHODS[("attention", "moa")].run(ctx, recipe.attention)
    return model, result


def test_trade_off_points_below_what_the_rules_reach_are_skipped_not_fatal(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    recipe = parse_recipe(tiny_recipe(density_scales=[1.0, 0.01], length_powers=[0.0], score_length=0))
    ctx = CompressionContext(model=model, tokenizer=tokenizer, recipe=recipe, device=torch.device("cpu"))

    result = METHODS[("attention", "moa")].run(ctx, recipe.attention)

    assert len(result.search["plans"]) == 1
    assert [s["budget"] for s in result.search["skipped"] if "budget" in s] == [pytest.approx(0.006)]


def test_task_weightings_each_give_a_plan_from_one_profile(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    recipe = parse_recipe(tiny_recipe(density_scales=[1.0], length_powers=[0.0], score_length=0,
                                      task_weights=[{}, {"passkey": 8.0}, {"corpus": 0.0}]))
    ctx = CompressionContext(model=model, tokenizer=tokenizer, recipe=recipe, device=torch.device("cpu"))

    result = METHODS[("attention", "moa")].run(ctx, recipe.attention)

    plans = result.search["plans"]
    assert [p["task_weights"] for p in plans] == [{}, {"passkey": 8.0}, {"corpus": 0.0}]
    assert plans[1]["name"].endswith("tasks=passkey:8")
    # corpus weighted 0: only the passkey samples' influence is left, so the estimate differs from the equal mix
    assert plans[2]["estimated_loss"] != plans[0]["estimated_loss"]
    assert result.search["tasks"] == {"corpus": {str(n): 1 for n in LENGTHS}, "passkey": {str(n): 1 for n in LENGTHS}}

    bad = parse_recipe(tiny_recipe(task_weights=[{"lines": 2.0}], score_length=0))
    with pytest.raises(CompressorError, match="'lines'.*only the tasks 'corpus', 'passkey'"):
        METHODS[("attention", "moa")].run(CompressionContext(model=model, tokenizer=tokenizer, recipe=bad,
                                                             device=torch.device("cpu")), bad.attention)
    with pytest.raises(RecipeError, match="task_weights"):
        parse_recipe(tiny_recipe(task_weights=[{"passkey": -1}]))


def test_end_to_end_plan_meets_the_budget(moa_result):
    model, result = moa_result

    plan = plan_from_heads(model, result.heads)

    assert all(plan.density(n) <= 0.6 + 1e-12 for n in LENGTHS)
    assert any(isinstance(h, WindowPattern) for row in result.heads for h in row)


def test_end_to_end_records_every_plan_and_the_choice(moa_result):
    _, result = moa_result

    plans = result.search["plans"]

    assert len(plans) == 4  # 2 length weightings x 2 budgets
    assert all(p["measured_loss"] is not None and p["budget"] <= 0.6 for p in plans)
    best = min(p["measured_loss"] for p in plans)
    assert plans[result.search["chosen"]]["measured_loss"] == best
    assert result.search["scoring"]["length"] == 512 and result.search["scoring"]["unseen"]
    assert set(result.calibration["dense_loss"]) == {str(n) for n in LENGTHS}


def test_end_to_end_plan_round_trips_and_applies(moa_result):
    model, result = moa_result
    plan = plan_from_heads(model, result.heads)
    plan.search = result.search

    loaded = Plan.from_json(plan.to_json())
    runtime.apply(model, loaded)
    try:
        logits = model(torch.randint(0, 100, (1, 300))).logits
    finally:
        runtime.remove(model)

    assert [layer.attention.heads for layer in loaded.layers] == result.heads
    assert torch.isfinite(logits).all()


def test_compress_cli_with_a_moa_recipe(tiny_model_dir, tmp_path):
    from compressor.cli import main

    recipe = tmp_path / "moa-tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(length_powers=[0.0], density_scales=[1.0], score_length=0)))
    out = tmp_path / "out"

    code = main(["--model", str(tiny_model_dir), "--recipe", str(recipe), "--output", str(out), "--no-report"])

    plan = Plan.load(out)
    assert code == 0
    assert plan.search["attention"]["plans"][0]["budget"] == 0.6
    assert all(plan.density(n) <= 0.6 + 1e-12 for n in LENGTHS)


def test_refinement_profiles_at_the_chosen_plan_and_keeps_the_best_measured(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.config.max_position_embeddings = 4096
    recipe = parse_recipe(tiny_recipe(density_scales=[1.0], length_powers=[0.0, 1.0], refine_rounds=2, density=0.4))
    ctx = CompressionContext(model=model, tokenizer=tokenizer, recipe=recipe, device=torch.device("cpu"))

    result = METHODS[("attention", "moa")].run(ctx, recipe.attention)

    plans = result.search["plans"]
    assert [p["name"].partition(",refined=")[2] for p in plans] == ["", "", "1", "1", "2", "2"]
    assert all(p["measured_loss"] is not None and p["density"][str(n)] <= 0.4 + 1e-9 for p in plans for n in LENGTHS)
    assert plans[result.search["chosen"]]["measured_loss"] == min(p["measured_loss"] for p in plans)
    assert result.calibration["seconds"]["refine_profile"] > 0
    # the operating point's estimates differ from the dense model's: the refined searches price rules differently
    assert plans[2]["estimated_loss"] != plans[0]["estimated_loss"]
    for bad in ({"refine_rounds": -1}, {"refine_mix": 0.0}):
        with pytest.raises(RecipeError, match=next(iter(bad))):
            parse_recipe(tiny_recipe(**bad))


def test_search_holds_dense_items_dense_and_the_rest_in_budget():
    rng = np.random.default_rng(1)
    rules = candidate_rules(MoAConfig(sink=8, alpha_min=-64, alpha_max=256, alpha_step=32), LENGTHS)
    loss = rng.exponential(size=(3, 4, len(rules), len(LENGTHS)))
    loss[..., -1, :] = 50.0  # dense is never worth it by the estimate alone

    free, _ = search_plan(loss, rules, LENGTHS, 0.6, [], group=2, max_rules_per_layer=None)
    held, _ = search_plan(loss, rules, LENGTHS, 0.6, [], group=2, max_rules_per_layer=None, dense_items=[1, 4])

    assert not any(isinstance(p, DensePattern) for row in free for p in row)
    # item i = (layer i // 2, KV group i % 2 = query heads 2 * (i % 2), 2 * (i % 2) + 1)
    assert [(layer, h) for layer, row in enumerate(held) for h, p in enumerate(row) if isinstance(p, DensePattern)] == [
        (0, 2), (0, 3), (2, 0), (2, 1)]
    assert all(sum(p.density(n) for row in held for p in row) / 12 <= 0.6 for n in LENGTHS)
    with pytest.raises(CompressorError, match="dense rule"):
        search_plan(loss[:, :, :-1], rules[:-1], LENGTHS, 0.6, [], group=2, max_rules_per_layer=None, dense_items=[0])


def test_retrieval_heads_ranked_by_copy_score_are_held_dense_and_scoring_weighs_tasks_equally(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.config.max_position_embeddings = 4096
    # true passkey answers (not the random model's): their digits stand in the prompt, so heads copy them
    recipe = parse_recipe(tiny_recipe(density_scales=[1.0], length_powers=[0.0], align_answers=False,
                                      retrieval_dense=[0.0, 0.25, 0.75]))
    ctx = CompressionContext(model=model, tokenizer=tokenizer, recipe=recipe, device=torch.device("cpu"))
    sig = model.config
    items = sig.num_hidden_layers * sig.num_key_value_heads

    result = METHODS[("attention", "moa")].run(ctx, recipe.attention)

    retrieval = result.search["retrieval"]
    assert items == 4 and retrieval["dense_counts"] == [0, 1, 3]
    copies = [r["copy"] for r in retrieval["ranked"]]
    assert copies == sorted(copies, reverse=True) and copies[0] > 0
    plans = result.search["plans"]
    # 3 of 4 KV groups dense cannot fit a 60% budget: skipped, the others searched
    assert [p["name"].partition(",retrieval=")[2] for p in plans] == ["", "1"]
    assert [s["retrieval_dense"] for s in result.search["skipped"]] == [3]
    group = sig.num_attention_heads // sig.num_key_value_heads
    for p in plans:
        top = sorted(r["item"] for r in retrieval["ranked"][: len(p["retrieval_dense_items"])])
        assert p["retrieval_dense_items"] == top
        assert p["density"][str(LENGTHS[-1])] <= 0.6 + 1e-9
    chosen = plans[result.search["chosen"]]
    held = [(i // sig.num_key_value_heads, i % sig.num_key_value_heads) for i in chosen["retrieval_dense_items"]]
    assert all(isinstance(result.heads[layer][kv * group + j], DensePattern)
               for layer, kv in held for j in range(group))
    # held-out score: the mean of the per-task losses, not of all tokens (text would swamp the passkey answers)
    for p in plans:
        assert set(p["measured_tasks"]) == {"corpus", "passkey"}
        assert p["measured_loss"] == pytest.approx(np.mean(list(p["measured_tasks"].values())), rel=1e-5)
    with pytest.raises(RecipeError, match="retrieval_dense"):
        parse_recipe(tiny_recipe(retrieval_dense=[1.0]))
    with pytest.raises(RecipeError, match="dense_option"):
        parse_recipe(tiny_recipe(retrieval_dense=[0.0, 0.1], dense_option=False))


def test_window_floors_search_each_variant_again_with_no_window_below_the_floor(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    recipe = parse_recipe(tiny_recipe(density_scales=[1.0], length_powers=[0.0], score_length=0,
                                      retrieval_dense=[0.0], window_floors=[0.0, 0.25, 0.9]))
    ctx = CompressionContext(model=model, tokenizer=tokenizer, recipe=recipe, device=torch.device("cpu"))

    result = METHODS[("attention", "moa")].run(ctx, recipe.attention)

    floor = round(0.25 * min(LENGTHS))
    plans = result.search["plans"]
    assert result.search["window_floors"] == [0, floor, round(0.9 * min(LENGTHS))]
    assert [p["window_floor"] for p in plans] == [0, floor]
    assert plans[1]["name"].endswith(f",floor={floor}")
    # 0.9 of 192 tokens: every head would read ~all of its row, far above the 60% budget: skipped, not fatal
    assert [s["window_floor"] for s in result.search["skipped"]] == [round(0.9 * min(LENGTHS))]
    assert all(p["density"][str(n)] <= 0.6 + 1e-9 for p in plans for n in LENGTHS)
    # the floored plan, rebuilt by searching again, has no window under the floor at any length
    unfloored = ctx.cache  # the profile is shared: a second run with the floor alone gives the same plan
    only = parse_recipe(tiny_recipe(density_scales=[1.0], length_powers=[0.0], score_length=0,
                                    retrieval_dense=[0.0], window_floors=[0.25]))
    again = METHODS[("attention", "moa")].run(
        CompressionContext(model=model, tokenizer=tokenizer, recipe=only, device=torch.device("cpu"), cache=unfloored),
        only.attention)
    windows = [p.window_for_length(n) for row in again.heads for p in row if isinstance(p, WindowPattern)
               for n in LENGTHS]
    assert windows and min(windows) >= floor
    assert again.search["plans"][0]["estimated_loss"] == plans[1]["estimated_loss"]
    with pytest.raises(RecipeError, match="window_floors"):
        parse_recipe(tiny_recipe(window_floors=[1.0]))
    with pytest.raises(RecipeError, match="window_floors"):
        parse_recipe(tiny_recipe(window_floors=[]))


def test_no_plan_fitting_the_budget_is_an_error_naming_the_knobs(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    recipe = parse_recipe(tiny_recipe(density_scales=[1.0], length_powers=[0.0], score_length=0,
                                      retrieval_dense=[0.0], window_floors=[0.9]))
    ctx = CompressionContext(model=model, tokenizer=tokenizer, recipe=recipe, device=torch.device("cpu"))

    with pytest.raises(CompressorError, match="no plan fits density 0.6.*window_floors"):
        METHODS[("attention", "moa")].run(ctx, recipe.attention)

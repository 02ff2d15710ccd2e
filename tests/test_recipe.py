"""Recipes: built-ins parse; errors name the key's path and suggest close names."""

import pytest

from compressor.errors import RecipeError
from compressor.recipe import builtin_recipes, load_recipe, parse_recipe, resolve_recipe_path


@pytest.mark.parametrize("name", builtin_recipes())
def test_every_builtin_recipe_parses(name):
    recipe = load_recipe(name)
    assert recipe.methods(), f"{name} names no method"


def test_recipe_names_resolve_as_users_type_them():
    assert resolve_recipe_path("window") == resolve_recipe_path("window.yaml") == resolve_recipe_path("recipes/window.yaml")


def test_unknown_recipe_suggests_a_builtin():
    with pytest.raises(RecipeError, match="did you mean `window`"):
        resolve_recipe_path("windw.yaml")


def test_unknown_key_gets_its_path_and_a_suggestion():
    with pytest.raises(RecipeError, match=r"attention\.densty: unknown key \(did you mean `density`\?\)"):
        parse_recipe({"attention": {"method": "window", "densty": 0.5}})


def test_wrong_type_names_the_path():
    with pytest.raises(RecipeError, match=r"calibration\.lengths\[1\]: expected an integer"):
        parse_recipe({"calibration": {"lengths": [1024, "2k"]}})


def test_invalid_value_is_refused_by_the_config():
    with pytest.raises(RecipeError, match="density must be in"):
        parse_recipe({"attention": {"method": "window", "density": 1.5}})


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(RecipeError, match="unknown method 'windo'.*did you mean `window`"):
        parse_recipe({"attention": {"method": "windo"}})


def test_unknown_top_level_section():
    with pytest.raises(RecipeError, match="did you mean `attention`"):
        parse_recipe({"atention": {"method": "dense"}})


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("attention: [method: window\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(path))


def test_int_is_accepted_where_a_float_is_expected():
    recipe = parse_recipe({"attention": {"method": "window", "density": 1}})
    assert recipe.attention.density == 1.0 and isinstance(recipe.attention.density, float)


def test_set_overrides_a_builtin_recipe_and_is_validated_like_the_file():
    from compressor.recipe import apply_overrides

    recipe = load_recipe("w4a8", ["calibration.samples=8", "linear.sensitivity_samples=1", "linear.candidates=[bf16, w4a8]"])
    assert recipe.calibration.samples == 8
    assert recipe.linear.sensitivity_samples == 1 and recipe.linear.candidates == ["bf16", "w4a8"]
    assert recipe.source["calibration"]["samples"] == 8  # the plan records the recipe as it ran
    assert load_recipe("w4a8").calibration.samples == 128  # the built-in file is untouched

    added = load_recipe("dense", ["attention.method=window", "attention.density=0.3"])
    assert added.attention.density == 0.3
    doc = {"linear": {"method": "vidit-q"}}
    assert apply_overrides(doc, ["linear.task_weights={passkey: 4}"])["linear"]["task_weights"] == {"passkey": 4}
    assert doc == {"linear": {"method": "vidit-q"}}

    with pytest.raises(RecipeError, match="linear.sensitivty_samples"):
        load_recipe("w4a8", ["linear.sensitivty_samples=1"])
    with pytest.raises(RecipeError, match="expected SECTION.KEY=VALUE"):
        load_recipe("w4a8", ["linear.sensitivity_samples"])
    with pytest.raises(RecipeError, match="`calibration.samples` is a value, not a section"):
        load_recipe("w4a8", ["calibration.samples.x=1"])
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe("w4a8", ["linear.candidates=[bf16"])

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

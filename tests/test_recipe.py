import pytest

from quantlab.errors import RecipeError, UsageError
from quantlab.recipe import Recipe, parse_recipe, parse_recipe_list
from quantlab.sweep.spec import load_spec


@pytest.mark.parametrize("name,method,params", [
    ("fp", "fp", {"dtype": "auto"}),
    ("bf16", "fp", {"dtype": "bfloat16"}),
    ("bnb-int8", "bnb", {"quant_type": "int8", "double_quant": False, "compute_dtype": "auto"}),
    ("bnb-nf4", "bnb", {"quant_type": "nf4", "double_quant": False, "compute_dtype": "auto"}),
    ("bnb-fp4", "bnb", {"quant_type": "fp4", "double_quant": False, "compute_dtype": "auto"}),
    ("bnb-nf4-dq", "bnb", {"quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}),
    ("rtn-w8", "rtn", {"bits": 8, "group_size": -1, "symmetric": True, "format": "torchao"}),
    ("rtn-w4-g128", "rtn", {"bits": 4, "group_size": 128, "symmetric": True, "format": "torchao"}),
    ("rtn-w4-g32-asym", "rtn", {"bits": 4, "group_size": 32, "symmetric": False, "format": "torchao"}),
    ("rtn-w4-g64-gptqfmt", "rtn", {"bits": 4, "group_size": 64, "symmetric": True, "format": "gptq"}),
])
def test_short_names_parse_and_round_trip(name, method, params):
    r = parse_recipe(name)
    assert (r.name, r.method, r.params()) == (name, method, params)
    assert Recipe.from_dict(r.to_dict()) == r


def test_recipes_are_frozen():
    r = parse_recipe("rtn-w4-g64")
    with pytest.raises(Exception):
        r.config.bits = 8


def test_unknown_recipe_suggests_the_nearest():
    with pytest.raises(RecipeError, match="Did you mean 'bnb-nf4'"):
        parse_recipe("bnb-fn4")
    with pytest.raises(RecipeError, match="Unknown recipe 'gtpq'.*Available: .*rtn-w4-g64"):
        parse_recipe("gtpq")


def test_rtn_w3_says_which_bits_exist():
    with pytest.raises(RecipeError, match="bits must be 8 or 4 \\(got 3\\)"):
        parse_recipe("rtn-w3")


def test_int8_double_quant_rejected():
    with pytest.raises(RecipeError, match="4-bit only"):
        parse_recipe("bnb-int8-dq")


def test_duplicate_recipe_rejected():
    with pytest.raises(RecipeError, match="listed twice"):
        parse_recipe_list("fp,bnb-nf4,bnb-nf4")


def test_yaml_recipes_with_parameters(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("recipes:\n  - bnb-nf4\n  - {method: rtn, bits: 4, group_size: 32, symmetric: false, name: my-rtn}\n")
    recipes = load_spec(f).recipes
    assert [r.name for r in recipes] == ["bnb-nf4", "my-rtn"]
    assert recipes[1].config.symmetric is False


def test_yaml_unknown_key_names_allowed_keys(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("recipes:\n  - {method: rtn, bits: 4, group_sise: 64}\n")
    with pytest.raises(RecipeError, match="unknown key\\(s\\) group_sise.*allowed: .*group_size"):
        load_spec(f)


def test_yaml_is_read_safely(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("recipes: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UsageError, match="python/object/apply:os.system.*remove the tag"):
        load_spec(f)


def test_group_size_checked_against_layers():
    from quantlab.methods import get_method

    r = parse_recipe("rtn-w4-g128")
    with pytest.raises(RecipeError, match="does not divide in-features \\[576\\].*use a group size"):
        get_method("rtn").check_model(r.config, {"q_proj": (576, 576), "down_proj": (576, 1536)})
    get_method("rtn").check_model(parse_recipe("rtn-w4-g64").config, {"q_proj": (576, 576)})


def test_rtn_format_is_checked(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("recipes:\n  - {method: rtn, bits: 4, group_size: 64, format: awq}\n")
    with pytest.raises(RecipeError, match="rtn format must be one of torchao, gptq"):
        load_spec(f)


def test_default_sweep_file_matches_the_default_recipes():
    from pathlib import Path

    from quantlab.recipe import DEFAULT_RECIPES

    spec = load_spec(Path(__file__).parent.parent / "experiments" / "sweep-smollm2.yaml")
    assert [r.name for r in spec.recipes] == DEFAULT_RECIPES.split(",")
    assert spec.models == ("smollm2-135m",)

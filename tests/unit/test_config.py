"""Recipes: strict validation, dotted overrides and one-line errors."""

from pathlib import Path

import pytest

from kompakt.config import apply_overrides, load_recipe
from kompakt.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name
    assert recipe.data.inputs


def test_override_parses_yaml_scalars():
    r = load_recipe(REPO / "recipes/demo-nb.yaml", ["data.min_chars=42", "data.languages=[nb, nn]",
                                                    "data.dedup.near=false"])
    assert r.data.min_chars == 42
    assert r.data.languages == ["nb", "nn"]
    assert r.data.dedup.near is False


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown key data\.min_char; did you mean data\.min_chars\?"):
        load_recipe(REPO / "recipes/demo-nb.yaml", ["data.min_char=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"data\.min_chars: .*integer"):
        load_recipe(REPO / "recipes/demo-nb.yaml", ["data.min_chars=lots"])


def test_missing_recipe_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_recipe(tmp_path / "nope.yaml")
    assert "\n" not in str(e.value)


def test_overrides_do_not_mutate_input():
    raw = {"data": {"min_chars": 1}}
    out = apply_overrides(raw, ["data.min_chars=2"])
    assert raw["data"]["min_chars"] == 1 and out["data"]["min_chars"] == 2


def test_vocab_rounded_to_64():
    r = load_recipe(REPO / "recipes/demo-nb.yaml", ["tokenizer.vocab_size=8001"])
    assert r.tokenizer.vocab_size_rounded == 8064


def test_yaml_no_gets_the_norwegian_hint():
    # `[no]` is YAML for [false]; the user meant Norwegian and should hear about nb and nn.
    with pytest.raises(ConfigError, match="nb for Bokmål and nn for Nynorsk"):
        load_recipe(REPO / "recipes/demo-nb.yaml", ["data.languages=[no]"])

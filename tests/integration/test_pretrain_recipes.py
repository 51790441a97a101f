"""Every pretraining recipe validates, and `kompakt pretrain --dry-run` prints its figures on this
CPU machine without the corpus (the model is built on the meta device)."""

from __future__ import annotations

import json

import pytest

from kompakt.cli import main
from kompakt.config import load_recipe

CLUSTER_RECIPES = ["norbert-base-nb", "norbert-small-nb", "albert-base-nb", "spanbert-base-nb", "lattice-base-zh",
                   "modernbert-small-nb"]


@pytest.mark.parametrize("name", CLUSTER_RECIPES + ["demo-nb", "demo-zh"])
def test_recipe_dry_run_prints_the_figures(name, repo, capsys):
    recipe = load_recipe(repo / "recipes" / f"{name}.yaml")
    assert recipe.model is not None and recipe.pretrain is not None
    assert main(["pretrain", str(repo / "recipes" / f"{name}.yaml"), "--dry-run", "--world-size", "16"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["family"] == recipe.model.family
    assert figures["accumulation_steps"] == recipe.pretrain.accumulation_steps(16)
    assert figures["tokens_per_step"] == (figures["accumulation_steps"] * 16
                                          * recipe.pretrain.data.tokens_per_micro_batch)
    # 6 N per token is the floor (body + head matmuls); attention adds on top
    assert figures["flops_per_token"] > 2 * figures["num_params"] * 0.5
    if not name.startswith("demo-"):
        assert figures["num_params"] > 10_000_000, "cluster recipes are base-size models"
        assert figures["tokens_per_step"] >= recipe.pretrain.data.global_batch_tokens


def test_published_sizes():
    """Parameter counts of the meta-device models agree with the published architectures."""
    from kompakt.pretrain.stage import dry_run

    albert = load_recipe("recipes/albert-base-nb.yaml")
    # ALBERT-base has 12M parameters with a 30k vocabulary (Lan et al. 2020, table 1)
    assert 11e6 < dry_run(albert.model, albert.pretrain, 30016, 1)["num_params"] < 13e6
    norbert = load_recipe("recipes/norbert-base-nb.yaml")
    # BERT-base: 110M with 30k word pieces; 50k add 20k x 768 = 15M
    assert 120e6 < dry_run(norbert.model, norbert.pretrain, 50048, 1)["num_params"] < 130e6


def test_dry_run_of_an_unknown_key_names_the_closest(repo, capsys):
    code = main(["pretrain", str(repo / "recipes" / "demo-nb.yaml"), "pretrain.max_step=5", "--dry-run"])
    assert code == 2
    assert "did you mean pretrain.max_steps" in capsys.readouterr().err

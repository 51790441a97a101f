"""Stages are declared (kompakt/pipeline.py STAGES) and hashes mean content, not how a run is driven."""

from __future__ import annotations

from pydantic import BaseModel

from kompakt.config import Recipe, load_recipe
from kompakt.pipeline import STAGES, Pipeline, Stage
from kompakt.train_config import RunControl, hashed_config, is_runtime

# Names that say "how fast or how often", never "what": they must stay out of every hash.
RUNTIME_NAMES = ("num_proc", "num_workers", "prefetch", "shard_index", "resume", "keep_last", "time_limit")


def _walk(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        ann = info.annotation
        sub = next((c for c in (ann, *getattr(ann, "__args__", ())) if isinstance(c, type) and issubclass(c, BaseModel)),
                   None)
        yield prefix + name, info, sub
        if sub is not None and not issubclass(sub, RunControl):
            yield from _walk(sub, prefix + name + ".")


def test_every_runtime_looking_key_is_out_of_the_hash():
    leaks = [key for key, info, sub in _walk(Recipe)
             if (key.rsplit(".", 1)[-1].endswith("_every") or key.rsplit(".", 1)[-1].startswith(RUNTIME_NAMES))
             and not is_runtime(info)]
    assert not leaks, f"keys that would change a stage hash: {leaks}; declare them runtime_field or move to run"


def test_pretrain_hash_ignores_every_run_control_key_and_follows_the_rest(repo):
    recipe_path = repo / "recipes" / "demo-nb.yaml"
    base = Pipeline(load_recipe(recipe_path)).resolve("pretrain")[0]
    changed = {"resume": "never", "time_limit_minutes": 3.0, "save_every": 7, "keep_last": 9, "log_every": 3,
               "eval_every": 11, "eval_batches": 2, "max_nonfinite_in_a_row": 2, "prefetch": 0, "num_workers": 3}
    assert set(changed) == set(RunControl.model_fields), "cover every run-control key"
    for key, value in changed.items():
        d = Pipeline(load_recipe(recipe_path, [f"pretrain.run.{key}={value}"])).resolve("pretrain")[0]
        assert d == base, f"pretrain.run.{key} changed the stage directory"
    legacy = Pipeline(load_recipe(recipe_path, ["pretrain.save_every=7"])).resolve("pretrain")[0]
    assert legacy == base  # the old flat spelling migrates into run, out of the hash
    for override in ("pretrain.max_steps=201", "pretrain.engine.grad_clip=0.5", "model.hidden_size=64"):
        assert Pipeline(load_recipe(recipe_path, [override])).resolve("pretrain")[0] != base, override
    assert "run" not in hashed_config(load_recipe(recipe_path).pretrain)


def test_a_declared_stage_gets_a_directory_and_a_command(repo, monkeypatch):
    toy = Stage("toy", ("model",), ("tokenizer",), "kompakt.pipeline:_pretrain_body", help="a toy stage")
    monkeypatch.setitem(STAGES, "toy", toy)
    recipe = load_recipe(repo / "recipes" / "demo-nb.yaml")
    p = Pipeline(recipe)
    d, config, inputs = p.resolve("toy")
    assert d.name.startswith("toy-") and inputs == {"tokenizer": p.resolve("tokenizer")[0].name.rsplit("-", 1)[1]}
    assert config == hashed_config(recipe.model)
    from kompakt.cli import build_parser

    assert build_parser().parse_args(["toy", "recipe.yaml"]).command == "toy"

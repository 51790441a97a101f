"""The stages in order, with their run directories.

Each function resolves its upstream stages first (skipped when complete), computes its own
directory from its config section and its inputs' hashes, and runs the stage body only when that
directory is not already complete. Stage bodies live in the stage packages and receive their own
config section, their input folders and a `StageRun` to write into; they never see the recipe.
"""

from __future__ import annotations

from pathlib import Path

from kompakt.config import Recipe, section_dict
from kompakt.errors import ConfigError
from kompakt.log import info
from kompakt.runs import file_fingerprint, is_complete, open_stage, stage_dir

# Config keys that change how fast a stage runs, not what it writes; kept out of the hash.
_RUNTIME_KEYS = {"num_proc", "shard_index"}


def _hashed(section) -> dict:
    return {k: v for k, v in section_dict(section).items() if k not in _RUNTIME_KEYS}


def _run_dir(recipe: Recipe) -> Path:
    return recipe.path(recipe.run_dir)


def _hash_of(stage_dir_: Path) -> str:
    """The hash part of a `<stage>-<hash>` directory name (the same as its manifest's `hash`)."""
    return stage_dir_.name.rsplit("-", 1)[1]


def _parts(recipe: Recipe) -> list[tuple[list[Path], dict, Path]]:
    """Per data_prep part: its input files (`files[i::num_shards]`), its input hashes and its directory."""
    files = recipe.resolve_inputs()
    n = recipe.data.num_shards
    out = []
    for i in range(n):
        part_files = files[i::n]
        inputs = {"part": f"{i}/{n}", **{str(f): file_fingerprint(f) for f in part_files}}
        out.append((part_files, inputs, stage_dir(_run_dir(recipe), "prepare_part", _hashed(recipe.data), inputs)))
    return out


def prepare_dir(recipe: Recipe) -> tuple[Path, dict]:
    """The merged data_prep directory of a recipe and its inputs, without running anything."""
    inputs = {d.name: _hash_of(d) for _, _, d in _parts(recipe)}
    return stage_dir(_run_dir(recipe), "prepare", _hashed(recipe.data), inputs), inputs


def tokenizer_dir(recipe: Recipe, corpus_dir: Path) -> tuple[Path, dict]:
    """The tokenizer stage directory for a data_prep directory, and its inputs, without running anything."""
    inputs = {"corpus": _hash_of(corpus_dir)}
    return stage_dir(_run_dir(recipe), "tokenizer", _hashed(recipe.tokenizer), inputs), inputs


def prepare(recipe: Recipe, force: bool = False) -> Path | None:
    """data_prep: raw files -> `prepare-<hash>/corpus/*.parquet` and `stats.json`.

    With `data.num_shards > 1` the inputs are split into parts (`prepare_part-<hash>`) that a Slurm
    array can build one per task (`data.shard_index=i`); a run without `shard_index` builds any
    missing parts and then merges them, deduplicating across parts. The output does not depend on
    `num_proc` or `num_shards`. Returns None when only one part was asked for.
    """
    from kompakt.data_prep import stage as data_stage

    cfg = recipe.data
    parts = _parts(recipe)
    for i, (part_files, inputs, d) in enumerate(parts):
        if cfg.shard_index is not None and i != cfg.shard_index:
            continue
        if force or not is_complete(d):
            info(f"prepare: part {i + 1}/{len(parts)}, {len(part_files)} file(s) -> {d}")
            with open_stage(_run_dir(recipe), "prepare_part", _hashed(cfg), inputs) as run:
                data_stage.run_part(cfg, part_files, run)
        else:
            info(f"prepare: part {i + 1}/{len(parts)} complete, skipped ({d})")
    if cfg.shard_index is not None:
        return None
    d, inputs = prepare_dir(recipe)
    if not force and is_complete(d):
        info(f"prepare: complete, skipped ({d})")
        return d
    with open_stage(_run_dir(recipe), "prepare", _hashed(cfg), inputs) as run:
        data_stage.merge(cfg, [part_dir for _, _, part_dir in parts], run)
    info(f"prepare: wrote {d}")
    return d


def tokenizer(recipe: Recipe, force: bool = False) -> Path:
    """tokenization: corpus -> `tokenizer-<hash>/tokenizer/` (HF folder), `report.json`, `tokens/` shards."""
    from kompakt.tokenization import stage as tok_stage

    if recipe.tokenizer is None:
        raise ConfigError("recipe has no tokenizer section; add one (see recipes/demo-nb.yaml)")
    corpus = prepare(recipe)
    if corpus is None:
        raise ConfigError("data.shard_index is set; the tokenizer needs the merged corpus, so drop shard_index")
    d, inputs = tokenizer_dir(recipe, corpus)
    if not force and is_complete(d):
        info(f"tokenizer: complete, skipped ({d})")
        return d
    with open_stage(_run_dir(recipe), "tokenizer", _hashed(recipe.tokenizer), inputs) as run:
        tok_stage.run(recipe.tokenizer, corpus, run)
    info(f"tokenizer: wrote {d}")
    return d


# pretrain keys that change how a run is driven (checkpoint cadence, logging, limits, where to resume
# from), not what it computes; kept out of the hash so a requeue with a new time limit continues.
_PRETRAIN_RUNTIME_KEYS = {"resume", "time_limit_minutes", "save_every", "keep_last", "log_every", "eval_every",
                          "eval_batches", "max_nonfinite_in_a_row"}


def pretrain_dir(recipe: Recipe, tok_dir: Path) -> tuple[Path, dict, dict]:
    """The pretrain stage directory with its hashed config and inputs."""
    cfg = {k: v for k, v in section_dict(recipe.pretrain).items() if k not in _PRETRAIN_RUNTIME_KEYS}
    # Prefetch depth and loader workers change speed only: the batches are identical (tested).
    cfg["data"] = {k: v for k, v in cfg["data"].items() if k not in ("prefetch", "num_workers")}
    config = {"model": section_dict(recipe.model), "pretrain": cfg}
    inputs = {"tokenizer": _hash_of(tok_dir)}
    return stage_dir(_run_dir(recipe), "pretrain", config, inputs), config, inputs


def _require_pretrain(recipe: Recipe) -> None:
    if recipe.model is None or recipe.pretrain is None:
        raise ConfigError("recipe has no model or pretrain section; add both (see recipes/demo-nb.yaml)")


def pretrain_dry_run(recipe: Recipe, world_size: int | None = None) -> dict:
    """`kompakt pretrain --dry-run`: print parameters, tokens per step, accumulation and FLOPs per token.

    Needs no corpus: the vocabulary comes from model.vocab_size or the tokenizer section, a lattice
    model's word table from tokenizer.lexicon_size; `world_size` defaults to the launcher's.
    """
    from kompakt import dist
    from kompakt.pretrain import stage as pretrain_stage

    _require_pretrain(recipe)
    vocab = recipe.model.vocab_size or (recipe.tokenizer.vocab_size_rounded if recipe.tokenizer else None)
    if vocab is None:
        raise ConfigError("set model.vocab_size or a tokenizer section so --dry-run knows the vocabulary")
    num_words = recipe.tokenizer.lexicon_size if recipe.tokenizer and recipe.tokenizer.lexicon else 0
    figures = pretrain_stage.dry_run(recipe.model, recipe.pretrain, vocab, world_size or dist.detect().world_size,
                                     num_words)
    pretrain_stage.print_dry_run(figures)
    return figures


def pretrain(recipe: Recipe, force: bool = False) -> Path:
    """pretrain: token shards -> `pretrain-<hash>/` with checkpoints/, metrics.jsonl, tb/ and export/.

    Unlike the other stages the directory is used in place (checkpoints survive kills and requeues);
    `manifest.json` with `complete: true` appears only after the export. Several processes (torchrun,
    srun, deepspeed) need the tokenizer stage complete beforehand: run `kompakt tokenizer` first.
    """
    from kompakt import dist
    from kompakt.pretrain import stage as pretrain_stage

    _require_pretrain(recipe)
    world = dist.detect().world_size
    if world > 1:
        tok_dir = tokenizer_dir(recipe, prepare_dir(recipe)[0])[0] if recipe.tokenizer else None
        if tok_dir is None or not is_complete(tok_dir):
            raise ConfigError("the tokenizer stage is not complete; run `kompakt tokenizer RECIPE` in one process "
                              "before launching pretraining on several")
    else:
        tok_dir = tokenizer(recipe)
    d, config, inputs = pretrain_dir(recipe, tok_dir)
    if not force and is_complete(d):
        info(f"pretrain: complete, skipped ({d})")
        return d
    info(f"pretrain: {d}")
    return pretrain_stage.run(recipe.model, recipe.pretrain, tok_dir, d, stage_hash=d.name.rsplit("-", 1)[1],
                              inputs=inputs, recipe_name=recipe.name)


# The order `kompakt run` follows; a stage runs when its recipe section is present.
STAGES = [("prepare", "data", prepare), ("tokenizer", "tokenizer", tokenizer), ("pretrain", "pretrain", pretrain)]


def run_all(recipe: Recipe, force: bool = False) -> dict[str, Path | None]:
    """Run every stage the recipe has, in order; complete stages are skipped."""
    out = {}
    for name, section, fn in STAGES:
        if getattr(recipe, section, None) is not None:
            out[name] = fn(recipe, force=force)
    return out

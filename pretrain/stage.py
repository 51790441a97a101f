"""The pretrain stage: packed token shards -> DeepSpeed training -> checkpoints -> HF export.

Reads top to bottom: distributed setup, tokenizer and shards, the held-out documents (the tokenizer
stage's `heldout/` shards, never trained on), model, engine, resume (refused when the tokenizer's
content changed under the checkpoint), the shared loop (kompakt/loop.py), export (kompakt/export.py),
manifest.

The stage directory `<run_dir>/pretrain-<hash>/` is used in place, not built in a temporary
directory and renamed like the other stages: a long run keeps its checkpoints across kills and
requeues. `manifest.json` with `complete: true` is written only after the export.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kompakt import checkpoint, dist
from kompakt.engine import build_engine, init_distributed
from kompakt.errors import ConfigError, DataError
from kompakt.export import export_checkpoint, load_weights  # noqa: F401  (`kompakt export`, older callers)
from kompakt.log import info, table, warn
from kompakt.loop import StopFlag, exit_for_requeue, test_hook
from kompakt.model_config import ModelConfig, check_vocab
from kompakt.pretrain_config import PretrainConfig
from kompakt.runs import RESOLVED_CONFIG, artifact_digests, package_versions, read_manifest, write_json_atomic
from kompakt.tokenizer import SpecialIds, load_tokenizer

# Tokenizer stages without heldout/ shards: every HELDOUT_EVERY-th document is held out (1%).
HELDOUT_EVERY = 100

# Dense bf16 tensor-core peak FLOP/s per GPU (vendor data sheets), matched against the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
    "A40": 150e12, "A10": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
    "MI300X": 1307e12, "MI250X": 383e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of this GPU, or None (CPU, unknown GPU): then MFU is not logged."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def heldout_doc_ids(num_docs: int) -> np.ndarray:
    """The documents (global numbers) held out of a shard set without `heldout/`: every
    HELDOUT_EVERY-th one, and at least the last of two or more."""
    held = np.flatnonzero(np.arange(num_docs) % HELDOUT_EVERY == HELDOUT_EVERY - 1)
    if len(held) == 0 and num_docs > 1:
        held = np.array([num_docs - 1])
    return held


def heldout_by_document(shards, examples):
    """(training, held-out) examples of one shard set, held out by whole document.

    For tokenizer stages written before held-out documents got their own `heldout/` shards: every
    HELDOUT_EVERY-th document (by global document number) is held out with all its examples, so no
    held-out example shares a document with a training one. At least one document is held out.
    """
    from kompakt.pretrain.data import ExampleIndex

    doc_of = np.empty(len(examples), dtype=np.int64)
    for k, shard in enumerate(shards.shards):
        rows = np.flatnonzero(examples.shard == k)
        local = np.searchsorted(shard.doc_offsets, examples.start[rows], side="right") - 1
        doc_of[rows] = local + int(shards.doc_starts[k])
    held = np.isin(doc_of, heldout_doc_ids(shards.num_docs))

    def take(mask):
        return ExampleIndex(shard=examples.shard[mask], start=examples.start[mask], length=examples.length[mask])

    return take(~held), take(held)


def content_digests(tokenizer_stage: Path) -> dict[str, str]:
    """Digests of what a checkpoint's ids mean, checked against the tokenizer stage's own manifest.

    The manifest recorded them when the stage was built; a file edited or replaced since (a copy
    gone wrong, a hand edit) is refused here before any training on it.
    """
    now = artifact_digests(tokenizer_stage)
    recorded = (read_manifest(tokenizer_stage) or {}).get("digests") or {}
    changed = sorted(k for k in recorded if now.get(k) != recorded[k])
    if changed:
        raise DataError(f"{tokenizer_stage}: {', '.join(changed)} differ from what its manifest recorded; the "
                        f"stage was changed after it was built. Re-run `kompakt tokenizer --force` and pretrain anew")
    return now


def check_digests(saved: dict | None, now: dict[str, str], tag: Path, tokenizer_stage: Path) -> None:
    """Refuse to resume a checkpoint trained on other token ids than the tokenizer stage holds now."""
    if not saved:
        return  # a checkpoint from before digests were recorded
    changed = sorted(k for k in now if k in saved and saved[k] != now[k])
    if changed:
        raise DataError(f"{tokenizer_stage}: {', '.join(changed)} changed since {tag} was trained on it (was the "
                        f"tokenizer retrained with --force?); the checkpoint's ids would be remapped. Restore the "
                        f"tokenizer stage, or move {tag.parent.parent} aside to pretrain from scratch")


def card_rows(cfg: PretrainConfig) -> list[tuple[str, str]]:
    """The pretraining rows of the model card."""
    o = cfg.objective
    return [("objective", f"{o.masking} masking, rate {o.mask_rate}{', SOP' if o.sop else ''}, "
                          f"sequences of {o.max_seq_len} tokens"),
            ("optimizer", f"{cfg.optim.name}, lr {cfg.optim.lr}, {cfg.schedule.kind} schedule with "
                          f"{cfg.schedule.warmup_steps} warmup steps")]


def run(model_cfg: ModelConfig, cfg: PretrainConfig, tokenizer_stage: Path, stage_dir: Path, *,
        stage_hash: str, inputs: dict, recipe_name: str, release: dict | None = None) -> Path:
    """Train (or continue training) into `stage_dir`; returns it once the export and manifest are written.

    Exits with `REQUEUE_EXIT` after saving when SIGTERM/SIGUSR1, the time limit or a dead launcher
    stopped it, also when the signal comes during start-up, the final evaluation or before the export.
    """
    with StopFlag() as stop:
        return _run(model_cfg, cfg, Path(tokenizer_stage), Path(stage_dir), stage_hash=stage_hash, inputs=inputs,
                    recipe_name=recipe_name, release=release, stop=stop)


def _requeue(why: str) -> None:
    exit_for_requeue("pretrain", why)


def _run(model_cfg: ModelConfig, cfg: PretrainConfig, tokenizer_stage: Path, stage_dir: Path, *,
         stage_hash: str, inputs: dict, recipe_name: str, release: dict | None, stop: StopFlag) -> Path:
    from kompakt.models import build_pretraining_model
    from kompakt.models.flops import flops_per_token, seq_lens_from_cu
    from kompakt.pretrain.data import MLMCollator, PackedLoader, build_examples, layout
    from kompakt.pretrain.loop import train
    from kompakt.pretrain.masking import describe_sample
    from kompakt.shards import TokenShards

    t0 = time.perf_counter()
    test_hook("startup")
    env = dist.setup_env()
    init_distributed(env)
    ckpt_root = stage_dir / "checkpoints"
    if env.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stage_dir / RESOLVED_CONFIG, {"model": model_cfg.model_dump(mode="json"),
                                                        "pretrain": cfg.model_dump(mode="json")})
    dist.barrier()

    # --- tokenizer, shards, examples; held-out documents from the tokenizer stage's heldout/ shards
    tokenizer_dir = tokenizer_stage / "tokenizer"
    tok = load_tokenizer(tokenizer_dir)
    specials = SpecialIds.from_tokenizer(tok)
    model_cfg = check_vocab(model_cfg, specials.vocab_size, str(tokenizer_dir))
    lexicon_from = None
    if model_cfg.family == "lattice":
        from kompakt.pretrain.lattice import LatticeTokens, read_lexicon

        lexicon = tokenizer_dir / "lexicon.txt"
        if not lexicon.is_file():
            raise DataError(f"{lexicon} does not exist; a lattice model needs a tokenizer trained with tokenizer.lexicon")
        # Word k of the lexicon has id vocab_size + k, so its length is the word table the recipe left open.
        words = read_lexicon(lexicon)
        if model_cfg.lattice.num_words == 0:
            lattice = model_cfg.lattice.model_copy(update={"num_words": len(words)})
            model_cfg = model_cfg.model_copy(update={"lattice": lattice})
        # The collator reads the lexicon itself in whichever process builds batches (fork or spawn).
        lexicon_from = (tokenizer_dir, model_cfg)
        # The logged sample names word ids by their text instead of None.
        sample_tok = LatticeTokens(tok, words, model_cfg.vocab_size)
    else:
        sample_tok = tok
    digests = content_digests(tokenizer_stage)
    shards = TokenShards(tokenizer_stage / "tokens")
    lay = layout(cfg.objective)
    examples = build_examples(shards, lay.max_tokens, lay.min_tokens)
    heldout_dir = tokenizer_stage / "heldout"
    if (heldout_dir / "index.json").is_file():
        heldout_shards = TokenShards(heldout_dir)
        train_examples = examples
        heldout_examples = build_examples(heldout_shards, lay.max_tokens, lay.min_tokens)
    else:
        heldout_shards = shards
        train_examples, heldout_examples = heldout_by_document(shards, examples)
    if len(heldout_examples) == 0:
        raise DataError(f"{tokenizer_stage}: no held-out documents to evaluate on; raise tokenizer.heldout_fraction")
    collator = MLMCollator(cfg.objective, specials, cfg.data.seed, lexicon_from)
    loader = PackedLoader(shards, cfg.objective, cfg.data, specials, env.rank, env.world_size, train_examples,
                          prefetch=cfg.run.prefetch, num_workers=cfg.run.num_workers, collator=collator)
    steps = loader.steps_info()
    # The held-out batches are built once, up front: no prefetch thread, no worker pool left idle.
    heldout = PackedLoader(heldout_shards, cfg.objective, cfg.data, specials, env.rank, env.world_size,
                           heldout_examples, prefetch=0, num_workers=0, collator=collator)
    heldout_iter = iter(heldout)
    eval_batches = [next(heldout_iter) for _ in range(cfg.run.eval_batches)]

    # --- model and engine
    checkpoint.seed_everything(cfg.seed)
    model = build_pretraining_model(model_cfg)
    num_params = sum(p.numel() for p in model.parameters())
    engine, engine_info = build_engine(model, cfg, env, steps.grad_accum_steps)
    if cfg.engine.compile:
        engine.compile()
    sample = eval_batches[0]
    fpt = flops_per_token(model_cfg, seq_lens_from_cu(sample["cu_seqlens"]), int(sample["mlm_positions"].numel()))
    table("pretrain", ["", "value"], [
        ("parameters", num_params), ("processes", env.world_size), ("device", str(engine_info.device)),
        ("precision", engine_info.precision), ("ZeRO stage", cfg.engine.zero_stage),
        ("training examples", len(train_examples)), ("held-out examples", len(heldout_examples)),
        ("tokens per micro-batch (mean)", round(steps.mean_tokens_per_micro_batch)),
        ("accumulation steps", engine_info.accumulation_steps), ("tokens per step", round(steps.tokens_per_step)),
        ("steps per epoch", round(steps.steps_per_epoch, 2)), ("FLOPs per token", f"{fpt:.3g}"),
    ]) if env.is_main else None

    # --- resume
    tag = checkpoint.resolve_resume(cfg.run.resume, ckpt_root)
    if cfg.run.resume == "never" and checkpoint.newest_complete(ckpt_root) is not None:
        raise ConfigError(f"pretrain.run.resume=never but {ckpt_root} holds checkpoints; use resume=auto to continue "
                          f"or delete {stage_dir} to start over")
    start = None
    if tag is not None:
        check_digests(checkpoint.read_train_state(tag).get("digests"), digests, tag, tokenizer_stage)
        start, loader_state = checkpoint.load(engine, tag, cfg.engine.zero_stage, cfg.seed)
        start["checkpoint"] = str(tag)
        loader.load_state_dict(loader_state)
        info(f"pretrain: resumed from {tag} (step {start['step']:,}, {start['tokens_seen']:,} tokens)")

    # --- train
    extra = {"model": model_cfg.model_dump(mode="json"), "pretrain": cfg.model_dump(mode="json"),
             "tokenizer_dir": str(tokenizer_dir.resolve()), "tokenizer_stage": str(tokenizer_stage.resolve()),
             "recipe": recipe_name, "vocab_size": specials.vocab_size, "num_params": num_params,
             "digests": digests, "card": card_rows(cfg), "release": release or {}}
    result = train(engine, engine_info, cfg, loader, out_dir=stage_dir, ckpt_root=ckpt_root, start=start,
                   train_state_extra=extra, eval_batches=eval_batches, flops_per_token=fpt,
                   peak_flops=peak_flops(engine_info.device), describe=lambda b: describe_sample(b, sample_tok),
                   stop=stop)
    loader.close()
    if result.stopped != "done":
        where = f"saved {result.checkpoint}" if result.checkpoint else "nothing new to save"
        _requeue(f"stopped by {result.stopped} at step {result.step:,}; {where}")
    test_hook("before_export")
    if dist.any_true(stop.requested):  # during the final evaluation: the checkpoint is whole, export later
        _requeue(f"stopped by a signal after step {result.step:,} was saved, before the export")

    # --- export and manifest (rank 0)
    if env.is_main:
        final = result.checkpoint
        assert final is not None, "a finished run has its final checkpoint"
        state = checkpoint.read_train_state(final)
        state.update(final_losses=result.last_losses, eval_loss=result.eval_loss)
        write_json_atomic(final / checkpoint.TRAIN_STATE, state)
        export_checkpoint(final, stage_dir / "export")
        manifest = {
            "stage": "pretrain", "hash": stage_hash, "inputs": inputs,
            "config": {"model": model_cfg.model_dump(mode="json"), "pretrain": cfg.model_dump(mode="json")},
            "versions": package_versions(), "host": platform.node(), "argv": sys.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "digests": digests,
            "counts": {"steps": result.step, "tokens_seen": result.tokens_seen, "num_params": num_params,
                       "num_skipped_steps": result.num_skipped, "world_size": env.world_size,
                       "num_train_examples": len(train_examples), "num_heldout_examples": len(heldout_examples)},
            "final_losses": result.last_losses, "eval_loss": result.eval_loss,
            "checkpoint": str(final), "timings": {"total_s": round(time.perf_counter() - t0, 2)},
            "complete": True,
        }
        write_json_atomic(stage_dir / "manifest.json", manifest)
        info(f"pretrain: {result.step:,} steps, {result.tokens_seen:,} tokens, loss {result.last_losses.get('loss', float('nan')):.4f}, "
             f"held-out {result.eval_loss if result.eval_loss is None else round(result.eval_loss, 4)} -> {stage_dir / 'export'}")
    dist.barrier()
    return stage_dir


def dry_run(model_cfg: ModelConfig, cfg: PretrainConfig, vocab_size: int, world_size: int, num_words: int = 0) -> dict:
    """Parameters, tokens per step, accumulation steps and FLOPs per token from the config alone.

    The model is built on the meta device (no memory, no corpus needed). Accumulation assumes full
    micro-batches; a real run uses the measured mean fill, which can ask for a step more.
    `num_words` stands in for a lattice model's lexicon size when the recipe leaves it to the tokenizer.
    """
    from kompakt.models import build_pretraining_model
    from kompakt.models.flops import flops_per_token

    if model_cfg.vocab_size is None:
        model_cfg = model_cfg.model_copy(update={"vocab_size": vocab_size})
    if model_cfg.family == "lattice" and model_cfg.lattice.num_words == 0:
        lattice = model_cfg.lattice.model_copy(update={"num_words": num_words})
        model_cfg = model_cfg.model_copy(update={"lattice": lattice})
    with torch.device("meta"):
        model = build_pretraining_model(model_cfg)
    num_params = sum(p.numel() for p in model.parameters())
    seq = cfg.objective.max_seq_len
    num_seqs = max(1, cfg.data.tokens_per_micro_batch // seq)
    predictions = round(cfg.objective.mask_rate * (seq - cfg.objective.num_specials)) * num_seqs
    accum = cfg.accumulation_steps(world_size)
    figures = {
        "family": model_cfg.family, "num_params": num_params, "vocab_size": model_cfg.vocab_size,
        "world_size": world_size, "tokens_per_micro_batch": cfg.data.tokens_per_micro_batch,
        "accumulation_steps": accum, "tokens_per_step": accum * world_size * cfg.data.tokens_per_micro_batch,
        "max_steps": cfg.max_steps,
        "total_tokens": cfg.max_steps * accum * world_size * cfg.data.tokens_per_micro_batch,
        "flops_per_token": flops_per_token(model_cfg, [seq] * num_seqs, predictions),
    }
    figures["total_flops"] = figures["flops_per_token"] * figures["total_tokens"]
    if figures["tokens_per_step"] > 1.1 * cfg.data.global_batch_tokens:
        warn(f"{world_size} processes x {cfg.data.tokens_per_micro_batch:,} tokens per micro-batch exceed "
             f"pretrain.data.global_batch_tokens={cfg.data.global_batch_tokens:,}; lower "
             f"pretrain.data.tokens_per_micro_batch or run on fewer processes")
    return figures


def print_dry_run(figures: dict) -> None:
    table("pretrain --dry-run", ["", "value"], [(k, v if not isinstance(v, float) else f"{v:.4g}")
                                                 for k, v in figures.items()], file=sys.stdout)
    print(json.dumps(figures, sort_keys=True))

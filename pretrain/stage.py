"""The pretrain stage: packed token shards -> DeepSpeed training -> checkpoints -> HF export.

Reads top to bottom: distributed setup, tokenizer and shards, a held-out split of the examples,
model, engine, resume, the loop (pretrain/loop.py), export, manifest.

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
from kompakt.log import info, table, warn
from kompakt.model_config import ModelConfig, check_vocab
from kompakt.pretrain_config import PretrainConfig
from kompakt.runs import RESOLVED_CONFIG, package_versions, read_manifest, write_json_atomic

# Every HELDOUT_EVERY-th example (by example id) is held out for the evaluation loss: 1%.
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


def load_tokenizer(tokenizer_dir: Path):
    """The fast tokenizer the tokenization stage saved (`tokenizer.json`)."""
    from tokenizers import Tokenizer

    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist; re-run `kompakt tokenizer` for this recipe")
    return Tokenizer.from_file(str(path))


def split_heldout(examples):
    """(training, held-out) example indexes: every HELDOUT_EVERY-th example id is held out."""
    from kompakt.pretrain.data import ExampleIndex

    ids = np.arange(len(examples))
    held = ids % HELDOUT_EVERY == HELDOUT_EVERY - 1
    if held.sum() == 0:
        held[-1:] = True

    def take(mask):
        return ExampleIndex(shard=examples.shard[mask], start=examples.start[mask], length=examples.length[mask])

    return take(~held), take(held)


def model_card(model_cfg: ModelConfig, cfg: PretrainConfig, tokenizer_dir: Path, state: dict) -> str:
    """README.md of the exported folder: what was trained on what, for how long, with which result."""
    losses = state.get("final_losses") or {}
    # The card is published: name the stage by its hash, not by this machine's path.
    tok_stage = Path(state.get("tokenizer_stage", tokenizer_dir.parent))
    counts = (read_manifest(tok_stage) or {}).get("counts", {})
    data = f"{counts.get('num_docs', 0):,} documents, {counts.get('num_tokens', 0):,} tokens (stage `{tok_stage.name}`)"
    loss_lines = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(losses.items())) or "| - | - |"
    return f"""---
library_name: transformers
tags: [kompakt, {model_cfg.family}, fill-mask]
---
# {state.get('recipe', 'kompakt')} ({model_cfg.family})

A compact {model_cfg.family} encoder pretrained with kompakt.

| | |
|---|---|
| data | {data} |
| tokenizer | `{tokenizer_dir.name}` ({state.get('vocab_size')} tokens) |
| objective | {cfg.objective.masking} masking, rate {cfg.objective.mask_rate}{', SOP' if cfg.objective.sop else ''}, sequences of {cfg.objective.max_seq_len} tokens |
| size | {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, {model_cfg.num_heads} heads, {state.get('num_params', 0):,} parameters |
| optimizer | {cfg.optim.name}, lr {cfg.optim.lr}, {cfg.schedule.kind} schedule with {cfg.schedule.warmup_steps} warmup steps |
| steps | {state['step']:,} |
| tokens seen | {state['tokens_seen']:,} |

Final training losses (mean of the last logging interval):

| objective | loss |
|---|---|
{loss_lines}

Held-out MLM loss: {state.get('eval_loss', 'n/a')}

Load with `transformers.AutoModelForMaskedLM.from_pretrained(path)`.
"""


def load_weights(tag_dir: Path, model: torch.nn.Module) -> None:
    """Whole fp32 weights of a checkpoint into `model`: `model.safetensors` (ZeRO 0), `consolidated.pt`
    (ZeRO 1-2) or DeepSpeed's zero_to_fp32 (ZeRO 3)."""
    if (tag_dir / checkpoint.CONSOLIDATED).is_file():
        state = torch.load(tag_dir / checkpoint.CONSOLIDATED, weights_only=True)["params"]
    elif (tag_dir / checkpoint.WEIGHTS).is_file():
        from safetensors.torch import load_file

        state = load_file(str(tag_dir / checkpoint.WEIGHTS))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = {n for n, _ in model.named_parameters()}
    missing = [k for k in missing if k in params]
    if missing or unexpected:
        raise DataError(f"{tag_dir}: weights do not fit the model of its train_state.json "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def export_checkpoint(tag_dir: Path, out_dir: Path) -> Path:
    """`kompakt export`: a complete checkpoint -> a Hugging Face folder with tokenizer and model card."""
    from kompakt import hf
    from kompakt.models import build_pretraining_model

    tag_dir = Path(tag_dir)
    state = checkpoint.read_train_state(tag_dir)
    model_cfg = ModelConfig.model_validate(state["model"])
    cfg = PretrainConfig.model_validate(state["pretrain"])
    tokenizer_dir = Path(state["tokenizer_dir"])
    model = build_pretraining_model(model_cfg)
    load_weights(tag_dir, model)
    card = model_card(model_cfg, cfg, tokenizer_dir, state)
    if model_cfg.family == "lattice":
        from kompakt import hf_lattice

        return hf_lattice.export(model.eval(), out_dir, tokenizer_dir=tokenizer_dir, model_card=card)
    return hf.export(model.eval(), out_dir, tokenizer_dir=tokenizer_dir, model_card=card)


def run(model_cfg: ModelConfig, cfg: PretrainConfig, tokenizer_stage: Path, stage_dir: Path, *,
        stage_hash: str, inputs: dict, recipe_name: str) -> Path:
    """Train (or continue training) into `stage_dir`; returns it once the export and manifest are written.

    Exits with `loop.REQUEUE_EXIT` after saving when SIGTERM/SIGUSR1 or the time limit stopped it.
    """
    from kompakt.models import build_pretraining_model
    from kompakt.models.flops import flops_per_token, seq_lens_from_cu
    from kompakt.pretrain.data import PackedLoader, build_examples
    from kompakt.pretrain.loop import REQUEUE_EXIT, train
    from kompakt.pretrain.masking import SpecialIds, describe_sample
    from kompakt.shards import TokenShards

    t0 = time.perf_counter()
    env = dist.setup_env()
    init_distributed(env)
    ckpt_root = stage_dir / "checkpoints"
    if env.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stage_dir / RESOLVED_CONFIG, {"model": model_cfg.model_dump(mode="json"),
                                                        "pretrain": cfg.model_dump(mode="json")})
    dist.barrier()

    # --- tokenizer, shards, examples (1% held out)
    tokenizer_dir = tokenizer_stage / "tokenizer"
    tok = load_tokenizer(tokenizer_dir)
    specials = SpecialIds.from_tokenizer(tok)
    model_cfg = check_vocab(model_cfg, specials.vocab_size, str(tokenizer_dir))
    if model_cfg.family == "lattice":
        from kompakt.pretrain.lattice import LatticeTokens, install_run_lexicon, read_lexicon

        lexicon = tokenizer_dir / "lexicon.txt"
        if not lexicon.is_file():
            raise DataError(f"{lexicon} does not exist; a lattice model needs a tokenizer trained with tokenizer.lexicon")
        # Word k of the lexicon has id vocab_size + k, so its length is the word table the recipe left open.
        words = read_lexicon(lexicon)
        if model_cfg.lattice.num_words == 0:
            lattice = model_cfg.lattice.model_copy(update={"num_words": len(words)})
            model_cfg = model_cfg.model_copy(update={"lattice": lattice})
        # collate_msp matches words with this lexicon; installed before the loaders so that
        # their fork-started workers inherit it.
        install_run_lexicon(tokenizer_dir, model_cfg)
        # The logged sample names word ids by their text instead of None.
        sample_tok = LatticeTokens(tok, words, model_cfg.vocab_size)
    else:
        sample_tok = tok
    shards = TokenShards(tokenizer_stage / "tokens")
    examples = build_examples(shards, cfg.objective.max_seq_len - cfg.objective.num_specials,
                              2 if cfg.objective.sop else 1)
    train_examples, heldout_examples = split_heldout(examples)
    loader = PackedLoader(shards, cfg.objective, cfg.data, specials, env.rank, env.world_size, train_examples)
    steps = loader.steps_info()
    # The held-out batches are built once, up front: no prefetch thread, no worker pool left idle.
    heldout_data = cfg.data.model_copy(update={"prefetch": 0, "num_workers": 0})
    heldout = PackedLoader(shards, cfg.objective, heldout_data, specials, env.rank, env.world_size, heldout_examples)
    heldout_iter = iter(heldout)
    eval_batches = [next(heldout_iter) for _ in range(cfg.eval_batches)]

    # --- model and engine
    checkpoint.seed_everything(cfg.seed)
    model = build_pretraining_model(model_cfg)
    num_params = sum(p.numel() for p in model.parameters())
    engine, engine_info = build_engine(model, cfg, env, steps.grad_accum_steps)
    if cfg.compile:
        engine.compile()
    sample = eval_batches[0]
    fpt = flops_per_token(model_cfg, seq_lens_from_cu(sample["cu_seqlens"]), int(sample["mlm_positions"].numel()))
    table("pretrain", ["", "value"], [
        ("parameters", num_params), ("processes", env.world_size), ("device", str(engine_info.device)),
        ("precision", engine_info.precision), ("ZeRO stage", cfg.zero_stage),
        ("training examples", len(train_examples)), ("held-out examples", len(heldout_examples)),
        ("tokens per micro-batch (mean)", round(steps.mean_tokens_per_micro_batch)),
        ("accumulation steps", steps.grad_accum_steps), ("tokens per step", round(steps.tokens_per_step)),
        ("steps per epoch", round(steps.steps_per_epoch, 2)), ("FLOPs per token", f"{fpt:.3g}"),
    ]) if env.is_main else None

    # --- resume
    tag = checkpoint.resolve_resume(cfg.resume, ckpt_root)
    if cfg.resume == "never" and checkpoint.newest_complete(ckpt_root) is not None:
        raise ConfigError(f"pretrain.resume=never but {ckpt_root} holds checkpoints; use resume=auto to continue "
                          f"or delete {stage_dir} to start over")
    start = None
    if tag is not None:
        start, loader_state = checkpoint.load(engine, tag, cfg.zero_stage, cfg.seed)
        loader.load_state_dict(loader_state)
        info(f"pretrain: resumed from {tag} (step {start['step']:,}, {start['tokens_seen']:,} tokens)")

    # --- train
    extra = {"model": model_cfg.model_dump(mode="json"), "pretrain": cfg.model_dump(mode="json"),
             "tokenizer_dir": str(tokenizer_dir.resolve()), "tokenizer_stage": str(tokenizer_stage.resolve()),
             "recipe": recipe_name, "vocab_size": specials.vocab_size, "num_params": num_params}
    result = train(engine, engine_info, cfg, loader, out_dir=stage_dir, ckpt_root=ckpt_root, start=start,
                   train_state_extra=extra, eval_batches=eval_batches, flops_per_token=fpt,
                   peak_flops=peak_flops(engine_info.device), describe=lambda b: describe_sample(b, sample_tok))
    if result.stopped != "done":
        info(f"pretrain: stopped by {result.stopped} at step {result.step:,}; saved {result.checkpoint}; "
             f"exit {REQUEUE_EXIT} so the job can be requeued (resume: auto continues)")
        sys.exit(REQUEUE_EXIT)

    # --- export and manifest (rank 0)
    if env.is_main:
        final = result.checkpoint
        state = checkpoint.read_train_state(final)
        state.update(final_losses=result.last_losses, eval_loss=result.eval_loss)
        write_json_atomic(final / checkpoint.TRAIN_STATE, state)
        export_checkpoint(final, stage_dir / "export")
        manifest = {
            "stage": "pretrain", "hash": stage_hash, "inputs": inputs,
            "config": {"model": model_cfg.model_dump(mode="json"), "pretrain": cfg.model_dump(mode="json")},
            "versions": package_versions(), "host": platform.node(), "argv": sys.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "counts": {"steps": result.step, "tokens_seen": result.tokens_seen, "num_params": num_params,
                       "num_skipped_steps": result.num_skipped, "world_size": env.world_size},
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

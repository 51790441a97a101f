"""Train a tiny real model 20 steps on fixed synthetic shards and print the per-step losses as JSON.

Run as `python tests/golden/worker.py FAMILY OUT`. Everything is fixed: a word-level tokenizer
built from a constant vocabulary, token shards drawn from a seeded generator, fp32 on one CPU
thread. The golden-loss test compares the printed losses with recorded ones, so a refactor of
the training core that changes any number (masking, packing, the engine, the loop) is caught.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

VOCAB = 128
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_shards(folder: Path) -> None:
    """40 documents of 3-6 sentences; a sentence repeats a short motif so the MLM can learn it."""
    from kompakt.shards import ShardWriter, write_index

    rng = np.random.default_rng(1234)
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, 0, VOCAB)
    for _ in range(40):
        sentences = []
        for _ in range(int(rng.integers(3, 7))):
            motif = rng.integers(len(SPECIALS), VOCAB, size=int(rng.integers(2, 5)))
            n = int(rng.integers(6, 20))
            ids = np.resize(motif, n).astype(np.int64)
            starts = (rng.random(n) < 0.7).astype(np.uint8)
            starts[0] = 1
            sentences.append((ids.tolist(), starts.tolist()))
        writer.add_document(sentences)
    write_index(folder, [writer.close()], VOCAB)


def tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(len(SPECIALS), VOCAB)])}
    return Tokenizer(WordLevel(vocab, unk_token="[UNK]"))


def model_and_objective(family: str):
    from kompakt.model_config import ModelConfig

    common = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
    if family == "albert":
        return ModelConfig(family="albert", embedding_size=16, **common), {"masking": "ngram", "sop": True,
                                                                          "max_seq_len": 32}
    if family == "spanbert":
        return ModelConfig(family="spanbert", **common), {"masking": "span", "max_seq_len": 32}
    return ModelConfig(family="bert", **common), {"masking": "whole_word", "max_seq_len": 32}


def main(family: str, out: Path) -> None:
    torch.set_num_threads(1)
    from kompakt import checkpoint
    from kompakt.dist import setup_env
    from kompakt.engine import build_engine, init_distributed
    from kompakt.models import build_pretraining_model
    from kompakt.pretrain.data import PackedLoader
    from kompakt.pretrain.loop import train
    from kompakt.pretrain.masking import SpecialIds
    from kompakt.pretrain_config import PretrainConfig
    from kompakt.shards import TokenShards

    write_shards(out / "tokens")
    model_cfg, objective = model_and_objective(family)
    cfg = PretrainConfig.model_validate({
        "max_steps": 20, "seed": 5, "objective": objective,
        "data": {"tokens_per_micro_batch": 256, "global_batch_tokens": 512, "seed": 2},
        "optim": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.01},
        "schedule": {"kind": "linear", "warmup_steps": 4},
        "engine": {"zero_stage": 0, "precision": "fp32", "grad_clip": 1.0},
        "run": {"log_every": 1, "save_every": 1000, "resume": "never", "prefetch": 0},
    })
    env = setup_env()
    init_distributed(env)
    shards = TokenShards(out / "tokens")
    specials = SpecialIds.from_tokenizer(tokenizer())
    loader = PackedLoader(shards, cfg.objective, cfg.data, specials, env.rank, env.world_size, prefetch=0)
    checkpoint.seed_everything(cfg.seed)
    engine, info = build_engine(build_pretraining_model(model_cfg), cfg, env, loader.steps_info().grad_accum_steps)
    train(engine, info, cfg, loader, out_dir=out, ckpt_root=out / "checkpoints")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"accum": info.accumulation_steps,
                      "losses": [{k: v for k, v in r.items() if k.startswith("loss")} for r in rows]}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1], Path(sys.argv[2]))

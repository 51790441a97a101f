"""A pretraining process for the distributed and resume tests: engine + loop on a tiny real model.

Run as `python tests/distributed/worker.py OUT [options]`, one process per rank (the tests set
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun would). The model is a small real
`nn.Module` that takes the packed batch contract; the loader deals a deterministic stream of
packed micro-batches round-robin over ranks and resumes from its state on any world size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64


class TinyPackedMLM(nn.Module):
    """Embeddings, a per-sequence context mix (never across `cu_seqlens` boundaries), dropout and an MLM head."""

    def __init__(self, dim: int = 16, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids, cu_seqlens, max_seqlen, mlm_positions, mlm_labels, **unused):
        h = self.emb(input_ids)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_of_token = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        ctx = torch.zeros(len(lengths), h.shape[1]).index_add_(0, seq_of_token, h) / lengths[:, None]
        h = self.norm(h + torch.tanh(self.mix(ctx[seq_of_token])))
        logits = self.head(self.drop(h[mlm_positions]))
        loss = F.cross_entropy(logits, mlm_labels)
        self.calls = getattr(self, "calls", 0) + 1
        if _nan_call(self.calls):
            loss = loss * float("nan")
        return {"loss": loss, "losses": {"mlm": loss.detach()}, "num_predictions": int(mlm_positions.numel())}


def _nan_call(call: int) -> bool:
    """WORKER_NAN_CALLS="4" poisons the 4th forward call of this process, "4+" every call from the 4th on."""
    spec = os.environ.get("WORKER_NAN_CALLS", "")
    if not spec:
        return False
    return call >= int(spec[:-1]) if spec.endswith("+") else call in {int(x) for x in spec.split(",")}


def make_batch(index: int, tokens: int = 48) -> dict:
    """Global micro-batch `index`: sequences of a repeating pattern, 15% of tokens masked."""
    rng = np.random.default_rng(index)
    lengths = []
    while tokens - sum(lengths) >= 16:
        lengths.append(int(rng.integers(4, 12)))
    lengths.append(tokens - sum(lengths))
    ids = np.concatenate([(np.arange(n) * (3 + i % 5) + rng.integers(0, VOCAB)) % (VOCAB - 1) + 1
                          for i, n in enumerate(lengths)])
    positions = np.sort(rng.choice(tokens, size=max(1, tokens * 15 // 100), replace=False))
    labels = ids[positions].copy()
    masked = ids.copy()
    masked[positions] = 0
    cu = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    return {"input_ids": torch.from_numpy(masked.astype(np.int64)), "cu_seqlens": torch.from_numpy(cu),
            "max_seqlen": int(max(lengths)), "mlm_positions": torch.from_numpy(positions.astype(np.int64)),
            "mlm_labels": torch.from_numpy(labels.astype(np.int64))}


class RoundRobinLoader:
    """Rank r of W takes global micro-batches r, r+W, ...; the state counts micro-batches of all ranks."""

    def __init__(self, rank: int, world: int, pause_before: int | None, flag: Path):
        self.rank, self.world, self.position = rank, world, 0
        self.pause_before, self.flag, self.num_taken = pause_before, flag, 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def __iter__(self):
        while True:
            if self.pause_before is not None and self.num_taken == self.pause_before:
                self.flag.write_text("paused")  # the test kills us with SIGKILL while we wait here
                time.sleep(3600)
            batch = make_batch(self.position + self.rank)
            self.position += self.world
            self.num_taken += 1
            yield batch


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--micro-per-step", type=int, default=2, help="global micro-batches per optimizer step")
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--resume", default="auto")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--optim", default="adamw")
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--pause-before-micro", type=int, default=None)
    p.add_argument("--keep-last", type=int, default=2)
    args = p.parse_args(argv)

    from kompakt import checkpoint
    from kompakt.dist import setup_env
    from kompakt.engine import build_engine, init_distributed
    from kompakt.pretrain.loop import REQUEUE_EXIT, train
    from kompakt.pretrain_config import PretrainConfig

    env = setup_env()
    init_distributed(env)
    micro_tokens = 48
    cfg = PretrainConfig.model_validate({
        "max_steps": args.steps, "save_every": args.save_every, "keep_last": args.keep_last, "resume": args.resume,
        "zero_stage": args.zero, "log_every": 1, "seed": 3,
        "optim": {"name": args.optim, "lr": 3e-2, "weight_decay": 0.01, "grad_clip": 1.0},
        "schedule": {"kind": args.schedule, "warmup_steps": 2},
        "objective": {"max_seq_len": 16},
        "data": {"tokens_per_micro_batch": micro_tokens, "global_batch_tokens": micro_tokens * args.micro_per_step},
    })
    checkpoint.seed_everything(cfg.seed)
    model = TinyPackedMLM(dropout=args.dropout)
    engine, info = build_engine(model, cfg, env)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_root = args.out / "checkpoints"
    loader = RoundRobinLoader(env.rank, env.world_size, args.pause_before_micro, args.out / f"paused-{env.rank}")
    start = None
    tag = checkpoint.resolve_resume(cfg.run.resume, ckpt_root)
    if tag is not None:
        start, loader_state = checkpoint.load(engine, tag, cfg.engine.zero_stage, cfg.seed)
        loader.load_state_dict(loader_state)
    result = train(engine, info, cfg, loader, out_dir=args.out, ckpt_root=ckpt_root, start=start)
    if env.rank == 0:
        torch.save({k: v.detach().cpu() for k, v in engine.module.state_dict().items()}, args.out / "final.pt")
        (args.out / "result.json").write_text(json.dumps({"step": result.step, "tokens_seen": result.tokens_seen,
                                                          "stopped": result.stopped, "num_skipped": result.num_skipped,
                                                          "accum": info.accumulation_steps}))
    return REQUEUE_EXIT if result.stopped != "done" else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main(sys.argv[1:]))

"""Padded, length-bucketed batches for stock Hugging Face models (layer scoring, pruning, quantization, speed).

Training-time distillation runs on packed batches (kompakt/packed.py); what reads an exported folder
with stock `transformers` or ONNX Runtime takes `(B, L)` tensors instead. Sorting by length before
cutting keeps padding to a few percent: a batch holds sequences of nearly equal length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch


def padded_batches(sequences: Iterable[Sequence[int]], *, pad_id: int, batch_size: int = 32,
                   bucket: bool = True) -> list[dict[str, torch.Tensor]]:
    """Token-id sequences (specials included) -> batches of `input_ids`, `attention_mask`, `token_type_ids`.

    With `bucket` the sequences are sorted by length (stable, so the result is deterministic) before
    they are cut into batches of `batch_size`; each batch is padded to its own longest sequence.
    """
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    order = np.argsort([len(s) for s in seqs], kind="stable") if bucket else np.arange(len(seqs))
    out = []
    for a in range(0, len(order), batch_size):
        rows = [seqs[i] for i in order[a:a + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.from_numpy(r)
            mask[j, :len(r)] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def text_batches(model_dir: str | Path, texts: Sequence[str], *, max_len: int = 128, batch_size: int = 32,
                 bucket: bool = True) -> list[dict[str, torch.Tensor]]:
    """Texts tokenised with the tokenizer saved in `model_dir` ([CLS] ... [SEP], cut at `max_len`), batched."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(list(texts), truncation=True, max_length=max_len)["input_ids"]
    return padded_batches(ids, pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                          batch_size=batch_size, bucket=bucket)


def shard_batches(shards, examples, *, cls_id: int, sep_id: int, pad_id: int, max_examples: int = 256,
                  batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """The first `max_examples` examples of kompakt token shards as `[CLS] tokens [SEP]`, padded and bucketed.

    `shards` is a `kompakt.shards.TokenShards`, `examples` its `kompakt.packed.ExampleIndex`.
    """
    from kompakt.packed import read_example

    n = min(max_examples, len(examples))
    seqs = [np.concatenate(([cls_id], read_example(shards, examples, i, i).tokens, [sep_id])) for i in range(n)]
    return padded_batches(seqs, pad_id=pad_id, batch_size=batch_size)

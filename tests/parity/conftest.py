"""Helpers shared by the parity tests: one set of documents as a padded HF batch and as a packed batch."""

import pytest
import torch


def make_docs(num_docs: int, vocab_size: int, seed: int = 0, min_len: int = 3, max_len: int = 17):
    """Random documents of varied lengths: (ids per doc, token types per doc)."""
    g = torch.Generator().manual_seed(seed)
    docs, types = [], []
    for _ in range(num_docs):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        docs.append(torch.randint(5, vocab_size, (n,), generator=g))
        t = torch.zeros(n, dtype=torch.long)
        t[n // 2:] = 1
        types.append(t)
    return docs, types


def padded_batch(docs, types):
    """HF inputs: input_ids, token_type_ids and attention_mask of shape (B, Lmax), right-padded with 0."""
    L = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), L, dtype=torch.long)
    tt = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, (d, t) in enumerate(zip(docs, types)):
        ids[i, :len(d)], tt[i, :len(d)], mask[i, :len(d)] = d, t, 1
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask}


def packed_batch(docs, types, mask_every: int = 4):
    """Our batch-contract dict for the same documents; every `mask_every`-th token is a predicted position."""
    ids = torch.cat(docs)
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([len(d) for d in docs]), 0)
    positions = torch.arange(1, len(ids), mask_every)
    return {"input_ids": ids, "token_type_ids": torch.cat(types), "cu_seqlens": cu,
            "max_seqlen": max(len(d) for d in docs), "mlm_positions": positions, "mlm_labels": ids[positions]}


@pytest.fixture
def docs_factory():
    return make_docs

"""The held-out evaluation of `kompakt bench train`: one function scores every model on the same
pre-masked batches, so a perfect predictor gets ~0, a uniform one ln(V), and the unigram floor is
the entropy of the training tokens."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kompakt.pretrain.bench import heldout_batches, heldout_mlm_loss, unigram_loss

V, MASK, PAD = 40, 4, 0


def docs(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(5, V, size=int(rng.integers(6, 30))).tolist(), 3] for _ in range(n)]


def test_batches_are_fixed_and_mask_inner_tokens_only():
    a, b = heldout_batches(docs(), MASK, PAD, rows_per_batch=8), heldout_batches(docs(), MASK, PAD, rows_per_batch=8)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
               for x, y in zip(a, b))
    for batch in a:
        masked = batch["labels"] != -100
        assert (batch["input_ids"][masked] == MASK).all() and masked.any(dim=1).all()
        assert not masked[:, 0].any()  # [CLS] is never a target


class Oracle(torch.nn.Module):
    """Predicts the true token of every position with a huge margin (needs the labels to cheat)."""

    def __init__(self, batches, uniform=False):
        super().__init__()
        self.truth = {id(b["input_ids"]): torch.where(b["labels"] != -100, b["labels"], b["input_ids"]) for b in batches}
        self.uniform = uniform

    def forward(self, input_ids, attention_mask):
        if self.uniform:
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))
        return SimpleNamespace(logits=torch.nn.functional.one_hot(self.truth[id(input_ids)], V).float() * 100)


def test_perfect_and_uniform_predictors():
    batches = heldout_batches(docs(), MASK, PAD)
    assert heldout_mlm_loss(Oracle(batches), batches) < 1e-6
    assert heldout_mlm_loss(Oracle(batches, uniform=True), batches) == pytest.approx(math.log(V))


def test_unigram_floor_is_below_uniform_on_skewed_tokens():
    rng = np.random.default_rng(1)
    skewed = [[2, *np.minimum(5 + rng.geometric(0.3, size=30), V - 1).tolist(), 3] for _ in range(50)]
    batches = heldout_batches(skewed[:10], MASK, PAD)
    assert unigram_loss(skewed[10:], batches, V) < math.log(V) - 0.5

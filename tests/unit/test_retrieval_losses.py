"""The retrieval objectives and metrics on examples small enough to compute by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kompakt.eval import metrics as M
from kompakt.finetune import retrieval as R


def test_info_nce_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits (1, 0): -log(e / (e + 1)) = log(1 + e^-1)
    assert R.info_nce(q, d, torch.tensor([0]), 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # temperature 0.5 doubles the logits: log(1 + e^-2)
    assert R.info_nce(q, d, torch.tensor([0]), 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    # the other document excluded (relevant to the query too): nothing left to push away
    exclude = torch.tensor([[False, True]])
    assert R.info_nce(q, d, torch.tensor([0]), 1.0, exclude).item() == pytest.approx(0.0, abs=1e-6)
    # a soft target (0.5, 0.5): 0.5 * (log(1 + e^-1) + log(1 + e))
    soft = torch.tensor([[0.5, 0.5]])
    want = 0.5 * (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)))
    assert R.info_nce(q, d, torch.tensor([0]), 1.0, soft=soft).item() == pytest.approx(want, abs=1e-6)
    # soft target with an excluded column: no NaN from -inf * 0
    soft = torch.tensor([[1.0, 0.0]])
    assert R.info_nce(q, d, torch.tensor([0]), 1.0, exclude, soft).item() == pytest.approx(0.0, abs=1e-6)


def test_quadruplet_loss_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    pos, hard, easy = torch.tensor([[0.8, 0.6]]), torch.tensor([[0.6, 0.8]]), torch.tensor([[0.0, 1.0]])
    # s_p 0.8, s_h 0.6, s_e 0: relu(0.3 - 0.8 + 0.6) + relu(0.7 - 0.6 + 0) = 0.1 + 0.1
    assert R.quadruplet_loss(q, pos, hard, easy, 0.3, 0.7).item() == pytest.approx(0.2, abs=1e-6)
    # margins met on both sides: zero
    assert R.quadruplet_loss(q, pos, hard, easy, 0.1, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    # only the second term: the hard negative must also beat the simple one (what plain triplets lack)
    assert R.quadruplet_loss(q, pos, hard, easy, 0.1, 0.8).item() == pytest.approx(0.2, abs=1e-6)


def test_label_enhancement_targets_by_hand():
    bm25 = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    cos = torch.tensor([[0.5, 0.2, -0.1], [0.4, 0.0, 0.2]])
    rel = R.relevance(bm25, cos, 0.5)
    # row 1: BM25 scaled by its max (2) -> (1, 0.5, 0); row 2 has no matching term -> BM25 part 0
    torch.testing.assert_close(rel, torch.tensor([[0.75, 0.35, -0.05], [0.2, 0.0, 0.1]]))
    t = R.enhanced_targets(torch.tensor([0, 2]), rel, 0.2, 1.0)
    e = np.exp([0.75, 0.35, -0.05])
    want0 = 0.8 * np.array([1, 0, 0]) + 0.2 * e / e.sum()
    np.testing.assert_allclose(t[0].numpy(), want0, atol=1e-6)
    assert torch.allclose(t.sum(-1), torch.ones(2))
    # an excluded column gets no mass
    t = R.enhanced_targets(torch.tensor([0, 2]), rel, 0.5, 1.0, torch.tensor([[False, True, False], [False] * 3]))
    assert t[0, 1].item() == 0.0 and t[0].sum().item() == pytest.approx(1.0)
    # weight 0 is the plain one-hot target (InfoNCE)
    assert torch.equal(R.enhanced_targets(torch.tensor([1, 0]), rel, 0.0, 0.1), torch.eye(3)[[1, 0]])


def test_retrieval_metrics_by_hand():
    gold = [{"a": 1.0}, {"b": 2.0, "c": 1.0}]
    pred = [["x", "a"], ["c", "y", "b"]]
    assert M.compute("recall_at_1", gold, pred) == pytest.approx((0 + 0.5) / 2)
    assert M.compute("recall_at_10", gold, pred) == pytest.approx(1.0)
    assert M.compute("mrr_at_10", gold, pred) == pytest.approx((0.5 + 1.0) / 2)
    # query 1: 1 / log2(3) over 1; query 2: (1 + 2 / log2(4)) over (2 + 1 / log2(3))
    n1 = 1 / math.log2(3)
    n2 = (1 + 2 / 2) / (2 + 1 / math.log2(3))
    assert M.compute("ndcg_at_10", gold, pred) == pytest.approx((n1 + n2) / 2)
    # a relevant document at rank 11 counts for recall@100, not for MRR@10 or recall@10
    late = [[f"x{i}" for i in range(10)] + ["a"]]
    assert M.compute("mrr_at_10", [{"a": 1}], late) == 0.0 and M.compute("recall_at_10", [{"a": 1}], late) == 0.0
    assert M.compute("recall_at_100", [{"a": 1}], late) == 1.0
    # additive statistics reproduce the metric, so the bootstrap and paired tests apply unchanged
    for m in M.RETRIEVAL:
        assert M.from_stats(m, M.sufficient_stats(m, gold, pred).sum(0)) == pytest.approx(M.compute(m, gold, pred))
    with pytest.raises(Exception, match="ranked list"):
        M.compute("recall_at_10", gold, ["a", "b"])


def test_terms_and_bm25_rank_the_matching_document_first():
    assert R.terms("Ørret, ørret! 3 små fisker") == ["ørret", "ørret", "3", "små", "fisker"]
    assert R.terms("我爱北京") == ["我", "爱", "北", "京"]
    bm = R.BM25({"d1": "hunden løper i parken", "d2": "katten sover på sofaen", "d3": "fuglen synger"})
    assert bm.search(["katten sover"], 2)[0][0] == "d2"
    assert bm.search(["", "fuglen"], 3)[1][0] == "d3" and len(bm.search(["x"], 10)[0]) == 3


def test_batcher_masks_relevant_documents_that_are_not_the_target():
    from kompakt.finetune.tasks import RetrievalOptions

    opts = RetrievalOptions(hard_negatives="bm25", num_hard_negatives=1, loss="quadruplet")
    docs = {"d1": [1, 5, 2], "d2": [1, 6, 2], "d3": [1, 7, 7, 2], "d4": [1, 8, 2]}
    b = R.Batcher(opts, docs, list(docs), 0, seed=0)
    feats = [{"input_ids": [1, 9, 2], "query_id": "q1", "query": "a", "row": 0, "positive": "d1",
              "relevant": {"d1", "d2"}, "mined": ["d3"]},
             {"input_ids": [1, 9, 9, 2], "query_id": "q2", "query": "b", "row": 1, "positive": "d2",
              "relevant": {"d2"}, "mined": ["d1"]}]
    batch = b(feats)
    # documents: positives d1, d2; hard negatives d3 (q1), d1 (q2); simple negatives (random, not relevant)
    assert batch["doc_input_ids"].shape[0] == 2 + 2 + 2
    # q1: d2 is relevant to it too, and column 3 is its own positive d1 again (q2's hard negative): both
    # masked, neither a negative nor a second target
    assert batch["exclude"][0].tolist()[:4] == [False, True, False, True]
    assert batch["exclude"][1].tolist()[:4] == [False, False, False, False]
    assert batch["hard_index"].tolist() == [2, 3] and batch["easy_index"].tolist() == [4, 5]
    again = b(feats)  # the draws are fixed per query and seed: a resumed job sees the same batch
    assert torch.equal(again["doc_input_ids"], batch["doc_input_ids"])

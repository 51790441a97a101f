"""The fill-mask check at the end of `kompakt run`: masked held-out words against the unigram guess. A model
with random weights must not be said to beat the guess, and the guess is the most frequent training word."""

from __future__ import annotations

import re

import numpy as np


def _stage_and_model(tmp_path, demo_docs):
    """A tokenizer stage with held-out shards and a random 1-layer BertForMaskedLM folder on its vocabulary."""
    import torch
    from test_pretrain import build_tokenizer_stage
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from kompakt.shards import ShardWriter, write_index
    from kompakt.tokenization.pretokenize import encode_sentences, word_start_table

    stage = build_tokenizer_stage(tmp_path / "tok", demo_docs[:1500], vocab_size=512)
    # heldout/: other documents in the stage's own ids, as the tokenizer stage writes them
    raw = Tokenizer.from_file(str(stage / "tokenizer" / "tokenizer.json"))
    table = word_start_table(raw)
    (stage / "heldout").mkdir()
    writer = ShardWriter(stage / "heldout", 0, raw.get_vocab_size())
    for doc in demo_docs[1500:1700]:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", doc.replace("\n", " ")) if s.strip()]
        ids, starts, lengths = encode_sentences(raw, sentences, table)
        bounds = (np.cumsum(lengths) - lengths).tolist()
        writer.add_document([(ids[a:a + n], starts[a:a + n]) for a, n in zip(bounds, lengths.tolist())])
    write_index(stage / "heldout", [writer.close()], raw.get_vocab_size())

    tok = AutoTokenizer.from_pretrained(str(stage / "tokenizer"))
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=128))
    return stage, tok, model


def test_a_random_model_does_not_beat_the_unigram_guess(tmp_path, demo_docs, capfd):
    from kompakt.fill_mask import fill_mask_check
    from kompakt.shards import TokenShards

    stage, tok, model = _stage_and_model(tmp_path, demo_docs)
    model_dir = tmp_path / "mlm"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = fill_mask_check(model_dir, stage, num_positions=120)
    assert out is not None and 50 <= out["positions"] <= 120
    assert not out["beats_unigram"] and out["model_loss"] > out["unigram_loss"]
    assert "does NOT beat the unigram guess" in capfd.readouterr().err
    # the guess is the most frequent alphabetic whole word of the training shards
    counts = np.bincount(np.asarray(TokenShards(stage / "tokens").shards[0].tokens), minlength=len(tok))
    words = [int(i) for i in np.argsort(-counts, kind="stable")
             if tok.convert_ids_to_tokens(int(i)).isalpha() and int(i) not in tok.all_special_ids]
    assert out["unigram_guess"] == tok.convert_ids_to_tokens(words[0])
    assert 0 < out["unigram_top5"] and out["unigram_accuracy"] <= out["unigram_top5"]


def test_a_model_of_token_frequencies_ties_the_unigram_guess(tmp_path, demo_docs):
    """Logits that are the log training frequencies of every token, punctuation included, whatever the context:
    a model that learnt frequencies only. It must tie the unigram guess at top-1 and top-5 (both guess among
    the alphabetic tokens, since the masked token is a word) and not beat it; ranked among all tokens its
    guess was '.' or ',' and it lost every top-1."""
    import torch

    from kompakt.fill_mask import fill_mask_check
    from kompakt.shards import TokenShards

    stage, tok, model = _stage_and_model(tmp_path, demo_docs)
    counts = np.bincount(np.asarray(TokenShards(stage / "tokens").shards[0].tokens), minlength=len(tok))
    assert tok.convert_ids_to_tokens(int(np.argmax(counts))) in {".", ","}  # what made the old ranking unfair
    head = model.cls.predictions
    with torch.no_grad():
        for p in (*head.transform.parameters(),):
            p.zero_()  # the transform outputs 0, so the logits are the decoder's bias alone
        head.bias.copy_(torch.log(torch.from_numpy(counts + 1.0)))
    model_dir = tmp_path / "unigram-mlm"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = fill_mask_check(model_dir, stage, num_positions=150)
    assert out["positions"] == 150  # up to 3 words a sentence: 200 held-out documents give more than 150
    assert out["model_accuracy"] == out["unigram_accuracy"]
    assert out["model_top5"] == out["unigram_top5"] > 0
    assert abs(out["model_loss"] - out["unigram_loss"]) < 0.01 and not out["beats_unigram"]

"""Does the pretrained model know the language? Fill-mask on held-out sentences against a unigram guess.

`kompakt run` ends with this for a recipe that pretrains: whole words of held-out sentences (the tokenizer
stage's `heldout/` documents, never trained on) are masked one at a time, and the exported MLM predicts
them from the sentence around them. Beside it, the unigram guess: always the most frequent whole word of
the training shards (the five most frequent for top-5), and for the loss the training-token frequencies
(add-one smoothed). Both know the masked token is an alphabetic word: the model's softmax and the
unigram's frequencies are taken over the alphabetic tokens only. The model beats the guess when its top-1 accuracy is higher and its loss lower
(top-5 accuracies are reported beside them). A model that
learnt nothing but word frequencies ties the unigram; one that reads context beats it. A few sentences are
shown with the model's top 3.

A Lattice-BERT (model_type lattice-bert) reads each sentence as its lattice: the characters, then the
lexicon words found in them; its guess is the best character (the word half of its output layer is left
out). Its masked word is a character that no lexicon word covers, a whole word as for the other families:
masked segment prediction masks a word's characters together, so one character of a word is never
filled in from the others in pretraining.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kompakt.log import info, table
from kompakt.shards import TokenShards

MAX_SENT_TOKENS = 48


def _positions(shards: TokenShards, tokenizer, limit: int, single=None, per_sentence: int = 3) -> list[tuple[list[int], int]]:
    """(sentence token ids, index of one masked whole single-token alphabetic word) pairs from the held-out
    documents: each document's longest sentence of 6 to 48 tokens (a definition or an example phrase rather
    than a headword line), up to `per_sentence` of its candidate words spread evenly over it (deterministic),
    at most `limit` in all. `single(ids)`, when given, is the set of positions that stand alone as a word (for
    a Lattice-BERT: no lexicon word covers them). More than one word a sentence: 178 held-out documents gave
    demo-zh only 144 words, too few to tell a model from the unigram guess (one word is 0.7 points)."""
    out = []
    for g in range(shards.num_docs):
        tokens, starts, sents = shards.document(g)
        best = None
        for a, b in zip(sents[:-1], sents[1:]):
            ids, ws = np.asarray(tokens[a:b]).tolist(), np.asarray(starts[a:b]).tolist()
            if not 6 <= len(ids) <= MAX_SENT_TOKENS or (best is not None and len(ids) <= len(best[0])):
                continue
            words = [i for i in range(len(ids)) if ws[i] and (i + 1 == len(ids) or ws[i + 1])
                     and tokenizer.convert_ids_to_tokens(ids[i]).isalpha()]
            if single is not None:
                alone = single(ids)
                words = [i for i in words if i in alone]
            if words:
                best = (ids, words)
        if best is not None:
            ids, words = best
            k = min(per_sentence, len(words))
            picks = sorted({words[(2 * j + 1) * len(words) // (2 * k)] for j in range(k)})
            out.extend((ids, p) for p in picks[:limit - len(out)])
        if len(out) >= limit:
            break
    return out


def _plain_rows(chunk, cls: int, sep: int, mask: int, pad: int) -> dict:
    """`[CLS] sentence [SEP]` rows with the chosen token masked, padded."""
    width = max(len(ids) for ids, _ in chunk) + 2
    x = torch.full((len(chunk), width), pad, dtype=torch.long)
    att = torch.zeros_like(x)
    for r, (ids, pos) in enumerate(chunk):
        row = [cls, *ids, sep]
        row[pos + 1] = mask
        x[r, :len(row)] = torch.tensor(row)
        att[r, :len(row)] = 1
    return {"input_ids": x, "attention_mask": att}


def _lattice_rows(model_dir: Path, model):
    """For Lattice-BERT: a row builder (each sentence's lattice, its masked character's covering words left
    out) and `single`, the characters of a sentence that no lexicon word covers.

    Only such a character is a whole word to mask: masked segment prediction masks a word's characters
    together with the word, so a model trained with it never fills one character of a word from the others
    (masking 心 in 童心 would test a task it was not taught; for Norwegian the masked token is a whole word too)."""
    from kompakt.hf_lattice import folder_lexicon, lattice_batch, mask_character
    from kompakt.lattice_inputs import build_lattice, uncovered_characters

    lexicon = folder_lexicon(model_dir, model.config)

    def rows(chunk, cls: int, sep: int, mask: int, pad: int) -> dict:
        # pos + 1: the masked character's position in the row, after [CLS]
        return lattice_batch([mask_character(build_lattice([ids], lexicon, cls_id=cls, sep_id=sep), pos + 1, mask)
                              for ids, pos in chunk], pad)

    return rows, lambda ids: uncovered_characters(ids, lexicon)


def fill_mask_check(model_dir: Path, tok_stage: Path, *, num_positions: int = 300, num_show: int = 4) -> dict | None:
    """Top-1 accuracy and cross-entropy of the MLM at masked held-out words against the unigram guess; prints
    a table and returns the figures (None when the tokenizer stage has no held-out shards)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from kompakt.hf import logits_at
    from kompakt.onnx_export import load_stock

    if not (Path(tok_stage) / "heldout" / "index.json").is_file():
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(Path(tok_stage) / "tokenizer"))
    held = TokenShards(Path(tok_stage) / "heldout")
    train = TokenShards(Path(tok_stage) / "tokens")
    counts = np.zeros(train.vocab_size, dtype=np.int64)
    for s in train.shards:
        counts += np.bincount(np.asarray(s.tokens), minlength=train.vocab_size)[:train.vocab_size]
    special = set(tokenizer.all_special_ids)
    # Both guessers know the masked token is a word, an alphabetic token: the unigram guess and the model are
    # each a distribution over the alphabetic tokens only (the unigram's add-one smoothed counts, the model's
    # softmax over those logits). Over all tokens, a model that ranks punctuation first (the most frequent
    # masked target in pretraining) lost to the unigram's alphabetic guess however well it ranked the words.
    candidate = np.array([i not in special and tokenizer.convert_ids_to_tokens(i).isalpha()
                          for i in range(len(counts))])
    words = [i for i in np.argsort(-counts)[:2000].tolist() if candidate[i]]
    guess = words[0]
    smoothed = np.where(candidate, counts + 1, 0)
    log_unigram = np.log(np.maximum(smoothed, 1) / smoothed.sum())
    outside = torch.from_numpy(~candidate)
    import kompakt

    kompakt.register_hf()  # a Lattice-BERT folder (model_type lattice-bert) loads through the Auto classes
    model = load_stock(AutoModelForMaskedLM, model_dir)
    rows_of, single = (_lattice_rows(model_dir, model) if model.config.model_type == "lattice-bert"
                       else (_plain_rows, None))
    cases = _positions(held, tokenizer, num_positions, single)
    if not cases:
        return None
    cls, sep, mask = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id
    hits, hits5, losses, top3 = [], [], [], []
    with torch.inference_mode():
        for k in range(0, len(cases), 32):
            chunk = cases[k:k + 32]
            batch = rows_of(chunk, cls, sep, mask, tokenizer.pad_token_id)
            at = torch.tensor([pos + 1 for _, pos in chunk])  # after [CLS]
            # The output layer at the masked positions only; a lattice's characters part.
            logits = logits_at(model, batch, torch.arange(len(chunk)), at).float()[:, :len(counts)]
            for r, (ids, pos) in enumerate(chunk):
                logp = torch.log_softmax(logits[r].masked_fill(outside, float("-inf")), -1)
                top = logp.topk(5).indices.tolist()
                hits.append(top[0] == ids[pos])
                hits5.append(ids[pos] in top)
                losses.append(-float(logp[ids[pos]]))
                top3.append(top[:3])
    truth = [ids[pos] for ids, pos in cases]
    result = {"positions": len(cases), "model_accuracy": float(np.mean(hits)),
              "model_top5": float(np.mean(hits5)), "unigram_accuracy": float(np.mean([t == guess for t in truth])),
              "unigram_top5": float(np.mean([t in words[:5] for t in truth])),
              "model_loss": float(np.mean(losses)), "unigram_loss": float(-np.mean(log_unigram[truth])),
              "unigram_guess": tokenizer.convert_ids_to_tokens(guess)}
    rows = []
    for (ids, pos), best in list(zip(cases, top3))[:num_show]:
        shown = ids[:pos] + [mask] + ids[pos + 1:]
        rows.append((tokenizer.decode(shown), tokenizer.convert_ids_to_tokens(ids[pos]),
                     ", ".join(tokenizer.convert_ids_to_tokens(best))))
    table("fill-mask on held-out sentences (never trained on)", ["sentence", "masked word", "model's top 3"], rows)
    beats = result["model_accuracy"] > result["unigram_accuracy"] and result["model_loss"] < result["unigram_loss"]
    info(f"fill-mask: {len(cases)} held-out words: model top-1 {result['model_accuracy']:.1%}, top-5 "
         f"{result['model_top5']:.1%}, loss {result['model_loss']:.2f}; unigram guess ({result['unigram_guess']!r} "
         f"first) top-1 {result['unigram_accuracy']:.1%}, top-5 {result['unigram_top5']:.1%}, loss "
         f"{result['unigram_loss']:.2f}: the model {'beats' if beats else 'does NOT beat'} the unigram guess")
    result["beats_unigram"] = beats
    return result

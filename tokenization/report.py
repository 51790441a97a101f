"""The tokenizer report on held-out documents.

- fertility: tokens per whitespace word (1.0 is a word-level vocabulary; English BERT is about 1.3)
- unk_rate: share of tokens that are the unknown token
- whole_word_rate: share of whitespace words that are a single token
- round_trip_rate: share of documents with decode(encode(text)) == round_trip_target(text), which
  for WordPiece is the normalised text's pre-tokenised words joined by a space (see train.py), and
  round_trip_strict_rate against the normalised text itself

A token belongs to the whitespace word that contains its last character (offsets are in the
original text); a token of whitespace only, such as a lone `▁`, belongs to the word after it.
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer

from kompakt.tokenization.train import round_trip_target

_WORD = re.compile(r"\S+")
# Held-out documents scored at most; 20k documents of Norwegian take a few seconds.
MAX_REPORT_DOCS = 20_000


def evaluate(tok: Tokenizer, kind: str, batches: Iterable[list[str]], unk_token: str) -> dict:
    """Score the tokenizer on batches of held-out document texts."""
    unk_id = tok.token_to_id(unk_token)
    num_docs = num_tokens = num_unk = num_words = num_whole = num_rt = num_rt_strict = 0
    for texts in batches:
        texts = texts[: MAX_REPORT_DOCS - num_docs]
        encs = tok.encode_batch(texts, add_special_tokens=False)
        decoded = tok.decode_batch([e.ids for e in encs], skip_special_tokens=False)
        for text, enc, dec in zip(texts, encs, decoded):
            ids = np.asarray(enc.ids, dtype=np.int64)
            num_tokens += len(ids)
            num_unk += int((ids == unk_id).sum())
            word_ends = np.fromiter((m.end() for m in _WORD.finditer(text)), dtype=np.int64)
            if len(word_ends) and len(ids):
                tok_last = np.fromiter((e for _, e in enc.offsets), dtype=np.int64, count=len(ids)) - 1
                word = np.minimum(np.searchsorted(word_ends, tok_last, side="right"), len(word_ends) - 1)
                num_whole += int((np.bincount(word, minlength=len(word_ends)) == 1).sum())
            num_words += len(word_ends)
            num_rt += dec == round_trip_target(tok, kind, text)
            num_rt_strict += dec == (tok.normalizer.normalize_str(text) if tok.normalizer is not None else text)
        num_docs += len(texts)
        if num_docs >= MAX_REPORT_DOCS:
            break
    return {
        "num_docs": num_docs,
        "num_tokens": num_tokens,
        "num_words": num_words,
        "fertility": num_tokens / max(num_words, 1),
        "unk_rate": num_unk / max(num_tokens, 1),
        "whole_word_rate": num_whole / max(num_words, 1),
        "round_trip_rate": num_rt / max(num_docs, 1),
        "round_trip_strict_rate": num_rt_strict / max(num_docs, 1),
        "round_trip_target": ("normalised pre-tokenised words joined by spaces" if kind == "wordpiece"
                              else "normalised text"),
    }

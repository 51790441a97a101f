"""The tokenizer report on held-out documents.

Whitespace languages (`units: "words"`):

- fertility: tokens per whitespace word (1.0 is a word-level vocabulary; English BERT is about 1.3)
- unk_rate: share of tokens that are the unknown token
- whole_word_rate: share of whitespace words that are a single token

Chinese (`units: "characters"`: `tokenizer.chinese_chars`, or held-out text of which more than half
the non-space characters are CJK ideographs), where a whitespace "word" is a whole clause and
fertility per word came out at 8.6 on real Chinese text, meaning nothing:

- chars_per_token: non-space characters per token (1.0 for a character-level vocabulary)
- unk_per_char: unknown tokens per non-space character (each unknown character is one [UNK])
- lexicon_coverage: with a word lexicon (lattice models), the share of held-out CJK characters
  inside at least one lexicon word found in the text, i.e. how much of the text the lattice sees
  words over; measured on the first `MAX_LEXICON_CHARS` characters
- fertility and whole_word_rate are null

Round trips, for every kind (shares of documents):

- round_trip_rate: decode(encode(text)) == round_trip_target(text) (train.py): for WordPiece the
  normalised text's pre-tokenised words joined by one space, the most its decoder can give
- round_trip_spacing_rate: decode(encode(text)) equals the normalised text once whitespace next to
  punctuation or a CJK ideograph is removed from both, and other whitespace runs are one space:
  what decoding really restores of the text, for every kind alike. A WordPiece decoder cannot know
  whether "Hei, deg." had a space before the comma (BERT's pre-tokenizer splits punctuation off
  either way), so this is the fair text-level check for it; a miss is a lost character ([UNK], a
  word over 100 characters) or a normaliser change the decoder cannot undo
- round_trip_exact_rate: decode(encode(text)) == the normalised text, byte for byte; null for
  WordPiece, whose decoder puts one space between all words, punctuation included, so it would read
  0 for every WordPiece tokenizer by design

A token belongs to the whitespace word that contains its last character (offsets are in the
original text); a token of whitespace only, such as a lone `▁`, belongs to the word after it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from kompakt.tokenization.train import round_trip_target

_WORD = re.compile(r"\S+")
_SPACE = re.compile(r"\s+")
# BERT's CJK ideograph blocks (the characters `handle_chinese_chars` puts spaces around).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_CJK = re.compile("[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in _CJK_RANGES) + "]")
# Held-out documents scored at most; 20k documents of Norwegian take a few seconds.
MAX_REPORT_DOCS = 20_000
# Characters checked for lexicon coverage: a Python scan of every start and word length, about
# 1 s for 200k characters and a 50k-word lexicon; enough for a share to three decimals.
MAX_LEXICON_CHARS = 200_000
# More than this share of CJK ideographs among the non-space characters: report per character.
CJK_SHARE = 0.5


@functools.cache
def _spacing_free_pattern() -> re.Pattern:
    """Whitespace next to a character that BERT's pre-tokenizer always splits off: Unicode
    punctuation (P*), the ASCII symbols it counts as punctuation, and CJK ideographs."""
    ascii_symbols = {c for c in map(chr, range(128)) if not c.isalnum() and not c.isspace() and c.isprintable()}
    cps = [cp for cp in range(0x110000) if unicodedata.category(chr(cp))[0] == "P"]
    cps += [ord(c) for c in ascii_symbols] + [cp for a, b in _CJK_RANGES for cp in (a, b)]
    runs: list[list[int]] = []
    for cp in sorted(set(cps)):
        if runs and cp == runs[-1][1] + 1:
            runs[-1][1] = cp
        else:
            runs.append([cp, cp])
    cls = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in runs)
    cjk = "".join(f"{chr(a)}-{chr(b)}" for a, b in _CJK_RANGES)
    return re.compile(rf"\s*([{cls}{cjk}])\s*")


def spacing_free(text: str) -> str:
    """`text` with whitespace runs made one space and whitespace next to punctuation or CJK removed."""
    return _spacing_free_pattern().sub(r"\1", _SPACE.sub(" ", text).strip())


def _lexicon_covered(text: str, words: set[str], lengths: Sequence[int]) -> tuple[int, int]:
    """(CJK characters of `text`, how many of them lie inside a lexicon word found in the text)."""
    covered = np.zeros(len(text), dtype=bool)
    for i in range(len(text)):
        for n in lengths:
            if text[i:i + n] in words:
                covered[i:i + n] = True
    is_cjk = np.zeros(len(text), dtype=bool)
    is_cjk[[m.start() for m in _CJK.finditer(text)]] = True
    return int(is_cjk.sum()), int((covered & is_cjk).sum())


def evaluate(tok: Tokenizer, kind: str, batches: Iterable[list[str]], unk_token: str,
             chinese_chars: bool = False, lexicon: Sequence[str] | None = None) -> dict:
    """Score the tokenizer on batches of held-out document texts (see the module docstring)."""
    unk_id = tok.token_to_id(unk_token)
    words = set(lexicon or ())
    lengths = sorted({len(w) for w in words}, reverse=True)
    num_docs = num_tokens = num_unk = num_words = num_whole = 0
    num_rt = num_rt_spacing = num_rt_exact = num_chars = num_cjk = 0
    num_lex_chars = num_lex_covered = 0
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
            num_chars += len(_SPACE.sub("", text))
            num_cjk += len(_CJK.findall(text))
            norm = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
            num_rt += dec == round_trip_target(tok, kind, text)
            num_rt_spacing += spacing_free(dec) == spacing_free(norm)
            num_rt_exact += dec == norm
            if words and num_lex_chars < MAX_LEXICON_CHARS:
                n, c = _lexicon_covered(text, words, lengths)
                num_lex_chars, num_lex_covered = num_lex_chars + n, num_lex_covered + c
        num_docs += len(texts)
        if num_docs >= MAX_REPORT_DOCS:
            break
    per_char = chinese_chars or num_cjk > CJK_SHARE * num_chars
    scores = {
        "num_docs": num_docs,
        "num_tokens": num_tokens,
        "units": "characters" if per_char else "words",
        "num_words": num_words,
        "num_chars": num_chars,
        "unk_rate": num_unk / max(num_tokens, 1),
        "fertility": None if per_char else num_tokens / max(num_words, 1),
        "whole_word_rate": None if per_char else num_whole / max(num_words, 1),
        "round_trip_rate": num_rt / max(num_docs, 1),
        "round_trip_target": ("normalised pre-tokenised words joined by spaces" if kind == "wordpiece"
                              else "normalised text"),
        "round_trip_spacing_rate": num_rt_spacing / max(num_docs, 1),
        "round_trip_exact_rate": None if kind == "wordpiece" else num_rt_exact / max(num_docs, 1),
    }
    if per_char:
        scores.update(chars_per_token=num_chars / max(num_tokens, 1), unk_per_char=num_unk / max(num_chars, 1),
                      lexicon_coverage=num_lex_covered / max(num_lex_chars, 1) if words else None)
    return scores


def report_rows(scores: dict, vocab_size: int) -> list[tuple[str, object]]:
    """The report's table rows, labelled with what each number means."""
    rows: list[tuple[str, object]] = [("vocabulary size", vocab_size), ("held-out documents", scores["num_docs"])]
    if scores["units"] == "characters":
        rows += [("characters per token", scores["chars_per_token"]),
                 ("unknown tokens per character", scores["unk_per_char"])]
        if scores["lexicon_coverage"] is not None:
            rows.append(("CJK characters inside a lexicon word", scores["lexicon_coverage"]))
    else:
        rows += [("fertility (tokens per word)", scores["fertility"]), ("unknown-token rate", scores["unk_rate"]),
                 ("words kept whole", scores["whole_word_rate"])]
    rows += [(f"round trip: decode == {scores['round_trip_target']}", scores["round_trip_rate"]),
             ("round trip: decode == normalised text, up to spacing at punctuation and CJK",
              scores["round_trip_spacing_rate"])]
    if scores["round_trip_exact_rate"] is not None:
        rows.append(("round trip: decode == normalised text, exactly", scores["round_trip_exact_rate"]))
    return rows

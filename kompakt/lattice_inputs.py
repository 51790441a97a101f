"""Lattice-BERT's inputs, for every stage that builds them: the lexicon and the lattice of a sentence.

A Chinese sentence enters Lattice-BERT as a lattice: every character plus every lexicon word that
matches a run of its characters, appended after the characters, each token with its span of character
positions (see kompakt/pretrain/lattice.py for the layout and masked segment prediction). Pretraining,
fine-tuning, fill-mask and inference build rows with `build_lattice` from a `Lexicon` (word k of the
tokenizer's `lexicon.txt` has id vocab_size + k). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from kompakt.errors import DataError

# A word of one character is already a character token; lattice words have at least 2.
MIN_WORD_LEN = 2


def jieba_dict_path() -> Path:
    """The dictionary shipped inside the installed `jieba` package (word, frequency, POS per line)."""
    import jieba

    return Path(jieba.__file__).resolve().parent / "dict.txt"


def read_lexicon(source: str | Path, *, max_words: int | None = None) -> list[str]:
    """Read a word list, most frequent first; `source` is a file path or "jieba".

    A line is `word [frequency [tag]]` (tokenization's `lexicon.txt` is `word<TAB>frequency`, already
    most frequent first); the sort is stable, so a file without frequencies keeps its order. Every
    multi-character word is kept, so the rank of a word, and with it its id, is its line in a
    sorted lexicon file; `Lexicon` ignores words longer than its max_word_len.
    """
    path = jieba_dict_path() if str(source) == "jieba" else Path(source)
    if not path.is_file():
        raise DataError(f"lexicon {path} does not exist; give a word list (one word per line) or 'jieba'")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"lexicon {path} is not UTF-8 ({e}); re-encode it as UTF-8") from None
    entries: dict[str, float] = {}
    for line in lines:
        parts = line.split()
        if not parts or len(parts[0]) < MIN_WORD_LEN or parts[0] in entries:
            continue
        has_freq = len(parts) > 1 and parts[1].replace(".", "", 1).isdigit()
        entries[parts[0]] = float(parts[1]) if has_freq else 0.0
    words = sorted(entries, key=lambda w: -entries[w])
    return words[:max_words] if max_words is not None else words


class Lexicon:
    """Lexicon words keyed by their character ids, with a prefix set so matching stops early.

    Keys are tuples of character token ids, so words are matched directly on the token stream of
    the shards. Matching a sentence of n characters costs at most n * max_word_len set lookups, and
    in practice far fewer: most two-character prefixes of Chinese text start no lexicon word.
    """

    def __init__(self, word_ids: Mapping[tuple[int, ...], int], *, max_word_len: int):
        self.max_word_len = max_word_len
        self.word_ids = {tuple(int(c) for c in k): int(i) for k, i in word_ids.items()
                         if MIN_WORD_LEN <= len(k) <= max_word_len}
        self._prefixes = {k[:n] for k in self.word_ids for n in range(1, len(k) + 1)}

    @classmethod
    def from_words(cls, words: Sequence[str], char_vocab: Mapping[str, int], *, first_word_id: int,
                   max_word_len: int) -> Lexicon:
        """Word k of `words` gets id `first_word_id + k` (the tokenizer's vocab_size for a lattice model).

        Words with a character outside `char_vocab` can never match and are skipped, but keep
        their rank, so ids stay those of the lexicon file.
        """
        table = {}
        for k, word in enumerate(words):
            if all(c in char_vocab for c in word):
                table[tuple(char_vocab[c] for c in word)] = first_word_id + k
        return cls(table, max_word_len=max_word_len)

    def __len__(self) -> int:
        return len(self.word_ids)

    def match(self, char_ids: Sequence[int]) -> list[tuple[int, int, int]]:
        """Every lexicon word in `char_ids`: (start, end inclusive, word id), ordered by start then end."""
        found = []
        ids = [int(c) for c in char_ids]
        n = len(ids)
        for i in range(n):
            for j in range(i + 1, min(n, i + self.max_word_len)):
                prefix = tuple(ids[i : j + 1])
                if prefix not in self._prefixes:
                    break
                word_id = self.word_ids.get(prefix)
                if word_id is not None:
                    found.append((i, j, word_id))
        return found


@dataclass(frozen=True)
class LatticeExample:
    """One lattice sequence; all arrays have the same length L (characters, specials, then words)."""

    input_ids: np.ndarray  # (L,) int64
    lattice_start: np.ndarray  # (L,) int64, character position of the token's first character
    lattice_end: np.ndarray  # (L,) int64, character position of its last character (inclusive)
    token_type_ids: np.ndarray  # (L,) int64
    num_chars: int  # tokens before the first word: [CLS], characters and [SEP]s

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def build_lattice(
    segments: Sequence[Sequence[int]],
    lexicon: Lexicon,
    *,
    cls_id: int,
    sep_id: int,
    max_len: int | None = None,
    cuts: Sequence[Sequence[int]] = (),
) -> LatticeExample:
    """Build `[CLS] A [SEP] (B [SEP]) words` from one or two segments of character ids.

    Words are matched inside each segment only (never across [SEP]) nor across `cuts[k]`, the
    sentence starts inside segment k, and appended in order of segment, start, end. With
    `max_len`, the characters must fit (the caller cuts sentences) and words that do not fit are
    dropped from the end.
    """
    assert 1 <= len(segments) <= 2, "a sequence holds one or two segments"
    ids, types, word_ids, word_spans, word_types = [cls_id], [0], [], [], []
    for seg, char_ids in enumerate(segments):
        offset = len(ids)
        ids.extend(int(i) for i in char_ids)
        ids.append(sep_id)
        types.extend([seg] * (len(char_ids) + 1))
        bounds = [0, *sorted(int(c) for c in (cuts[seg] if seg < len(cuts) else ())), len(char_ids)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            for start, end, word_id in lexicon.match(char_ids[lo:hi]):
                word_ids.append(word_id)
                word_spans.append((offset + lo + start, offset + lo + end))
                word_types.append(seg)
    num_chars = len(ids)
    if max_len is not None:
        if num_chars > max_len:
            raise DataError(f"build_lattice: {num_chars} characters and specials exceed max_len={max_len}")
        keep = max_len - num_chars
        word_ids, word_spans, word_types = word_ids[:keep], word_spans[:keep], word_types[:keep]
    positions = np.arange(num_chars, dtype=np.int64)
    spans = np.asarray(word_spans, dtype=np.int64).reshape(-1, 2)
    return LatticeExample(
        input_ids=np.asarray(ids + word_ids, dtype=np.int64),
        lattice_start=np.concatenate([positions, spans[:, 0]]),
        lattice_end=np.concatenate([positions, spans[:, 1]]),
        token_type_ids=np.asarray(types + word_types, dtype=np.int64),
        num_chars=num_chars,
    )

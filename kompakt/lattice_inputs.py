"""Lattice-BERT's inputs, for every stage that builds them: the lexicon, the lattice of a sentence, and
masked segment prediction (MSP) with the packed batches it makes.

A Chinese sentence enters Lattice-BERT as a lattice: every character plus every lexicon word that
matches a run of its characters, appended after the characters, each token with its span of character
positions (see kompakt/pretrain/lattice.py for the layout and MSP). Pretraining, fine-tuning, fill-mask
and inference build rows with `build_lattice` from a `Lexicon` (word k of the tokenizer's `lexicon.txt`
has id vocab_size + k). Pretraining and distillation (compress) both train on MSP-masked packed batches
(`msp_batch`), so the masking lives here, in the core that both stages may import.

Everything is numpy and pure (masking is a function of its inputs and a `numpy.random.Generator`), except
that `collate_lattice` returns the batch contract's torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from kompakt.errors import ConfigError, DataError
from kompakt.model_config import ModelConfig

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


def uncovered_characters(char_ids: Sequence[int], lexicon: Lexicon) -> set[int]:
    """Positions in `char_ids` that no lexicon word covers: the characters that are a segment by themselves,
    so masked segment prediction masks them alone (a character inside a word is masked only with the word)."""
    covered: set[int] = set()
    for start, end, _ in lexicon.match(char_ids):
        covered.update(range(start, end + 1))
    return set(range(len(char_ids))) - covered


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


# ---------------------------------------------------------------------------------------------
# Masked segment prediction and packed batches
# ---------------------------------------------------------------------------------------------


def lattice_segments(lattice_start: np.ndarray, lattice_end: np.ndarray,
                     maskable: np.ndarray) -> list[tuple[int, int]]:
    """Cut the maskable tokens' character positions into segments no token crosses.

    Returns inclusive (start, end) character-position runs, in order. Overlapping spans are merged
    (a word 0..2 and a word 2..3 make one segment 0..3); spans that merely touch are not.
    """
    order = np.lexsort((lattice_end[maskable], lattice_start[maskable]))
    starts, ends = lattice_start[maskable][order], lattice_end[maskable][order]
    segments: list[tuple[int, int]] = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        if segments and s <= segments[-1][1]:
            segments[-1] = (segments[-1][0], max(segments[-1][1], e))
        else:
            segments.append((s, e))
    return segments


def msp_mask(
    example: LatticeExample,
    rng: np.random.Generator,
    *,
    mask_id: int,
    special_ids: Iterable[int],
    replacement_ids: np.ndarray,
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masked segment prediction: returns (masked input_ids, positions, labels).

    Whole segments are chosen in random order while the masked characters stay within
    `round(mask_prob * num_characters)` (at least 1); a segment longer than what is left is skipped,
    so a sequence whose only segments are long may get no prediction. Each masked token becomes
    [MASK] with probability mask_token_prob, a random id from `replacement_ids` with
    random_token_prob, and stays itself otherwise (the 80/10/10 rule by default).
    `positions` are the masked tokens' indices in the example, ascending.
    """
    ids = example.input_ids
    special = np.isin(ids, np.fromiter(special_ids, dtype=np.int64))
    maskable = ~special
    is_char = maskable & (np.arange(len(ids)) < example.num_chars)
    num_chars = int(is_char.sum())
    segments = lattice_segments(example.lattice_start, example.lattice_end, maskable)
    budget = max(1, int(round(mask_prob * num_chars)))
    chosen = np.zeros(len(ids), dtype=bool)
    num_masked = 0
    for k in rng.permutation(len(segments)).tolist():
        s, e = segments[k]
        inside = maskable & (example.lattice_start >= s) & (example.lattice_end <= e)
        seg_chars = int((inside & is_char).sum())
        if num_masked + seg_chars > budget:
            continue
        chosen |= inside
        num_masked += seg_chars
        if num_masked >= budget:
            break
    positions = np.flatnonzero(chosen).astype(np.int64)
    labels = ids[positions].copy()
    masked = ids.copy()
    u = rng.random(len(positions))
    to_mask = u < mask_token_prob
    to_random = (u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)
    masked[positions[to_mask]] = mask_id
    masked[positions[to_random]] = rng.choice(replacement_ids, size=int(to_random.sum()))
    return masked, positions, labels


def collate_lattice(
    examples: Sequence[LatticeExample],
    masks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> dict:
    """Pack examples (and their `msp_mask` results) into one batch-contract dict of torch tensors.

    Keys: input_ids, cu_seqlens, max_seqlen, position_ids, token_type_ids, lattice_start,
    lattice_end and, with `masks`, mlm_positions (flat indices into the packed stream) and mlm_labels.
    `position_ids` are the lattice start positions: the absolute position a token is embedded at.
    """
    lengths = [len(x) for x in examples]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = [m[0] for m in masks] if masks is not None else [x.input_ids for x in examples]
    batch = {
        "input_ids": torch.from_numpy(np.concatenate(ids).astype(np.int64)),
        "cu_seqlens": torch.from_numpy(offsets.astype(np.int32)),
        "max_seqlen": int(max(lengths)),
        "position_ids": torch.from_numpy(np.concatenate([x.lattice_start for x in examples])),
        "token_type_ids": torch.from_numpy(np.concatenate([x.token_type_ids for x in examples])),
        "lattice_start": torch.from_numpy(np.concatenate([x.lattice_start for x in examples])),
        "lattice_end": torch.from_numpy(np.concatenate([x.lattice_end for x in examples])),
    }
    if masks is not None:
        batch["mlm_positions"] = torch.from_numpy(np.concatenate([m[1] + o for m, o in zip(masks, offsets)]))
        batch["mlm_labels"] = torch.from_numpy(np.concatenate([m[2] for m in masks]).astype(np.int64))
    return batch


def msp_batch(examples: Sequence, lexicon: Lexicon, specials, seed: int, *, max_seq_len: int,
              mask_rate: float, mask_token_prob: float = 0.8, random_token_prob: float = 0.1) -> dict:
    """MSP-masked packed lattice batch of shard examples (`kompakt.packed.Example`), the one both
    pretraining (`masking=msp`) and distillation of a Lattice-BERT train on.

    Each example (character ids of one document run, `sent_starts` inside it) becomes
    `[CLS] characters [SEP] words` with words matched inside sentences, is MSP-masked with the
    generator of (seed, example.index) and packed with `collate_lattice`: a pure function of each
    example's sample index. Words may make a sequence up to 2 x max_seq_len tokens long (the loader
    budgets them with `lattice_lengths`). `specials` is a `kompakt.tokenizer.SpecialIds`; with
    `mask_rate` 0 nothing is masked (no predictions), as distillation's clean-text setting asks.
    """
    from kompakt.packed import example_rng

    special_ids = {specials.cls, specials.sep, specials.mask, specials.pad}
    lattices, masks = [], []
    for ex in examples:
        lat = build_lattice([np.asarray(ex.tokens, dtype=np.int64)], lexicon, cls_id=specials.cls,
                            sep_id=specials.sep, max_len=2 * max_seq_len, cuts=[ex.sent_starts])
        if mask_rate > 0:
            masks.append(msp_mask(lat, example_rng(seed, ex.index), mask_id=specials.mask,
                                  special_ids=special_ids, replacement_ids=specials.replacement_ids,
                                  mask_prob=mask_rate, mask_token_prob=mask_token_prob,
                                  random_token_prob=random_token_prob))
        else:
            masks.append((lat.input_ids, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
        lattices.append(lat)
    return collate_lattice(lattices, masks)


# ---------------------------------------------------------------------------------------------
# A tokenization run's lexicon, and the loader's token budget
# ---------------------------------------------------------------------------------------------


def load_run_lexicon(lexicon_path: str | Path, char_vocab: Mapping[str, int], vocab_size: int,
                     max_word_len: int, num_words: int | None = None) -> Lexicon:
    """The `Lexicon` of a tokenization run: word k of its `lexicon.txt` gets id vocab_size + k.

    `num_words` (model.lattice.num_words) must cover the file's words, or their ids would fall
    outside the model's embedding table.
    """
    words = read_lexicon(lexicon_path)
    if num_words is not None and len(words) > num_words:
        raise DataError(f"{lexicon_path} lists {len(words)} words but model.lattice.num_words={num_words}; "
                        f"set model.lattice.num_words={len(words)}")
    return Lexicon.from_words(words, char_vocab, first_word_id=vocab_size, max_word_len=max_word_len)


def load_tokenizer_lexicon(tokenizer_dir: str | Path, model_cfg: ModelConfig) -> Lexicon:
    """Load a tokenization run's lexicon for model.family=lattice.

    Reads `tokenizer.json` (the character ids) and `lexicon.txt` from `tokenizer_dir`; word ids start
    at model.vocab_size, and model.lattice.num_words must cover the lexicon. Returns the lexicon.
    """
    from tokenizers import Tokenizer

    tok_dir = Path(tokenizer_dir)
    for name in ("tokenizer.json", "lexicon.txt"):
        if not (tok_dir / name).is_file():
            raise DataError(f"{tok_dir / name} does not exist; model.family=lattice needs a tokenization run "
                            "with tokenizer.chinese_chars=true and tokenizer.lexicon set")
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab()
    if model_cfg.vocab_size is not None and len(vocab) > model_cfg.vocab_size:
        raise ConfigError(f"{tok_dir / 'tokenizer.json'} has {len(vocab)} tokens but model.vocab_size="
                          f"{model_cfg.vocab_size}; word ids would collide with characters")
    return load_run_lexicon(tok_dir / "lexicon.txt", vocab, model_cfg.vocab_size or len(vocab),
                            model_cfg.lattice.max_word_len, model_cfg.lattice.num_words)


def lattice_lengths(shards, examples, lexicon: Lexicon, max_seq_len: int) -> np.ndarray:
    """Tokens of each example's lattice sequence (characters, [CLS]/[SEP] and the words kept), as
    `msp_batch` builds it; the loader's micro-batch budget counts these, not characters alone.

    One `build_lattice` per example (about 0.1 ms for 128 characters here), once per loader.
    """
    from kompakt.packed import read_example

    out = np.empty(len(examples), dtype=np.int64)
    for i in range(len(examples)):
        ex = read_example(shards, examples, i, 0)
        out[i] = len(build_lattice([np.asarray(ex.tokens, dtype=np.int64)], lexicon, cls_id=0, sep_id=0,
                                   max_len=2 * max_seq_len, cuts=[ex.sent_starts]))
    return out

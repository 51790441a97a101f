"""Lattice inputs and masked segment prediction (MSP) for Lattice-BERT.

A Chinese sentence enters Lattice-BERT as a lattice: every character plus every lexicon word that
matches a run of its characters. Each token carries a span `(start, end)` of character positions
*in the sequence*, both inclusive: a character at position i has (i, i), a word over positions
i..j has (i, j), and [CLS]/[SEP] carry their own position. Word tokens are appended after the
characters and the final [SEP]:

    [CLS] c1 .. cn [SEP] (d1 .. dm [SEP]) w1 .. wk          spans of w* point back into c*/d*

Word ids: the tokenizer's vocabulary is character-level (tokenization/lexicon.py) and its
`lexicon.txt` lists the words, most frequent first. Word k of the lexicon gets id `V + k`, where V is
the tokenizer's vocab_size: one embedding table of V + num_words rows (model.lattice.num_words,
rounded up to a multiple of 64) holds characters and words, and the MLM output layer predicts both.
A `Lexicon` maps each word, as a tuple of character ids, to its id, so words are matched directly on
the token ids of the shards.

MSP (Lai et al., 2021, section 3.2): the characters of a sequence are cut into *segments*, the
smallest runs such that no lattice token crosses a segment boundary (overlapping word spans are
merged). Whole segments are chosen at random until about `mask_prob` of the characters are covered,
and every lattice token inside a chosen segment (characters and words) is masked and predicted.
Because no token crosses a segment boundary, no unmasked word reveals a masked character.

Everything here is numpy and pure: masking is a function of its inputs and a `numpy.random.Generator`.
`collate_lattice` turns examples into the packed batch dict of the batch contract (torch tensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from kompakt.errors import ConfigError, DataError
from kompakt.model_config import ModelConfig
from kompakt.objective_config import ObjectiveConfig
from kompakt.pretrain.masking import Example, SpecialIds, example_rng
# The lexicon and the lattice of a sentence live in the core (fine-tuning and fill-mask build them too).
from kompakt.lattice_inputs import (  # noqa: F401 - re-exported: kompakt.pretrain.lattice.Lexicon etc.
    MIN_WORD_LEN, LatticeExample, Lexicon, build_lattice, jieba_dict_path, read_lexicon)

class LatticeTokens:
    """`id_to_token` over characters and words, for `masking.describe_sample`: id `vocab_size + k`
    reads as word k of the lexicon, any other id as the tokenizer's token."""

    def __init__(self, tokenizer, words: Sequence[str], vocab_size: int):
        self.tokenizer, self.words, self.vocab_size = tokenizer, list(words), vocab_size

    def id_to_token(self, i: int) -> str | None:
        k = int(i) - self.vocab_size
        return self.words[k] if 0 <= k < len(self.words) else self.tokenizer.id_to_token(int(i))


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


# The lexicon `collate_msp` matches with when its caller passes none (see `use_lexicon`).
_LEXICON: list[Lexicon] = []


def use_lexicon(lexicon: Lexicon) -> None:
    """Set the lexicon `collate_msp` uses by default; the pretraining loop calls it once at start-up
    (the shared collator interface, `collate_examples(examples, cfg, specials, seed)`, carries none)."""
    _LEXICON[:] = [lexicon]


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


def install_run_lexicon(tokenizer_dir: str | Path, model_cfg: ModelConfig) -> Lexicon:
    """`load_tokenizer_lexicon`, also made `collate_msp`'s default for direct calls without a lexicon.

    Training never relies on the default: its collator (pretrain/data.py MLMCollator) passes the
    lexicon explicitly in every process that builds batches.
    """
    lexicon = load_tokenizer_lexicon(tokenizer_dir, model_cfg)
    use_lexicon(lexicon)
    return lexicon


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
    `collate_msp` builds it; the loader's micro-batch budget counts these, not characters alone.

    One `build_lattice` per example (about 0.1 ms for 128 characters here), once per loader.
    """
    from kompakt.packed import read_example

    out = np.empty(len(examples), dtype=np.int64)
    for i in range(len(examples)):
        ex = read_example(shards, examples, i, 0)
        out[i] = len(build_lattice([np.asarray(ex.tokens, dtype=np.int64)], lexicon, cls_id=0, sep_id=0,
                                   max_len=2 * max_seq_len, cuts=[ex.sent_starts]))
    return out


def collate_msp(examples: Sequence[Example], cfg: ObjectiveConfig, specials: SpecialIds, seed: int,
                lexicon: Lexicon | None = None) -> dict:
    """Lattice-BERT's collator for `pretrain.objective.masking=msp` (called by pretrain/collate.py).

    Each `Example` (character ids of one document run, `sent_starts` inside it) becomes
    `[CLS] characters [SEP] words` with words matched inside sentences, is MSP-masked with the
    generator of (seed, example.index) and packed with `collate_lattice`. Words may make a sequence
    up to 2 x objective.max_seq_len tokens long: the loader's token budget counts characters only.
    """
    if cfg.sop:
        raise ConfigError("pretrain.objective.sop=true does not apply to masking=msp (Lattice-BERT); "
                          "set pretrain.objective.sop=false")
    if lexicon is None:
        if not _LEXICON:
            raise ConfigError("masking=msp needs the tokenizer's word lexicon; call "
                              "kompakt.pretrain.lattice.install_run_lexicon(tokenizer_dir, model_cfg) first")
        lexicon = _LEXICON[0]
    special_ids = {specials.cls, specials.sep, specials.mask, specials.pad}
    lattices, masks = [], []
    for ex in examples:
        lat = build_lattice([np.asarray(ex.tokens, dtype=np.int64)], lexicon, cls_id=specials.cls,
                            sep_id=specials.sep, max_len=2 * cfg.max_seq_len, cuts=[ex.sent_starts])
        masks.append(msp_mask(lat, example_rng(seed, ex.index), mask_id=specials.mask,
                              special_ids=special_ids,
                              replacement_ids=specials.replacement_ids, mask_prob=cfg.mask_rate,
                              mask_token_prob=cfg.mask_token_prob, random_token_prob=cfg.random_token_prob))
        lattices.append(lat)
    return collate_lattice(lattices, masks)

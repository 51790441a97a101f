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

The code lives in the core, kompakt/lattice_inputs.py (`msp_mask`, `collate_lattice`, `msp_batch`), since
distillation of a Lattice-BERT (compress) trains on the same batches; this module re-exports it and keeps
pretraining's collator interface (`collate_msp`) and the sample log's `LatticeTokens`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kompakt.errors import ConfigError
from kompakt.model_config import ModelConfig
from kompakt.objective_config import ObjectiveConfig
from kompakt.pretrain.masking import Example, SpecialIds
# The lexicon, the lattice of a sentence and MSP live in the core: fine-tuning and fill-mask build
# lattices too, and distillation (compress) trains on the same MSP batches. Re-exported here.
from kompakt.lattice_inputs import (  # noqa: F401 - re-exported: kompakt.pretrain.lattice.Lexicon etc.
    MIN_WORD_LEN, LatticeExample, Lexicon, build_lattice, collate_lattice, jieba_dict_path, lattice_lengths,
    lattice_segments, load_run_lexicon, load_tokenizer_lexicon, msp_batch, msp_mask, read_lexicon)


class LatticeTokens:
    """`id_to_token` over characters and words, for `masking.describe_sample`: id `vocab_size + k`
    reads as word k of the lexicon, any other id as the tokenizer's token."""

    def __init__(self, tokenizer, words: Sequence[str], vocab_size: int):
        self.tokenizer, self.words, self.vocab_size = tokenizer, list(words), vocab_size

    def id_to_token(self, i: int) -> str | None:
        k = int(i) - self.vocab_size
        return self.words[k] if 0 <= k < len(self.words) else self.tokenizer.id_to_token(int(i))


# The lexicon `collate_msp` matches with when its caller passes none (see `use_lexicon`).
_LEXICON: list[Lexicon] = []


def use_lexicon(lexicon: Lexicon) -> None:
    """Set the lexicon `collate_msp` uses by default; the pretraining loop calls it once at start-up
    (the shared collator interface, `collate_examples(examples, cfg, specials, seed)`, carries none)."""
    _LEXICON[:] = [lexicon]


def install_run_lexicon(tokenizer_dir: str | Path, model_cfg: ModelConfig) -> Lexicon:
    """`load_tokenizer_lexicon`, also made `collate_msp`'s default for direct calls without a lexicon.

    Training never relies on the default: its collator (pretrain/data.py MLMCollator) passes the
    lexicon explicitly in every process that builds batches.
    """
    lexicon = load_tokenizer_lexicon(tokenizer_dir, model_cfg)
    use_lexicon(lexicon)
    return lexicon


def collate_msp(examples: Sequence[Example], cfg: ObjectiveConfig, specials: SpecialIds, seed: int,
                lexicon: Lexicon | None = None) -> dict:
    """Lattice-BERT's collator for `pretrain.objective.masking=msp` (called by pretrain/collate.py).

    Each `Example` (character ids of one document run, `sent_starts` inside it) becomes
    `[CLS] characters [SEP] words` with words matched inside sentences, is MSP-masked with the
    generator of (seed, example.index) and packed with `collate_lattice` (`msp_batch`). Words may make a
    sequence up to 2 x objective.max_seq_len tokens long; the loader budgets them (`lattice_lengths`).
    """
    if cfg.sop:
        raise ConfigError("pretrain.objective.sop=true does not apply to masking=msp (Lattice-BERT); "
                          "set pretrain.objective.sop=false")
    if lexicon is None:
        if not _LEXICON:
            raise ConfigError("masking=msp needs the tokenizer's word lexicon; call "
                              "kompakt.pretrain.lattice.install_run_lexicon(tokenizer_dir, model_cfg) first")
        lexicon = _LEXICON[0]
    return msp_batch(examples, lexicon, specials, seed, max_seq_len=cfg.max_seq_len, mask_rate=cfg.mask_rate,
                     mask_token_prob=cfg.mask_token_prob, random_token_prob=cfg.random_token_prob)

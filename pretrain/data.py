"""Pretraining's side of the shared packed loader (kompakt/packed.py): the MLM collator.

The loader (examples, order, micro-batch cut, rank split, state, workers) is core; what is
pretraining's own is how an example is laid out (`[CLS] x [SEP]`, or SOP's two segments) and
masked: `MLMCollator` masks every example with the generator of (data.seed, sample index), so any
batch of any rank can be rebuilt exactly, and packs them into the batch contract
(pretrain/collate.py). Lattice-BERT's collator carries its lexicon's path and loads it in the
process that builds the batch, so fork- and spawn-started workers match words identically.
"""

from __future__ import annotations

from pathlib import Path

from kompakt.errors import ConfigError, DataError
from kompakt.model_config import ModelConfig
from kompakt.objective_config import DataLoaderConfig, ObjectiveConfig
from kompakt.packed import (  # noqa: F401  (re-exported: the pretraining code's names for them)
    Example,
    ExampleIndex,
    ExampleLayout,
    StepsInfo,
    build_batch,
    build_examples,
    cut_micro_batches,
    epoch_order,
    expected_epochs,
    read_example,
)
from kompakt.packed import PackedLoader as _CorePackedLoader
from kompakt.packed import steps_info as _core_steps_info
from kompakt.pretrain.collate import collate_examples
from kompakt.shards import TokenShards
from kompakt.tokenizer import SpecialIds


def layout(objective: ObjectiveConfig) -> ExampleLayout:
    """The example layout of an objective: its sequence length, specials, and SOP's two-token minimum."""
    return ExampleLayout(objective.max_seq_len, objective.num_specials, 2 if objective.sop else 1)


class MLMCollator:
    """Mask and pack examples for the pretraining objective; picklable for loader workers.

    For `masking=msp` pass `lexicon_from=(tokenizer_dir, model_cfg)`: the lexicon is read from the
    tokenizer folder on first use in whichever process collates, and never pickled.
    """

    def __init__(self, objective: ObjectiveConfig, specials: SpecialIds, seed: int,
                 lexicon_from: tuple[Path, ModelConfig] | None = None):
        if objective.masking == "msp" and lexicon_from is None:
            raise DataError("masking=msp needs the tokenizer's word lexicon: pass lexicon_from=(tokenizer_dir, model)")
        self.objective, self.specials, self.seed = objective, specials, seed
        self.lexicon_from = (str(lexicon_from[0]), lexicon_from[1]) if lexicon_from else None
        self._lexicon = None

    def lexicon(self):
        """The Lattice-BERT lexicon of this run, loaded once per process."""
        if self._lexicon is None and self.lexicon_from is not None:
            from kompakt.pretrain.lattice import load_tokenizer_lexicon

            self._lexicon = load_tokenizer_lexicon(*self.lexicon_from)
        return self._lexicon

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lexicon": None}

    def __call__(self, examples: list[Example]) -> dict:
        extra = {"lexicon": self.lexicon()} if self.lexicon_from is not None else {}
        return collate_examples(examples, self.objective, self.specials, self.seed, **extra)


def PackedLoader(shards: TokenShards, objective: ObjectiveConfig, data: DataLoaderConfig, specials: SpecialIds,
                 rank: int = 0, world_size: int = 1, examples: ExampleIndex | None = None, *,
                 prefetch: int = 2, num_workers: int = 0, collator: MLMCollator | None = None) -> _CorePackedLoader:
    """The core packed loader with pretraining's layout and MLM collator (masked with `data.seed`).

    A Lattice-BERT collator adds each example's lexicon words to its sequence; their count is
    measured once here so a micro-batch holds at most `tokens_per_micro_batch` tokens, words included.
    """
    if shards.vocab_size > specials.vocab_size:
        raise DataError(f"{shards.folder}: shards use {shards.vocab_size} ids but the tokenizer has "
                        f"{specials.vocab_size}; re-tokenize with this tokenizer")
    if objective.max_seq_len > data.tokens_per_micro_batch:
        raise ConfigError(f"pretrain.data.tokens_per_micro_batch={data.tokens_per_micro_batch} is below "
                        f"pretrain.objective.max_seq_len={objective.max_seq_len}; raise it so one sequence fits")
    collator = collator or MLMCollator(objective, specials, data.seed)
    lay = layout(objective)
    if examples is None:
        examples = build_examples(shards, lay.max_tokens, lay.min_tokens)
    seq_lengths = None
    if collator.lexicon_from is not None:
        from kompakt.pretrain.lattice import lattice_lengths

        seq_lengths = lattice_lengths(shards, examples, collator.lexicon(), objective.max_seq_len)
    return _CorePackedLoader(shards, lay, data, collator, rank, world_size, examples,
                             prefetch=prefetch, num_workers=num_workers, seq_lengths=seq_lengths)


def steps_info(shards: TokenShards, objective: ObjectiveConfig, data: DataLoaderConfig, world_size: int,
               examples: ExampleIndex | None = None) -> StepsInfo:
    """`kompakt.packed.steps_info` for a pretraining objective's layout."""
    return _core_steps_info(shards, layout(objective), data, world_size, examples)

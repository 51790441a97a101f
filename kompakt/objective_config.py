"""Recipe sections of the pretraining objectives and the packed data loader.

`ObjectiveConfig` says how an example is laid out and masked (pretrain/masking.py);
`DataLoaderConfig` says how examples are ordered, split across ranks and packed into micro-batches
(kompakt/packed.py); how many workers build them is run control (`pretrain.run`). Both are nested into `PretrainConfig` (kompakt/pretrain_config.py) as
`pretrain.objective` and `pretrain.data`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kompakt.config_base import StrictModel


class ObjectiveConfig(StrictModel):
    """Example layout (`max_seq_len`, SOP) and the masking scheme of the MLM-style objective.

    masking:
      token       BERT: single sub-word tokens
      whole_word  all sub-words of a chosen word (word starts come from the shards)
      ngram       ALBERT: n consecutive whole words, n <= max_ngram, p(n) proportional to 1/n
      span        SpanBERT: spans of whole words, lengths ~ Geometric(span_p) truncated to
                  [1, max_span_words]; also emits the span boundary objective's targets
      msp         Lattice-BERT masked segment prediction, implemented in pretrain/lattice.py
    """

    masking: Literal["token", "whole_word", "ngram", "span", "msp"] = "whole_word"
    # Share of an example's real tokens (specials excluded) that are predicted; BERT 0.15, 0.3
    # for large models (Wettig et al. 2023, "Should You Mask 15% in MLM?").
    mask_rate: float = Field(0.15, gt=0.0, lt=1.0)
    # The 80/10/10 rule: of the predicted tokens, this share becomes [MASK], the next share a
    # random token, and the rest keeps the original token.
    mask_token_prob: float = Field(0.8, ge=0.0, le=1.0)
    random_token_prob: float = Field(0.1, ge=0.0, le=1.0)
    max_ngram: int = Field(3, ge=1, le=10, description="ALBERT n-gram masking: longest n-gram in words")
    span_p: float = Field(0.2, gt=0.0, le=1.0, description="SpanBERT geometric parameter")
    max_span_words: int = Field(10, ge=1, description="SpanBERT: longest span in words")
    # ALBERT sentence-order prediction: [CLS] A [SEP] B [SEP], B before A half of the time.
    sop: bool = False
    sop_swap_prob: float = Field(0.5, ge=0.0, le=1.0)
    # Tokens per example including [CLS]/[SEP] (128 for phase 1, 512 for phase 2 in BERT).
    max_seq_len: int = Field(128, ge=8, le=65_536)

    @model_validator(mode="after")
    def _check(self) -> ObjectiveConfig:
        if self.mask_token_prob + self.random_token_prob > 1.0 + 1e-9:
            raise ValueError(f"pretrain.objective: mask_token_prob + random_token_prob = "
                             f"{self.mask_token_prob + self.random_token_prob:g} exceeds 1; lower one of them")
        return self

    @property
    def num_specials(self) -> int:
        """Special tokens per example: [CLS] x [SEP] or [CLS] A [SEP] B [SEP]."""
        return 3 if self.sop else 2


class DataLoaderConfig(StrictModel):
    """Order, rank split and micro-batch packing of the pretraining examples."""

    # Upper bound of tokens (specials included, no padding exists) in one micro-batch on one rank.
    tokens_per_micro_batch: int = Field(16_384, ge=8)
    # Target tokens per optimizer step over all ranks; gradient accumulation makes up the rest.
    global_batch_tokens: int = Field(262_144, ge=8)
    # Seeds the per-epoch order and every example's masking (with its sample index).
    seed: int = Field(0, ge=0)

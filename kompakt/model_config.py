"""The `model` section of a recipe: family and sizes of the encoder kompakt pretrains.

The field names follow the Hugging Face configs they are exported to (`BertConfig`, `AlbertConfig`),
with `num_*` for counts; `kompakt.hf.to_hf_config` maps them one to one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from kompakt.config_base import StrictModel
from kompakt.errors import ConfigError

from kompakt import families


class LatticeConfig(StrictModel):
    """Lattice-BERT extras (family "lattice"; see kompakt/models/lattice.py and pretrain/lattice.py).

    Word tokens share the embedding table and MLM output layer with the characters: word k of the
    tokenizer's lexicon.txt has id vocab_size + k, and the table has vocab_size + num_words rows
    (num_words rounded up to a multiple of 64).
    """

    # Words of the lexicon the model can embed: the tokenizer run's `num_lexicon_words`.
    num_words: int = Field(0, ge=0)
    # Longest lexicon word matched, in characters (jieba's dictionary: 98% of words have <= 4).
    max_word_len: int = Field(8, ge=2)
    # Relative distances between spans are clipped to [-R, R] before their per-head bias embedding.
    max_relative_distance: int = Field(32, ge=1)
    # How the relative bias tables start. "locality": an ALiBi-style prior (Press et al., 2022), head h of H
    # penalising distance d by 8^(-h/(H-1)) * |d| (slopes 1 down to 1/8), so attention starts local and
    # training may widen it; "normal": N(0, initializer_range) like every other embedding. On demo-zh (4x128,
    # 1,200 steps of 1,024 tokens) "locality" reached held-out MSP loss 6.31 where "normal" reached 6.49, and
    # fill-mask top-1 7.3% where "normal" tied the unigram's 6.0%.
    bias_init: Literal["locality", "normal"] = "locality"


class ModernBertOptions(StrictModel):
    """ModernBERT extras (family "modernbert"; kompakt/models/modernbert.py), named as in `ModernBertConfig`."""

    # The local layers' whole window: a token sees local_attention // 2 positions on each side.
    local_attention: int = Field(128, ge=2)
    # Layer i attends globally when i % global_attn_every_n_layers == 0 (ModernBERT: every third, starting with the first).
    global_attn_every_n_layers: int = Field(3, ge=1)
    # An explicit type per layer instead of the every-n pattern, as `ModernBertConfig.layer_types`: what a
    # model keeps when layers are dropped (compress layer_drop, BERT-of-Theseus) or a stock folder states.
    layer_types: list[Literal["full_attention", "sliding_attention"]] | None = None
    global_rope_theta: float = Field(160_000.0, gt=0.0)
    local_rope_theta: float = Field(10_000.0, gt=0.0)


class ModelConfig(StrictModel):
    """Model family and sizes; `vocab_size` must match the tokenizer's (see `check_vocab`)."""

    # A registered family (kompakt/families.py): bert, albert, spanbert, lattice, or one a user added.
    family: str = "bert"
    # None: taken from the tokenizer at pretraining start. Multiples of 64 tile the embedding and head matmuls.
    vocab_size: int | None = Field(None, ge=64)
    hidden_size: int = Field(768, ge=8)
    num_layers: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    # The feed-forward width F; ModernBERT's GeGLU width (its Wi gives 2F).
    intermediate_size: int = Field(3072, ge=8)
    # ALBERT's factorised embedding width E (E < hidden_size); ignored by the other families.
    embedding_size: int = Field(128, ge=1)
    # ALBERT's cross-layer sharing, as in HF AlbertConfig: layer i runs group int(i / (num_layers / groups)),
    # and each group is `inner_group_num` distinct layers.
    num_hidden_groups: int = Field(1, ge=1)
    inner_group_num: int = Field(1, ge=1)
    max_position_embeddings: int = Field(512, ge=8)
    type_vocab_size: int = Field(2, ge=1)
    layer_norm_eps: float = Field(1e-12, gt=0.0)
    # None: the family's default (kompakt/families.py); "gelu" is exact erf GELU, "gelu_new" the tanh one.
    hidden_act: Literal["gelu", "gelu_new"] | None = None
    # No dropout in pretraining by default (cramming, ModernBERT); fine-tuning sets its own.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    initializer_range: float = Field(0.02, gt=0.0)
    # SpanBERT span boundary objective: relative positions inside a span are clipped to this many.
    max_span_length: int = Field(10, ge=1)
    # auto: flash varlen (half precision) or FlexAttention on CUDA, "rows" SDPA on CPU (see models/packing.py).
    attention: Literal["auto", "rows", "padded", "mask", "flex", "varlen"] = "auto"
    lattice: LatticeConfig = LatticeConfig()
    modernbert: ModernBertOptions = ModernBertOptions()

    @property
    def act(self) -> str:
        """The activation in use: `hidden_act`, or the family's default."""
        return self.hidden_act or families.get(self.family).default_act

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> ModelConfig:
        if problem := families.unknown(self.family):
            raise ValueError(problem)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by "
                             f"model.num_heads={self.num_heads}")
        # Released checkpoints loaded through kompakt.hf (e.g. 30522 tokens) are exempt: their vocab is given.
        any_vocab = bool(info.context and info.context.get("any_vocab_size"))
        if self.vocab_size is not None and self.vocab_size % 64 and not any_vocab:
            raise ValueError(f"model.vocab_size={self.vocab_size} must be a multiple of 64 "
                             f"(e.g. {(self.vocab_size + 63) // 64 * 64}); round the tokenizer's vocab_size up")
        types = self.modernbert.layer_types
        if self.family == "modernbert" and types is not None and len(types) != self.num_layers:
            raise ValueError(f"model.modernbert.layer_types has {len(types)} entries for model.num_layers="
                             f"{self.num_layers}; give one per layer or leave it unset")
        if self.family == "albert":
            if self.num_layers % self.num_hidden_groups:
                raise ValueError(f"model.num_layers={self.num_layers} must be divisible by "
                                 f"model.num_hidden_groups={self.num_hidden_groups}")
            if self.embedding_size > self.hidden_size:
                raise ValueError(f"model.embedding_size={self.embedding_size} must not exceed "
                                 f"model.hidden_size={self.hidden_size} (ALBERT factorises the embeddings)")
        return self


def check_vocab(cfg: ModelConfig, tokenizer_vocab_size: int, tokenizer_path: str) -> ModelConfig:
    """Return `cfg` with `vocab_size` filled from the tokenizer, or raise if the two disagree."""
    if cfg.vocab_size is None:
        if tokenizer_vocab_size % 64:
            raise ConfigError(f"the tokenizer {tokenizer_path} has {tokenizer_vocab_size} tokens, not a multiple "
                              f"of 64; retrain it with a vocab_size rounded up to a multiple of 64")
        return cfg.model_copy(update={"vocab_size": tokenizer_vocab_size})
    if cfg.vocab_size != tokenizer_vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} but the tokenizer {tokenizer_path} has "
                          f"{tokenizer_vocab_size} tokens; set model.vocab_size={tokenizer_vocab_size} or leave it out")
    return cfg

"""Lattice-BERT as Hugging Face classes: `LatticeBertConfig`, `LatticeBertModel`, `LatticeBertForMaskedLM`,
`LatticeBertForSequenceClassification` and `LatticeBertForTokenClassification`.

`kompakt.register_hf()` (or `register()` here) registers them with `AutoConfig`, `AutoModel`,
`AutoModelForMaskedLM`, `AutoModelForSequenceClassification` and `AutoModelForTokenClassification` under
`model_type = "lattice-bert"`, so an exported folder loads with `AutoModel.from_pretrained(folder)`
and no remote code. The classes wrap the packed encoder of kompakt/models/lattice.py: a padded
batch is packed (padding removed), run, and scattered back, so the hidden states equal the packed
model's exactly.

Inputs (a padded HF-style batch, B rows of L tokens):

- `input_ids` (B, L): `[CLS] characters [SEP] (characters [SEP]) words`, then padding. Characters
  use the tokenizer's ids; word k of the tokenizer's `lexicon.txt` has id `config.vocab_size + k`.
  `kompakt.lattice_inputs.build_lattice` builds a row from character ids and a `Lexicon`.
- `attention_mask` (B, L): 1 on real tokens, 0 on padding (the real tokens of a row must be contiguous).
- `lattice_start`, `lattice_end` (B, L): the span of each token in character positions of its row
  (a character or [CLS]/[SEP] at position i has (i, i), a word over positions i..j has (i, j)).
  Without them every token is taken as a character at its own position (a plain BERT over characters).
- `token_type_ids` (B, L): 0 for the first segment and its words, 1 for the second (default zeros).

Outputs: `last_hidden_state` (B, L, D), zero on padding; `LatticeBertForMaskedLM` adds `logits`
(B, L, vocab_size + words) and, with `labels` (-100 = ignore), the cross-entropy `loss`. The task heads
follow stock BERT's: sequence classification pools [CLS] (dense + tanh), token classification gives
`logits` (B, L, num_labels) on every token, words included (fine-tuning labels words -100).

From a tokenizer's rows to these inputs: `folder_lexicon` reads a folder's lexicon, `lattice_of_row` appends
the words of one encoded row `[CLS] A [SEP] (B [SEP])` and `lattice_batch` pads rows into a batch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, PretrainedConfig, PreTrainedModel)
from transformers.modeling_outputs import (BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput,
                                           TokenClassifierOutput)

from kompakt.errors import DataError
from kompakt.lattice_inputs import LatticeExample, Lexicon, build_lattice, read_lexicon
from kompakt.model_config import LatticeConfig, ModelConfig
from kompakt.models import lattice
from kompakt.models.bert import BertOnlyMLMHead

MODEL_TYPE = "lattice-bert"

# Tokenizer-side files copied into an exported folder when present; lexicon.txt gives word ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "lexicon.txt")


class LatticeBertConfig(PretrainedConfig):
    """Sizes of a Lattice-BERT; `vocab_size` is the character vocabulary, `num_words` the lexicon's words.

    The embedding table has vocab_size + num_words rounded up to a multiple of 64 rows.
    """

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 21_120, num_words: int = 0, hidden_size: int = 768,
                 num_hidden_layers: int = 12, num_attention_heads: int = 12, intermediate_size: int = 3072,
                 hidden_act: str = "gelu", hidden_dropout_prob: float = 0.0,
                 max_position_embeddings: int = 512,
                 type_vocab_size: int = 2, initializer_range: float = 0.02, layer_norm_eps: float = 1e-12,
                 max_relative_distance: int = 32, max_word_len: int = 8, pad_token_id: int = 0, **kwargs):
        self.vocab_size = vocab_size
        self.num_words = num_words
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.max_relative_distance = max_relative_distance
        self.max_word_len = max_word_len
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(pad_token_id=pad_token_id, **kwargs)


def to_model_config(config: LatticeBertConfig) -> ModelConfig:
    """Our `ModelConfig` (family "lattice") from the HF config."""
    return ModelConfig(family="lattice", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                       intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
                       dropout=config.hidden_dropout_prob,
                       max_position_embeddings=config.max_position_embeddings,
                       type_vocab_size=config.type_vocab_size, initializer_range=config.initializer_range,
                       layer_norm_eps=config.layer_norm_eps, attention="padded",
                       lattice=LatticeConfig(num_words=config.num_words, max_word_len=config.max_word_len,
                                             max_relative_distance=config.max_relative_distance))


def from_model_config(cfg: ModelConfig) -> LatticeBertConfig:
    """The HF config of a family "lattice" `ModelConfig`."""
    return LatticeBertConfig(vocab_size=cfg.vocab_size, num_words=cfg.lattice.num_words,
                             hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                             num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                             hidden_act=cfg.act, hidden_dropout_prob=cfg.dropout,
                             max_position_embeddings=cfg.max_position_embeddings,
                             type_vocab_size=cfg.type_vocab_size, initializer_range=cfg.initializer_range,
                             layer_norm_eps=cfg.layer_norm_eps,
                             max_relative_distance=cfg.lattice.max_relative_distance,
                             max_word_len=cfg.lattice.max_word_len)


class LatticeBertPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading glue shared by the Lattice-BERT HF classes."""

    config: LatticeBertConfig
    config_class = LatticeBertConfig
    base_model_prefix = "lattice_bert"
    # Attention is always torch's SDPA (kompakt/models/packing.py), so `attn_implementation="sdpa"` is honest
    # and the stock loaders that pass it (finetune, infer) work; there is no other implementation to pick.
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


def pack_padded(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat indices (T,) of the real tokens of a (B, L) mask, their cu_seqlens (B+1,) and longest row."""
    keep_BL = attention_mask.bool()
    lengths_B = keep_BL.sum(dim=1)
    cu_seqlens = torch.zeros(len(lengths_B) + 1, dtype=torch.int32, device=attention_mask.device)
    cu_seqlens[1:] = torch.cumsum(lengths_B, 0)
    return keep_BL.flatten().nonzero().squeeze(1), cu_seqlens, int(lengths_B.max())


class LatticeBertModel(LatticeBertPreTrainedModel):
    """The Lattice-BERT encoder on a padded batch (inputs: see the module docstring)."""

    def __init__(self, config: LatticeBertConfig):
        super().__init__(config)
        self.lattice = lattice.LatticeBertModel(to_model_config(config))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lattice.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.lattice.embeddings.word_embeddings = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                lattice_start: torch.Tensor | None = None, lattice_end: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, return_dict: bool | None = None, **kwargs
                ) -> BaseModelOutput | tuple:
        """`last_hidden_state` (B, L, D): the packed encoder's output scattered back, zero on padding."""
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if lattice_start is None:
            # Characters only: each token's span is its own position among the row's real tokens.
            lattice_start = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        if lattice_end is None:
            lattice_end = lattice_start
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        index_T, cu_seqlens, max_seqlen = pack_padded(attention_mask)
        flat = lambda x_BL: x_BL.reshape(B * L).index_select(0, index_T)  # noqa: E731
        x_TD = self.lattice(flat(input_ids), cu_seqlens, flat(lattice_start), flat(lattice_end), max_seqlen,
                            flat(token_type_ids))
        hidden_BLD = x_TD.new_zeros(B * L, x_TD.shape[-1]).index_copy(0, index_T, x_TD).view(B, L, -1)
        if return_dict is False:
            return (hidden_BLD,)
        return BaseModelOutput(last_hidden_state=hidden_BLD)


class LatticeBertForMaskedLM(LatticeBertPreTrainedModel):
    """Lattice-BERT with its MLM head over characters and words (tied to the input embeddings)."""

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "lattice_bert.lattice.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: LatticeBertConfig):
        super().__init__(config)
        self.lattice_bert = LatticeBertModel(config)
        mcfg = to_model_config(config)
        head_cfg = mcfg.model_copy(update={"vocab_size": lattice.num_embedding_rows(mcfg)})
        self.cls = BertOnlyMLMHead(head_cfg, self.lattice_bert.get_input_embeddings())
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                lattice_start: torch.Tensor | None = None, lattice_end: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> MaskedLMOutput | tuple:
        """`logits` (B, L, rows) on every position; `loss` over `labels` != -100 when given."""
        hidden_BLD = self.lattice_bert(input_ids, attention_mask, lattice_start, lattice_end,
                                       token_type_ids).last_hidden_state
        logits_BLV = self.cls.predictions(hidden_BLD)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits_BLV.flatten(0, 1).float(), labels.flatten(),
                                               ignore_index=-100)
        if return_dict is False:
            return (logits_BLV,) if loss is None else (loss, logits_BLV)
        return MaskedLMOutput(loss=loss, logits=logits_BLV, hidden_states=(hidden_BLD,))


class LatticeBertForSequenceClassification(LatticeBertPreTrainedModel):
    """Lattice-BERT with stock BERT's sequence head: [CLS] -> dense + tanh (the pooler) -> dropout -> linear.

    The pooler is new (the MLM export has none, as stock BertForMaskedLM has none), so it and the classifier
    are the only weights initialised when loading a pretrained folder. `loss` follows `config.problem_type`
    as BertForSequenceClassification's does (MSE for regression, cross-entropy, BCE for multi-label).
    """

    def __init__(self, config: LatticeBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.lattice_bert = LatticeBertModel(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                lattice_start: torch.Tensor | None = None, lattice_end: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> SequenceClassifierOutput | tuple:
        """`logits` (B, num_labels) from the [CLS] row (position 0); `loss` when `labels` (B,) are given."""
        hidden_BLD = self.lattice_bert(input_ids, attention_mask, lattice_start, lattice_end,
                                       token_type_ids).last_hidden_state
        pooled_BD = torch.tanh(self.pooler(hidden_BLD[:, 0]))
        logits_BC = self.classifier(self.dropout(pooled_BD))
        loss = None if labels is None else _sequence_loss(self.config, logits_BC, labels)
        return _head_output(SequenceClassifierOutput, loss, logits_BC, hidden_BLD, return_dict)


class LatticeBertForTokenClassification(LatticeBertPreTrainedModel):
    """Lattice-BERT with stock BERT's token head: dropout -> linear on every token (characters and words)."""

    def __init__(self, config: LatticeBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.lattice_bert = LatticeBertModel(config)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                lattice_start: torch.Tensor | None = None, lattice_end: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> TokenClassifierOutput | tuple:
        """`logits` (B, L, num_labels); `loss`: cross-entropy over `labels` (B, L) != -100 when given."""
        hidden_BLD = self.lattice_bert(input_ids, attention_mask, lattice_start, lattice_end,
                                       token_type_ids).last_hidden_state
        logits_BLC = self.classifier(self.dropout(hidden_BLD))
        loss = None if labels is None else nn.functional.cross_entropy(
            logits_BLC.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return _head_output(TokenClassifierOutput, loss, logits_BLC, hidden_BLD, return_dict)


def _head_output(output_cls, loss, logits: torch.Tensor, hidden_BLD: torch.Tensor, return_dict: bool | None):
    """A task head's output as stock heads give it: a tuple (loss first when there is one) with
    return_dict=False, else `output_cls` with the final hidden states."""
    if return_dict is False:
        return (logits,) if loss is None else (loss, logits)
    return output_cls(loss=loss, logits=logits, hidden_states=(hidden_BLD,))


def _classifier_dropout(config: LatticeBertConfig) -> float:
    """`classifier_dropout` when the config sets it, else `hidden_dropout_prob` (stock BERT's rule)."""
    p = getattr(config, "classifier_dropout", None)
    return config.hidden_dropout_prob if p is None else p


def _sequence_loss(config: LatticeBertConfig, logits_BC: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BertForSequenceClassification's loss: the problem type from the config, else from labels' dtype."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return nn.functional.mse_loss(logits_BC.float().squeeze(-1) if config.num_labels == 1 else logits_BC.float(),
                                      labels.float().view(-1) if config.num_labels == 1 else labels.float())
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits_BC.float().view(-1, config.num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits_BC.float(), labels.float())


def register() -> None:
    """Make `AutoConfig`, `AutoModel` and the MLM, sequence and token classification Auto classes know
    "lattice-bert" (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, LatticeBertConfig)
    except ValueError:
        return  # already registered by an earlier import
    AutoModel.register(LatticeBertConfig, LatticeBertModel)
    AutoModelForMaskedLM.register(LatticeBertConfig, LatticeBertForMaskedLM)
    AutoModelForSequenceClassification.register(LatticeBertConfig, LatticeBertForSequenceClassification)
    AutoModelForTokenClassification.register(LatticeBertConfig, LatticeBertForTokenClassification)


def is_lattice_folder(folder: str | Path) -> bool:
    """Whether a model folder's config.json says model_type "lattice-bert" (False without a readable one)."""
    import json

    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def folder_lexicon(folder: str | Path, config: LatticeBertConfig) -> Lexicon:
    """The `Lexicon` of an exported Lattice-BERT folder: characters from its tokenizer.json, word k of its
    lexicon.txt with id config.vocab_size + k (as pretraining numbered them)."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    for name in ("tokenizer.json", "lexicon.txt"):
        if not (folder / name).is_file():
            raise DataError(f"{folder / name} does not exist; a Lattice-BERT folder needs its tokenizer and the "
                            "lexicon.txt it was pretrained with (kompakt's export copies both)")
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    return Lexicon.from_words(read_lexicon(folder / "lexicon.txt"), vocab, first_word_id=config.vocab_size,
                              max_word_len=config.max_word_len)


def lattice_of_row(input_ids, lexicon: Lexicon, *, cls_id: int, sep_id: int,
                   max_len: int | None = None) -> LatticeExample:
    """The lattice of one encoded row `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` (a tokenizer's output):
    the row unchanged, then the lexicon words of each segment, as pretraining builds them (`build_lattice`).

    With `max_len`, words beyond max_len tokens in all are dropped from the end (the row must fit already).
    """
    ids = [int(i) for i in input_ids]
    seps = [k for k, i in enumerate(ids) if i == sep_id]
    if not ids or ids[0] != cls_id or not seps or seps[-1] != len(ids) - 1 or len(seps) > 2:
        raise DataError(f"a Lattice-BERT row must be [CLS] A [SEP] (B [SEP]), this one has {len(seps)} [SEP] and "
                        f"starts with id {ids[0] if ids else None}; encode with the model folder's own tokenizer")
    bounds = [0, *seps]
    segments = [ids[a + 1:b] for a, b in zip(bounds[:-1], bounds[1:])]
    lat = build_lattice(segments, lexicon, cls_id=cls_id, sep_id=sep_id, max_len=max_len)
    assert lat.input_ids[:lat.num_chars].tolist() == ids, "build_lattice keeps the row's characters as they are"
    return lat


def mask_character(lat: LatticeExample, at: int, mask_id: int) -> LatticeExample:
    """`lat` with the character at row position `at` masked and the words that cover it left out (they would give
    it away); the characters keep their positions. Fill-mask and pseudo-perplexity read lattices this way."""
    keep = (np.arange(len(lat)) < lat.num_chars) | (lat.lattice_start > at) | (lat.lattice_end < at)
    x = lat.input_ids[keep].copy()
    x[at] = mask_id
    return LatticeExample(x, lat.lattice_start[keep], lat.lattice_end[keep], lat.token_type_ids[keep], lat.num_chars)


def lattice_batch(lattices: list[LatticeExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded (B, L) `input_ids`, `attention_mask`, `lattice_start`, `lattice_end`, `token_type_ids`."""
    width = max(len(lat) for lat in lattices)
    out = {k: torch.zeros(len(lattices), width, dtype=torch.long)
           for k in ("input_ids", "attention_mask", "lattice_start", "lattice_end", "token_type_ids")}
    out["input_ids"].fill_(pad_id)
    for r, lat in enumerate(lattices):
        n = len(lat)
        for key in ("input_ids", "lattice_start", "lattice_end", "token_type_ids"):
            out[key][r, :n] = torch.from_numpy(np.asarray(getattr(lat, key), dtype=np.int64))
        out["attention_mask"][r, :n] = 1
    return out


def to_hf_model(model: lattice.LatticeBertForPreTraining) -> LatticeBertForMaskedLM:
    """Our packed model's weights in a `LatticeBertForMaskedLM` (keys gain `lattice_bert.lattice.`)."""
    hf = LatticeBertForMaskedLM(from_model_config(model.cfg))
    state = {}
    for key, value in model.state_dict().items():
        prefix = "lattice_bert."
        state[f"lattice_bert.lattice.{key[len(prefix):]}" if key.startswith(prefix) else key] = value
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def load_pretrained(path: str | Path) -> lattice.LatticeBertForPreTraining:
    """Our packed pretraining model from an exported (or any `LatticeBertForMaskedLM`) folder."""
    register()
    hf = LatticeBertForMaskedLM.from_pretrained(path)
    model = lattice.LatticeBertForPreTraining(to_model_config(hf.config))
    prefix = "lattice_bert.lattice."
    state = {(f"lattice_bert.{k[len(prefix):]}" if k.startswith(prefix) else k): v
             for k, v in hf.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


MODEL_CARD = """---
library_name: transformers
tags: [lattice-bert, chinese, fill-mask, kompakt]
---
# Lattice-BERT (kompakt)

A Chinese Lattice-BERT encoder (Lai et al., 2021) pretrained with kompakt using masked segment prediction.
Load it after `import kompakt; kompakt.register_hf()` (it registers `model_type="lattice-bert"`), then
`transformers.AutoModel.from_pretrained(folder)` or `AutoModelForMaskedLM.from_pretrained(folder)`.

Inputs, per padded row: `input_ids` = [CLS] characters [SEP] then the lexicon words found in the
characters (word k of `lexicon.txt` has id {vocab_size} + k), `attention_mask`, `lattice_start` and
`lattice_end` (each token's first and last character position in the row; [CLS]/[SEP] and characters
use their own position), `token_type_ids`. Build rows with `kompakt.lattice_inputs.build_lattice`.

Sizes: {num_layers} layers, hidden {hidden}, {heads} heads, {vocab_size} characters + {num_words} words,
relative distances clipped at {max_rel}.
"""


def export(model: lattice.LatticeBertForPreTraining, out_dir: str | Path,
           tokenizer_dir: str | Path | None = None, model_card: str | None = None) -> Path:
    """Write a Hugging Face folder: config.json, model.safetensors, README.md, tokenizer and lexicon.

    Written into `<out_dir>.tmp` and renamed, so a kill leaves no half-written folder. Without
    `model_card`, README.md describes the inputs (MODEL_CARD).
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    to_hf_model(model).save_pretrained(tmp, safe_serialization=True)
    if tokenizer_dir is not None:
        tok = Path(tokenizer_dir)
        if not (tok / "lexicon.txt").is_file():
            raise DataError(f"{tok} has no lexicon.txt; pass the folder of a tokenization run with "
                            "tokenizer.lexicon set, whose lexicon gives the word ids")
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copy2(tok / name, tmp / name)
    cfg = model.cfg
    card = model_card if model_card is not None else MODEL_CARD.format(
        vocab_size=cfg.vocab_size, num_layers=cfg.num_layers, hidden=cfg.hidden_size, heads=cfg.num_heads,
        num_words=cfg.lattice.num_words, max_rel=cfg.lattice.max_relative_distance)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out

"""Model families: one registry entry each, so a new family is one model file plus one line here.

An entry names, as "module:attribute" strings resolved on first use (so `kompakt validate` and the
config classes never import torch or transformers):

- `build`       the pretraining model's constructor, `build(ModelConfig) -> nn.Module` (kompakt/models/)
- `flops`       training FLOPs of one packed micro-batch, `flops(cfg, seq_lens, num_predictions)`
- `export`      writes a Hugging Face folder, `export(model, out_dir, tokenizer_dir=, model_card=)`
- `load`        our pretraining model from an exported folder, `load(path) -> nn.Module`

and as plain data the activation a recipe gets by default, the tokenizer's special tokens by role
(in id order: pad=0, unk=1, cls=2, sep=3, mask=4), the pretraining heads (the losses the model
reports) and the Hugging Face `model_type` and `pipeline_tag` of its export.

`register(Family(...))` adds one at run time (a test registers a toy family this way).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from kompakt.errors import ConfigError

BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}
# ALBERT's SentencePiece convention names padding and unknown in angle brackets.
ALBERT_SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "cls_token": "[CLS]", "sep_token": "[SEP]",
                   "mask_token": "[MASK]"}


@dataclass(frozen=True)
class Family:
    name: str
    build: str
    export: str
    load: str
    flops: str = "kompakt.models.flops:bert_model_flops"
    # exact erf GELU ("gelu") for BERT/NorBERT/SpanBERT; HF's AlbertConfig defaults to "gelu_new" (tanh).
    default_act: str = "gelu"
    special_tokens: dict[str, str] = field(default_factory=lambda: dict(BERT_SPECIALS))
    heads: tuple[str, ...] = ("mlm",)
    hf_model_type: str = "bert"
    pipeline_tag: str = "fill-mask"

    def resolve(self, what: str) -> Callable[..., Any]:
        """The callable behind `build`, `flops`, `export` or `load`."""
        module, _, attr = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), attr)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add (or replace) a family; returns it."""
    FAMILIES[family.name] = family
    return family


def unknown(name: str, key: str = "model.family") -> str | None:
    """None for a registered family, else the one-line message naming `key` and the known families."""
    if name in FAMILIES:
        return None
    return f"{key}={name!r} is not a registered family; use one of {', '.join(sorted(FAMILIES))}"


def get(name: str) -> Family:
    """The registered family `name`; a ConfigError listing the known ones otherwise."""
    problem = unknown(name)
    if problem:
        raise ConfigError(problem)
    return FAMILIES[name]


register(Family("bert", build="kompakt.models.bert:BertForMaskedLM", export="kompakt.hf:export",
                load="kompakt.hf:load_pretrained"))
register(Family("albert", build="kompakt.models.albert:AlbertForPreTraining", export="kompakt.hf:export",
                load="kompakt.hf:load_pretrained", default_act="gelu_new", special_tokens=dict(ALBERT_SPECIALS),
                heads=("mlm", "sop"), hf_model_type="albert"))
register(Family("spanbert", build="kompakt.models.bert:SpanBertForPreTraining", export="kompakt.hf:export",
                load="kompakt.hf:load_pretrained", heads=("mlm", "sbo")))
register(Family("lattice", build="kompakt.models.lattice:build_lattice_model", export="kompakt.hf_lattice:export",
                load="kompakt.hf_lattice:load_pretrained", flops="kompakt.models.flops:lattice_model_flops",
                hf_model_type="lattice-bert"))
register(Family("modernbert", build="kompakt.models.modernbert:ModernBertForMaskedLM",
                export="kompakt.hf_modernbert:export", load="kompakt.hf_modernbert:load_pretrained",
                flops="kompakt.models.flops:modernbert_model_flops", hf_model_type="modernbert"))

"""Hugging Face interop for the ModernBERT family: the stock `ModernBertConfig`, export and load.

Our modules carry the stock parameter names (kompakt/models/modernbert.py), so export builds the
stock `ModernBertForMaskedLM` (or `ModernBertModel`) from `to_hf_config`, loads our state dict with
`strict=True` and saves safetensors: the folder loads with `AutoModelForMaskedLM` and no remote code.
The special token ids are the tokenizer's (BERT order: pad 0, unk 1, cls 2, sep 3, mask 4), not the
English ModernBERT's 50281-50284.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from kompakt.errors import DataError, KompaktError
from kompakt.hf import _read_state_dict, export_stock
from kompakt.model_config import ModelConfig

PAD, CLS, SEP = 0, 2, 3


def to_hf_config(cfg: ModelConfig):
    from transformers import ModernBertConfig

    from kompakt.models.modernbert import layer_is_global

    if cfg.vocab_size is None:
        raise KompaktError("model.vocab_size is unset; fill it from the tokenizer before exporting")
    o = cfg.modernbert
    return ModernBertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, hidden_activation=cfg.act,
        classifier_activation=cfg.act, max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range, norm_eps=cfg.layer_norm_eps, norm_bias=False,
        attention_bias=False, mlp_bias=False, decoder_bias=True, classifier_bias=False,
        attention_dropout=cfg.dropout, embedding_dropout=cfg.dropout, mlp_dropout=cfg.dropout,
        local_attention=o.local_attention,
        layer_types=["full_attention" if layer_is_global(cfg, i) else "sliding_attention"
                     for i in range(cfg.num_layers)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": o.global_rope_theta},
                         "sliding_attention": {"rope_type": "default", "rope_theta": o.local_rope_theta}},
        pad_token_id=PAD, cls_token_id=CLS, bos_token_id=CLS, sep_token_id=SEP, eos_token_id=SEP,
        tie_word_embeddings=True)


def from_hf_config(d: dict, **overrides) -> ModelConfig:
    """Our ModelConfig from a stock ModernBERT config.json (any list of full and sliding attention layers)."""
    if d.get("model_type") != "modernbert":
        raise KompaktError(f"model_type {d.get('model_type')!r} is not modernbert")
    types = list(d.get("layer_types") or [])
    global_at = [i for i, t in enumerate(types) if t == "full_attention"]
    every = global_at[1] - global_at[0] if len(global_at) > 1 else max(len(types), 1)
    # The every-n pattern where the list is one, else the list itself (a model with layers dropped).
    pattern = [i for i in range(len(types)) if i % every == 0] == global_at
    if any(t not in ("full_attention", "sliding_attention") for t in types):
        raise DataError(f"layer_types {types}: kompakt's ModernBERT knows full_attention and sliding_attention")
    rope = d.get("rope_parameters") or {}
    fields = dict(family="modernbert", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                  num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                  intermediate_size=d["intermediate_size"], hidden_act=d.get("hidden_activation", "gelu"),
                  max_position_embeddings=d["max_position_embeddings"], layer_norm_eps=d.get("norm_eps", 1e-5),
                  initializer_range=d.get("initializer_range", 0.02),
                  modernbert=dict(local_attention=d.get("local_attention", 128), global_attn_every_n_layers=every,
                                  layer_types=None if pattern or not types else types,
                                  global_rope_theta=rope.get("full_attention", {}).get("rope_theta", 160_000.0),
                                  local_rope_theta=rope.get("sliding_attention", {}).get("rope_theta", 10_000.0)))
    for key in ("norm_bias", "attention_bias", "mlp_bias", "classifier_bias"):
        if d.get(key):
            raise DataError(f"{key}=true: kompakt's ModernBERT has no biases there")
    fields.update(overrides)
    return ModelConfig.model_validate(fields, context={"any_vocab_size": True})


def _head(model: nn.Module) -> str:
    from kompakt.models.modernbert import ModernBertModel

    return "base" if isinstance(model, ModernBertModel) else "masked_lm"


def to_hf_model(model: nn.Module, head: str = "masked_lm"):
    import transformers

    have = _head(model)
    state = model.state_dict()
    if head == "base" and have == "masked_lm":
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    elif head != have:
        raise KompaktError(f"cannot export a {have} ModernBERT with head={head!r}")
    cls = transformers.ModernBertModel if head == "base" else transformers.ModernBertForMaskedLM
    hf = cls(to_hf_config(model.cfg))
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def export(model: nn.Module, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
           head: str = "masked_lm", model_card: str | None = None) -> Path:
    # No token types in ModernBERT: its tokenizer must not hand `token_type_ids` to the stock classes.
    return export_stock(to_hf_model(model, head), out_dir, tokenizer_dir, model_card,
                        model_input_names=["input_ids", "attention_mask"])


def load_pretrained(path: str | Path, family: str | None = None, **overrides) -> nn.Module:
    """Our ModernBERT (masked LM, or the bare encoder when the folder has no head) from a stock folder."""
    from kompakt.models.modernbert import ModernBertForMaskedLM, ModernBertModel

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise DataError(f"{folder}/config.json not found; point at a Hugging Face model folder")
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()), **overrides)
    state = _read_state_dict(folder)
    if any(k.startswith("head.") for k in state):
        model: nn.Module = ModernBertForMaskedLM(cfg)
        state.setdefault("decoder.weight", state["model.embeddings.tok_embeddings.weight"])
    else:
        model = ModernBertModel(cfg)
        state = {k.removeprefix("model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"{folder}: weights do not match a ModernBERT (missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}); is config.json from this checkpoint?")
    return model

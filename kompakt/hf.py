"""Hugging Face interop for the stock families (BERT/NorBERT, SpanBERT, ALBERT): configs, load, export.

The only module that imports `transformers` for these families. Our models carry HF's parameter
names, so export is: build the stock class from `to_hf_config`, `load_state_dict(ours, strict=True)`,
`save_pretrained` as safetensors. The result loads with `AutoModel`/`AutoModelForMaskedLM` and no
remote code. SpanBERT exports as a plain BERT: its span boundary head (`sbo.*`) is pretraining-only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from kompakt.errors import DataError, KompaktError
from kompakt.model_config import ModelConfig

HEADS = ("masked_lm", "pretraining", "base")

# Tokenizer files a stock AutoTokenizer folder may hold (and Lattice-BERT's lexicon.txt, its word ids); any of
# them present is copied on export and into every compressed folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "spiece.model", "added_tokens.json", "sentencepiece.bpe.model", "vocab.json", "merges.txt",
                   "lexicon.txt")

# Buffers some checkpoints carry that are not parameters of ours (HF recomputes them).
IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")


def to_hf_config(cfg: ModelConfig):
    """The `BertConfig` (bert, spanbert) or `AlbertConfig` (albert) with our sizes."""
    from transformers import AlbertConfig, BertConfig

    if cfg.vocab_size is None:
        raise KompaktError("model.vocab_size is unset; fill it from the tokenizer before exporting")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                  hidden_act=cfg.act, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                  max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
                  initializer_range=cfg.initializer_range, layer_norm_eps=cfg.layer_norm_eps,
                  tie_word_embeddings=True)
    if cfg.family in ("bert", "spanbert"):
        return BertConfig(**common)
    if cfg.family == "albert":
        return AlbertConfig(**common, embedding_size=cfg.embedding_size, num_hidden_groups=cfg.num_hidden_groups,
                            inner_group_num=cfg.inner_group_num, classifier_dropout_prob=cfg.dropout)
    raise KompaktError(f"model.family={cfg.family} is not a stock HF family; use kompakt.hf_lattice")


def from_hf_config(hf_cfg, family: str | None = None, **overrides) -> ModelConfig:
    """Our `ModelConfig` from a `BertConfig`/`AlbertConfig` (or its dict); `family` may say "spanbert"."""
    d = hf_cfg if isinstance(hf_cfg, dict) else hf_cfg.to_dict()
    model_type = d.get("model_type")
    if model_type not in ("bert", "albert"):
        raise KompaktError(f"model_type {model_type!r} is not bert or albert; kompakt loads only those here")
    fields = dict(family=family or model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                  num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                  intermediate_size=d["intermediate_size"], hidden_act=d.get("hidden_act", "gelu"),
                  max_position_embeddings=d["max_position_embeddings"], type_vocab_size=d["type_vocab_size"],
                  layer_norm_eps=d.get("layer_norm_eps", 1e-12), initializer_range=d.get("initializer_range", 0.02))
    if model_type == "albert":
        fields.update(embedding_size=d["embedding_size"], num_hidden_groups=d.get("num_hidden_groups", 1),
                      inner_group_num=d.get("inner_group_num", 1))
    fields.update(overrides)
    return ModelConfig.model_validate(fields, context={"any_vocab_size": True})


def _model_class(family: str, head: str) -> type[nn.Module]:
    from kompakt.models import albert, bert

    if family == "albert":
        return {"masked_lm": albert.AlbertForMaskedLM, "pretraining": albert.AlbertForPreTraining,
                "base": albert.AlbertModel}[head]
    return {"masked_lm": bert.BertForMaskedLM, "pretraining": bert.BertForPreTraining, "base": bert.BertModel}[head]


def _hf_class(family: str, head: str):
    import transformers

    prefix = "Albert" if family == "albert" else "Bert"
    suffix = {"masked_lm": "ForMaskedLM", "pretraining": "ForPreTraining", "base": "Model"}[head]
    return getattr(transformers, prefix + suffix)


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.exists():
        from safetensors.torch import load_file

        return load_file(str(st))
    if pt.exists():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise DataError(f"{folder} has neither model.safetensors nor pytorch_model.bin; point at a saved HF model folder")


def load_pretrained(path: str | Path, family: str | None = None, **overrides) -> nn.Module:
    """Our model from any stock BERT/ALBERT (or ModernBERT, via kompakt.hf_modernbert) folder (config.json
    + safetensors or a weights-only .bin).

    The head follows the checkpoint: `cls.seq_relationship`/`sop_classifier` -> pretraining model,
    `cls.predictions`/`predictions` -> masked LM, neither -> the bare encoder. `overrides` go to ModelConfig
    (e.g. attention="mask")."""
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise DataError(f"{folder}/config.json not found; point at a Hugging Face model folder")
    hf_cfg = json.loads((folder / "config.json").read_text())
    if hf_cfg.get("model_type") == "modernbert":  # the family's own interop module
        from kompakt import hf_modernbert

        return hf_modernbert.load_pretrained(folder, **overrides)
    if hf_cfg.get("model_type") == "lattice-bert":
        from kompakt import hf_lattice

        return hf_lattice.load_pretrained(folder)
    cfg = from_hf_config(hf_cfg, family=family, **overrides)
    state = _read_state_dict(folder)
    keys = set(state)
    if any(k.startswith(("cls.seq_relationship", "sop_classifier")) for k in keys):
        head = "pretraining"
    elif any(k.startswith(("cls.predictions", "predictions.")) for k in keys):
        head = "masked_lm"
    else:
        head = "base"
        base = "albert." if cfg.family == "albert" else "bert."
        state = {k.removeprefix(base): v for k, v in state.items()}
    model = _model_class(cfg.family, head)(cfg)
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_KEYS)}
    if head == "base" and "pooler.dense.weight" not in state and "pooler.weight" not in state:
        model.pooler = None
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
            "predictions.decoder.weight", "predictions.decoder.bias"}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise DataError(f"{folder}: weights do not match a {cfg.family} {head} model "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]}); is config.json from this checkpoint?")
    return model


def _family(model: nn.Module) -> str:
    return model.cfg.family


def _head(model: nn.Module) -> str:
    from kompakt.models import albert, bert

    if isinstance(model, (bert.BertForPreTraining, albert.AlbertForPreTraining)):
        return "pretraining"
    if isinstance(model, (bert.BertModel, albert.AlbertModel)):
        return "base"
    return "masked_lm"


def hf_state_dict(model: nn.Module, head: str) -> dict[str, torch.Tensor]:
    """Our weights under the keys of the stock HF class for `head`, dropping pretraining-only parts."""
    have = _head(model)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("sbo.")}
    if head == have:
        return state
    base = "albert." if _family(model) == "albert" else "bert."
    if head == "base":
        if have == "base":
            return state
        return {k.removeprefix(base): v for k, v in state.items() if k.startswith(base)}
    if head == "masked_lm" and have == "pretraining":
        return {k: v for k, v in state.items()
                if not k.startswith(("cls.seq_relationship", "sop_classifier", base + "pooler"))}
    raise KompaktError(f"cannot export a {have} model with head={head!r}; "
                       f"export it with head='base' or '{have}'")


def to_hf_model(model: nn.Module, head: str = "masked_lm"):
    """The stock `transformers` model holding our weights (strict load: every key must match)."""
    if head not in HEADS:
        raise KompaktError(f"head={head!r} is not one of {HEADS}")
    cfg = model.cfg
    hf_cfg = to_hf_config(cfg)
    cls = _hf_class(cfg.family, head)
    kwargs = {"add_pooling_layer": any("pooler" in k for k in hf_state_dict(model, head))} if head == "base" else {}
    hf_model = cls(hf_cfg, **kwargs)
    hf_model.load_state_dict(hf_state_dict(model, head), strict=True)
    return hf_model.eval()


def export(model: nn.Module, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
           head: str = "masked_lm", model_card: str | None = None) -> Path:
    """Write a stock HF folder (`config.json`, `model.safetensors`, tokenizer files, `README.md`).

    Written into `<out_dir>.tmp` and renamed, so a kill leaves no half-written folder."""
    return export_stock(to_hf_model(model, head), out_dir, tokenizer_dir, model_card)


def export_stock(hf_model, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                 model_card: str | None = None, model_input_names: list[str] | None = None) -> Path:
    """`save_pretrained` of a stock model plus the tokenizer files and the card, atomically (any family).
    `model_input_names` replaces the tokenizer's (a model without token types must not be fed them)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    hf_model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer_dir is not None:
        tok = Path(tokenizer_dir)
        found = [tok / f for f in TOKENIZER_FILES if (tok / f).exists()]
        if not found:
            raise DataError(f"{tok} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                            "pass the tokenizer folder the tokenization stage wrote")
        for f in found:
            shutil.copy2(f, tmp / f.name)
        config_path = tmp / "tokenizer_config.json"
        if model_input_names is not None and config_path.exists():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["model_input_names"] = model_input_names
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if model_card is not None:
        (tmp / "README.md").write_text(model_card, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def logits_at(model: nn.Module, inputs: dict, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N, V) MLM logits of a loaded HF masked-LM at positions (rows[n], cols[n]) of the batch `inputs`.

    The output layer (`get_output_embeddings()`, the vocabulary-wide decoder) runs on those N hidden states
    only, not on all B*L: for a PLL pass (one masked position per row) or a fill-mask batch that is most of
    the forward. A forward pre-hook on the decoder gathers the positions; a head whose decoder does not see
    (B, L, H) states (none of BERT, ALBERT, ModernBERT or Lattice-BERT in kompakt) gets the full logits,
    indexed afterwards, so the answer is the same either way.
    """
    decoder = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shape = tuple(inputs["input_ids"].shape)
    gathered = []

    def gather(_module, args):
        x = args[0]
        if x.dim() == 3 and tuple(x.shape[:2]) == shape:
            gathered.append(True)
            return (x[rows, cols],) + tuple(args[1:])
        return None

    handle = decoder.register_forward_pre_hook(gather) if isinstance(decoder, nn.Module) else None
    try:
        logits = model(**inputs).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits if gathered else logits[rows, cols]

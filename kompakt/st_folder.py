"""The sentence-transformers folder layout, written and read without importing sentence-transformers.

An embedding model kompakt exports is an ordinary HF encoder folder (config.json, model.safetensors,
tokenizer) plus the files `SentenceTransformer(folder)` reads: modules.json (Transformer, Pooling and,
for normalised embeddings, Normalize), sentence_bert_config.json (max_seq_length) and
1_Pooling/config.json (mean or [CLS]). `kompakt infer`/`serve` read the pooling back from it, so a
folder embeds the same way in all three.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def save_embedding_model(encoder, tokenizer, out: Path, *, pooling: str, normalize: bool, max_seq_length: int) -> None:
    """A folder that stock `AutoModel` and `sentence_transformers.SentenceTransformer(out)` both load: the
    encoder's HF files and tokenizer at the top, modules.json (Transformer, Pooling, and Normalize when
    the embeddings are normalised), sentence_bert_config.json and 1_Pooling/config.json; written beside and
    renamed, so a killed save leaves no folder that looks complete."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    encoder.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    dim = int(encoder.config.hidden_size)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (tmp / "2_Normalize").mkdir()
    (tmp / "1_Pooling").mkdir()
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True}, indent=2) + "\n")
    (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                               "do_lower_case": False}, indent=2) + "\n")
    (tmp / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (tmp / "config_sentence_transformers.json").write_text(json.dumps({
        "model_type": "SentenceTransformer", "prompts": {"query": "", "document": ""}, "default_prompt_name": None,
        "similarity_fn_name": "cosine" if normalize else "dot"}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def embedding_settings(folder: Path) -> dict | None:
    """{"pooling": "mean" | "cls", "normalize": bool} of a sentence-transformers folder, or None."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
        cfg = json.loads((folder / pooling_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, StopIteration, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return {"pooling": "cls" if cfg.get("pooling_mode_cls_token") else "mean",
            "normalize": any(m["type"].endswith("Normalize") for m in modules)}

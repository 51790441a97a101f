"""Task types: how a task's examples become features, batches, a stock HF head and predictions.

One file per kind (finetune/sequence.py: classification, text pairs, regression; finetune/tokens.py:
token classification; finetune/qa.py: extractive QA); this registry names them. A new task type is
one file with a `TaskType` and one line here.

A task type supplies:
- `auto_class`: the stock `transformers` class of its head (`AutoModelForSequenceClassification`, ...),
  so a fine-tuned model is an ordinary HF folder with `id2label`/`label2id`;
- `head_kwargs(labels)`: what that class needs (num_labels, id2label, problem_type);
- `encode(examples, tokenizer, max_len, label2id, train)`: features, each a dict with `input_ids`
  (a list) and what `collate` and `predict` need; a QA example may give several features;
- `collate(features, pad_id)`: a padded batch of tensors the head takes, with `labels` when present;
- `predict(logits_batches, features, examples, labels)`: one prediction per example (label strings,
  floats, tag lists or answer strings), the form kompakt/eval's metrics read.

For a Lattice-BERT, train.py wraps the task type in finetune/lattice.py's `LatticeTask`, which appends each
feature's lexicon words after `encode` and pads their spans in `collate`; the task types stay as they are.
"""

from __future__ import annotations

import importlib

TASK_TYPES = {
    "classification": "kompakt.finetune.sequence:CLASSIFICATION",
    "pair_classification": "kompakt.finetune.sequence:PAIR_CLASSIFICATION",
    "regression": "kompakt.finetune.sequence:REGRESSION",
    "token_classification": "kompakt.finetune.tokens:TOKEN_CLASSIFICATION",
    "qa": "kompakt.finetune.qa:QUESTION_ANSWERING",
}


def task_type(name: str):
    """The registered task type `name` (a ConfigError naming the known ones otherwise)."""
    from kompakt.errors import ConfigError

    if name not in TASK_TYPES:
        raise ConfigError(f"task type {name!r} is unknown; use one of {', '.join(sorted(TASK_TYPES))}")
    module, _, attr = TASK_TYPES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def pad(rows: list[list[int]], value: int):
    """(B, L) LongTensor of rows padded with `value`, and the attention mask."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def encoder_batch(features: list[dict], pad_id: int) -> dict:
    """`input_ids`, `attention_mask` and (when the features have them) `token_type_ids`, padded."""
    ids, mask = pad([f["input_ids"] for f in features], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = pad([f["token_type_ids"] for f in features], 0)[0]
    return batch

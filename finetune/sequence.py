"""Sequence-level tasks: single-text and text-pair classification, and regression ([CLS] head)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kompakt.finetune.heads import encoder_batch


@dataclass(frozen=True)
class SequenceTask:
    pair: bool
    regression: bool
    auto_class: str = "AutoModelForSequenceClassification"

    def head_kwargs(self, labels: list[str]) -> dict:
        if self.regression:
            return {"num_labels": 1, "problem_type": "regression"}
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {l: i for i, l in enumerate(labels)}, "problem_type": "single_label_classification"}

    def encode(self, examples: list[dict], tokenizer, max_len: int, label2id: dict, train: bool) -> list[dict]:
        texts = [e["text"] for e in examples]
        pairs = [e.get("text_pair") or "" for e in examples] if self.pair or any("text_pair" in e for e in examples) else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_len) if pairs else tokenizer(
            texts, truncation=True, max_length=max_len)
        feats = []
        for i, e in enumerate(examples):
            f = {"input_ids": enc["input_ids"][i], "example": i}
            if "token_type_ids" in enc:
                f["token_type_ids"] = enc["token_type_ids"][i]
            if "label" in e and e["label"] is not None:
                f["label"] = float(e["label"]) if self.regression else label2id[e["label"]]
            feats.append(f)
        return feats

    def collate(self, features: list[dict], pad_id: int) -> dict:
        batch = encoder_batch(features, pad_id)
        if "label" in features[0]:
            dtype = torch.float32 if self.regression else torch.long
            batch["labels"] = torch.tensor([f["label"] for f in features], dtype=dtype)
        return batch

    def num_predictions(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0])

    def rows(self, output, batch: dict) -> list[np.ndarray]:
        return list(output.logits.float().cpu().numpy())

    def predict(self, logits: list[np.ndarray], features: list[dict], examples: list[dict], labels: list[str]) -> list:
        """One label string (or float) per example, from per-feature logits (C,) in feature order."""
        out = np.stack(logits)
        if self.regression:
            return [float(x) for x in out[:, 0]]
        return [labels[int(i)] for i in out.argmax(-1)]


CLASSIFICATION = SequenceTask(pair=False, regression=False)
PAIR_CLASSIFICATION = SequenceTask(pair=True, regression=False)
REGRESSION = SequenceTask(pair=False, regression=True)

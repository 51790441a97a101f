"""Token classification (POS, NER with BIO spans): labels on the first sub-word of each word.

The other sub-words and the specials get -100 (ignored by the loss), the convention of the
original BERT NER setup; a prediction is the tag of each word's first sub-word, so predictions and
gold tags have one entry per word and seqeval scores spans on words, not sub-words. Words cut off by
`max_len` are predicted "O" (counted as errors when they carry an entity, not silently dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kompakt.finetune.heads import encoder_batch, pad


@dataclass(frozen=True)
class TokenTask:
    auto_class: str = "AutoModelForTokenClassification"

    def head_kwargs(self, labels: list[str]) -> dict:
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {l: i for i, l in enumerate(labels)}}

    def encode(self, examples: list[dict], tokenizer, max_len: int, label2id: dict, train: bool) -> list[dict]:
        enc = tokenizer([e["tokens"] for e in examples], is_split_into_words=True, truncation=True, max_length=max_len)
        feats = []
        for i, e in enumerate(examples):
            word_ids = enc.word_ids(i)
            first, labels, prev = [], [], None
            for pos, w in enumerate(word_ids):
                if w is not None and w != prev:
                    first.append(pos)
                    labels.append(label2id[e["tags"][w]] if "tags" in e else -100)
                prev = w
            f = {"input_ids": enc["input_ids"][i], "example": i, "first": first, "num_words": len(e["tokens"])}
            if "tags" in e:
                lab = [-100] * len(f["input_ids"])
                for pos, l in zip(first, labels):
                    lab[pos] = l
                f["labels"] = lab
            feats.append(f)
        return feats

    def collate(self, features: list[dict], pad_id: int) -> dict:
        batch = encoder_batch(features, pad_id)
        if "labels" in features[0]:
            batch["labels"] = pad([f["labels"] for f in features], -100)[0]
        return batch

    def num_predictions(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum()) if "labels" in batch else int(batch["attention_mask"].sum())

    def predict(self, logits: list[np.ndarray], features: list[dict], examples: list[dict], labels: list[str]) -> list:
        out = []
        for lg, f in zip(logits, features):
            tags = [labels[int(lg[p].argmax())] for p in f["first"]]
            out.append(tags + ["O" if "O" in labels else labels[0]] * (f["num_words"] - len(tags)))
        return out

    def rows(self, output, batch: dict) -> list[np.ndarray]:
        """Per-feature (L_i, C) arrays, padding removed."""
        lengths = batch["attention_mask"].sum(1).tolist()
        return [output.logits[i, :n].float().cpu().numpy() for i, n in enumerate(lengths)]


TOKEN_CLASSIFICATION = TokenTask()

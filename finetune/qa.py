"""Extractive question answering (SQuAD format): start/end logits over the context's sub-words.

Long contexts are cut into windows of `max_len` tokens overlapping by `stride` (BERT's doc stride),
each a feature; a window without the answer is trained to point at [CLS]. A prediction takes, over
all windows of an example, the best start/end pair with start <= end, at most `max_answer_tokens`
apart and inside the context, and returns the context's characters between their offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kompakt.finetune.heads import encoder_batch


@dataclass(frozen=True)
class QATask:
    stride: int = 64
    max_answer_tokens: int = 30
    top_k: int = 20
    auto_class: str = "AutoModelForQuestionAnswering"

    def head_kwargs(self, labels: list[str]) -> dict:
        return {}

    def encode(self, examples: list[dict], tokenizer, max_len: int, label2id: dict, train: bool) -> list[dict]:
        enc = tokenizer([e["question"] for e in examples], [e["context"] for e in examples], truncation="only_second",
                        max_length=max_len, stride=min(self.stride, max_len // 4), return_overflowing_tokens=True,
                        return_offsets_mapping=True)
        feats = []
        for j, ex_index in enumerate(enc["overflow_to_sample_mapping"]):
            e = examples[ex_index]
            seq = enc.sequence_ids(j)
            offsets = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][j], seq)]
            f = {"input_ids": enc["input_ids"][j], "example": ex_index, "offsets": offsets}
            if "token_type_ids" in enc:
                f["token_type_ids"] = enc["token_type_ids"][j]
            answers = e.get("answers") or {}
            if answers.get("text"):
                a0 = int(answers["answer_start"][0])
                a1 = a0 + len(answers["text"][0])
                inside = [i for i, o in enumerate(offsets) if o is not None]
                start = end = 0  # [CLS] when the window holds no answer
                if inside and offsets[inside[0]][0] <= a0 and offsets[inside[-1]][1] >= a1:
                    start = next(i for i in inside if offsets[i][1] > a0)
                    end = next(i for i in reversed(inside) if offsets[i][0] < a1)
                f["start_positions"], f["end_positions"] = start, end
            feats.append(f)
        return feats

    def collate(self, features: list[dict], pad_id: int) -> dict:
        batch = encoder_batch(features, pad_id)
        if "start_positions" in features[0]:
            batch["start_positions"] = torch.tensor([f["start_positions"] for f in features])
            batch["end_positions"] = torch.tensor([f["end_positions"] for f in features])
        return batch

    def num_predictions(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0])

    def rows(self, output, batch: dict) -> list[np.ndarray]:
        lengths = batch["attention_mask"].sum(1).tolist()
        s, e = output.start_logits.float().cpu().numpy(), output.end_logits.float().cpu().numpy()
        return [np.stack([s[i, :n], e[i, :n]]) for i, n in enumerate(lengths)]

    def predict(self, logits: list[np.ndarray], features: list[dict], examples: list[dict], labels: list[str]) -> list:
        best: dict[int, tuple[float, str]] = {}
        for row, f in zip(logits, features):
            start, end = row
            offsets = f["offsets"]
            context = examples[f["example"]]["context"]
            for a in np.argsort(start)[::-1][:self.top_k]:
                for b in np.argsort(end)[::-1][:self.top_k]:
                    if a >= len(offsets) or b >= len(offsets) or offsets[a] is None or offsets[b] is None:
                        continue
                    if b < a or b - a + 1 > self.max_answer_tokens:
                        continue
                    score = float(start[a] + end[b])
                    if f["example"] not in best or score > best[f["example"]][0]:
                        best[f["example"]] = (score, context[offsets[a][0]:offsets[b][1]])
        return [best.get(i, (0.0, ""))[1] for i in range(len(examples))]


QUESTION_ANSWERING = QATask()

"""Data augmentation for task distillation: word replacements proposed by the teacher's own MLM head.

TinyBERT's augmentation masks one word at a time and runs BERT once per word and per copy, which its
users report takes about a day per epoch on large sets. Here every copy of an example masks all of
its chosen words at once (each chosen with probability `p`, TinyBERT's p_t = 0.4), and the copies of
many examples go through the MLM in one length-bucketed batch, so a copy costs one forward pass of
`batch_size` rows: the throughput is reported as augmented examples per second.

A chosen word becomes one [MASK] and is replaced by a whole-word token sampled from the top `top_k`
(TinyBERT's K = 15) predictions, never the original word, a special token or a word-piece
continuation. Words are whitespace-separated, or for text written without spaces (Chinese) the
words of jieba's segmentation, so it works for any language the tokenizer covers. Labels are kept:
sentence tasks keep their label; token tasks replace only words tagged "O", so the tags still hold.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch

from kompakt.errors import ConfigError
from kompakt.log import info

_NO_SPACES = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def words_of(text: str) -> tuple[list[str], str]:
    """(words, joiner): whitespace words, or jieba's words for text without spaces (joined with '')."""
    if " " not in text.strip() and _NO_SPACES.search(text):
        import jieba

        jieba.setLogLevel(60)
        return [w for w in jieba.lcut(text) if w], ""
    return text.split(), " "


class Augmenter:
    """An MLM folder (the pretrained teacher) proposing replacements, on the CPU or a GPU."""

    def __init__(self, mlm_dir: Path, *, p: float = 0.4, top_k: int = 15, batch_size: int = 64,
                 max_len: int = 128, device: str | None = None):
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.tok = AutoTokenizer.from_pretrained(str(mlm_dir))
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.model = AutoModelForMaskedLM.from_pretrained(str(mlm_dir)).eval()
        finally:
            hf_logging.set_verbosity(level)
        if self.tok.mask_token_id is None:
            raise ConfigError(f"{mlm_dir}: the tokenizer has no mask token; augmentation needs an MLM teacher")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.p, self.top_k, self.batch_size, self.max_len = p, top_k, batch_size, max_len
        vocab = self.tok.get_vocab()
        banned = np.zeros(len(self.tok), dtype=bool)
        for token, i in vocab.items():
            if token.startswith("##") or token in self.tok.all_special_tokens or i >= len(banned):
                banned[min(i, len(banned) - 1)] = True
        self.banned = torch.from_numpy(banned[: self.model.config.vocab_size]).to(self.device)
        self.seconds, self.count = 0.0, 0

    @torch.no_grad()
    def _fill(self, masked: list[list[str]], joiners: list[str], rng: np.random.Generator) -> list[list[str]]:
        """Replace each "[MASK]" word in every row by a sampled whole-word prediction."""
        mask = self.tok.mask_token
        texts = [j.join(w) for w, j in zip(masked, joiners)]
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = [list(w) for w in masked]
        for a in range(0, len(order), self.batch_size):
            rows = order[a:a + self.batch_size]
            enc = self.tok([texts[i] for i in rows], truncation=True, max_length=self.max_len, padding=True,
                           return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()
            logits[..., : self.banned.numel()][..., self.banned] = -1e9
            where = (enc["input_ids"] == self.tok.mask_token_id).nonzero().tolist()
            if not where:
                continue
            top = logits[[r for r, _ in where], [c for _, c in where]].topk(self.top_k, dim=-1).indices.cpu().numpy()
            picks = iter(top[np.arange(len(where)), rng.integers(0, self.top_k, len(where))])
            for r, _ in where:
                row = out[rows[r]]
                k = row.index(mask)
                # decode, not the raw token: byte-level BPE writes "Ġword", SentencePiece "▁word"
                row[k] = self.tok.decode([int(next(picks))]).strip() or row[k]
        return out

    def augment(self, examples: list[dict], task_type: str, copies: int, seed: int) -> list[dict]:
        """`copies` augmented versions of every example (labels kept); the originals are not included."""
        if task_type == "qa":
            raise ConfigError("augmentation does not support extractive QA (answers would move); set augment: 0")
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        mask = self.tok.mask_token
        out: list[dict] = []
        fields = ["tokens"] if task_type == "token_classification" else [f for f in ("text", "text_pair")
                                                                          if any(f in e for e in examples)]
        for _ in range(copies):
            new = [dict(e) for e in examples]
            for field in fields:
                rows, joiners, originals, chosen_all = [], [], [], []
                for e in examples:
                    if field == "tokens":
                        words, joiner = list(e["tokens"]), " "
                        ok = [t == "O" for t in e["tags"]]
                    else:
                        words, joiner = words_of(e.get(field) or "")
                        ok = [True] * len(words)
                    chosen = [i for i in range(len(words)) if ok[i] and rng.random() < self.p]
                    masked = [mask if i in set(chosen) else w for i, w in enumerate(words)]
                    rows.append(masked)
                    joiners.append(joiner)
                    originals.append(words)
                    chosen_all.append(chosen)
                filled = self._fill(rows, joiners, rng)
                for e, f, words, joiner in zip(new, filled, originals, joiners):
                    f = [w if x == mask else x for x, w in zip(f, words)]  # any mask left (cut off): original
                    e[field] = f if field == "tokens" else joiner.join(f)
            out += new
        self.seconds += time.perf_counter() - t0
        self.count += len(out)
        return out

    @property
    def examples_per_second(self) -> float:
        return self.count / max(self.seconds, 1e-9)

    def report(self) -> dict:
        info(f"augment: {self.count:,} augmented examples in {self.seconds:.1f} s "
             f"({self.examples_per_second:,.0f} examples/s on {self.device})")
        return {"augmented": self.count, "seconds": round(self.seconds, 2),
                "examples_per_second": round(self.examples_per_second, 1), "device": str(self.device)}

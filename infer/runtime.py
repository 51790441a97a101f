"""A released model ready to predict: its task read from the folder, the fastest runtime it has.

`load_predictor(folder)` returns a `Predictor` whose `predict(texts)` gives one dict per text:

- classify (a `*ForSequenceClassification` folder): `label`, `score` and `probs` (softmax, in the order of
  `labels`); a regression head gives `value` instead.
- tokens (a `*ForTokenClassification` folder): `spans`, each `{start, end, label, score}` in characters
  (end exclusive) of the input, from BIO (or plain) tags on each word's first sub-word, as fine-tuning trained them.
- embed (any encoder): `embedding`, mean-pooled over real tokens or the [CLS] vector, optionally L2-normalised;
  a sentence-transformers folder (a `kompakt finetune` retrieval export) brings its own pooling and
  normalisation (kompakt.st_folder), which is the default.

Runtimes: `torch` (fp32 on CPU; bf16 autocast on CUDA), `onnx` and `onnx-int8` (ONNX Runtime on CPU). With
`runtime="auto"` a CUDA device means torch bf16, and on CPU an ONNX file in the folder whose output fits the
task (`model_int8.onnx` first, then `model.onnx`: `logits` for a task head, `last_hidden_state` for
embeddings) is used, else torch fp32. Batches are length-bucketed (texts sorted by token count, cut into
batches of at most `batch_tokens` padded tokens and MAX_PADDING padding), so almost no padding is computed, under
`torch.inference_mode`.

A Lattice-BERT folder (model_type lattice-bert) runs in torch only: each row gets the lexicon words of its
characters appended, as fine-tuning fed them (kompakt/finetune/lattice.py), up to max_length tokens in all;
outputs are read on the characters. Its ONNX files would lack the lattice inputs, so `auto` skips them (logged)
and `onnx`/`onnx-int8` are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kompakt.errors import ConfigError, DataError

TASKS = ("classify", "tokens", "embed")
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
POOLINGS = ("mean", "cls")
ONNX_FILES = {"onnx-int8": "model_int8.onnx", "onnx": "model.onnx"}
# Padded tokens per forward pass. GPU: 8,192 (64 rows of 128), far from memory limits for BERT-base. CPU:
# small batches are faster per row. On the 2-core Xeon, 4x312 rows/s by batch size at 48 | 128 tokens: ONNX int8
# 631/912/738 | 261/331/213 at 1/8/64 rows, torch fp32 210/448/303 | 120/171/102; so 1,024 tokens (8 rows of 128).
BATCH_TOKENS = {"cuda": 8192, "cpu": 1024}
MAX_ROWS = 256
# A batch is cut when its padding would exceed this share of its real tokens: one pass over 64 demo paragraphs
# of 22-128 tokens padded to the longest ran at 121 texts/s against 493 one text at a time (ONNX int8, CPU).
MAX_PADDING = 0.2


def folder_task(folder: Path) -> str | None:
    """classify / tokens from the folder's config.json `architectures`; None for an encoder without a task head."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: no config.json; give a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{folder}/config.json is not valid JSON; re-export the model") from None
    for arch in cfg.get("architectures") or []:
        if arch.endswith("ForSequenceClassification"):
            return "classify"
        if arch.endswith("ForTokenClassification"):
            return "tokens"
    return None


@dataclass
class Encoded:
    """Token ids of a list of texts (no padding), with character offsets and word ids for token tasks."""

    ids: list[list[int]]
    offsets: list[list[tuple[int, int]]] = field(default_factory=list)
    word_ids: list[list[int | None]] = field(default_factory=list)


class Predictor:
    """A model folder loaded for one task and runtime; see the module docstring."""

    def __init__(self, folder: str | Path, task: str | None = None, *, runtime: str = "auto", device: str = "auto",
                 pooling: str | None = None, normalize: bool | None = None, max_length: int | None = None,
                 batch_tokens: int | None = None, threads: int | None = None):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: no such model folder")
        head = folder_task(self.folder)
        if task is None:
            task = head or "embed"
        if task not in TASKS:
            raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS)}")
        if task in ("classify", "tokens") and head != task:
            have = f"a {head} head" if head else "no task head (an encoder or MLM folder)"
            raise DataError(f"{self.folder}: task {task!r} needs a fine-tuned "
                            f"{'sequence' if task == 'classify' else 'token'}-classification folder, this one has "
                            f"{have}; use --task {head or 'embed'} or a `kompakt finetune` output")
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
        # An exported embedding model (a sentence-transformers folder) says its own pooling; else mean, unnormalised.
        from kompakt.st_folder import embedding_settings

        own = embedding_settings(self.folder) or {"pooling": "mean", "normalize": False}
        pooling = own["pooling"] if pooling is None else pooling
        normalize = own["normalize"] if normalize is None else normalize
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.task, self.pooling, self.normalize = task, pooling, normalize
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        except (OSError, ValueError) as err:
            raise DataError(f"{self.folder}: no loadable tokenizer ({str(err).splitlines()[0][:120]})") from None
        if not self.tokenizer.is_fast:
            raise DataError(f"{self.folder}: the tokenizer is not a fast (tokenizer.json) one; re-save it")
        with open(self.folder / "config.json", encoding="utf-8") as f:
            self.config = json.load(f)
        self.lattice = self.config.get("model_type") == "lattice-bert"
        limit = self.config.get("max_position_embeddings") or 512
        self.max_length = min(max_length or limit, limit)
        id2label = self.config.get("id2label") or {}
        self.labels = [id2label[k] for k in sorted(id2label, key=int)] if task != "embed" else None
        self.regression = task == "classify" and self.config.get("problem_type") == "regression"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.batch_tokens = batch_tokens or BATCH_TOKENS["cuda" if self.device.type == "cuda" else "cpu"]
        self.runtime = self._pick_runtime(runtime)
        self._input_names: list[str] = []
        if self.runtime.startswith("onnx"):
            self._load_onnx(threads)
        else:
            self._load_torch()

    # ----------------------------------------------------------------------------------------- loading
    def _onnx_fits(self, path: Path) -> bool:
        import onnx

        outputs = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
        return ("logits" in outputs) if self.task != "embed" else ("last_hidden_state" in outputs)

    def _pick_runtime(self, runtime: str) -> str:
        if self.lattice:
            if runtime.startswith("onnx"):
                raise ConfigError(f"{self.folder}: --runtime {runtime}: ONNX does not support Lattice-BERT (its graph has "
                                  "no lattice_start/lattice_end inputs); use --runtime torch")
            if runtime == "auto" and any((self.folder / f).is_file() for f in ONNX_FILES.values()):
                from kompakt.log import info

                info(f"infer: {self.folder}: ONNX files skipped, ONNX does not support Lattice-BERT; running torch")
            return "torch"
        if runtime != "auto":
            if runtime.startswith("onnx"):
                path = self.folder / ONNX_FILES[runtime]
                if not path.is_file():
                    raise DataError(f"{self.folder}: no {path.name}; run `kompakt infer {self.folder} --export-onnx` "
                                    "(or compress with quantize backend onnx) first, or use --runtime torch")
                if not self._onnx_fits(path):
                    raise DataError(f"{path}: its output does not fit task {self.task!r} (an encoder-only export "
                                    "serves --task embed); export the task model with --export-onnx")
            return runtime
        if self.device.type == "cuda":
            return "torch"
        for name in ("onnx-int8", "onnx"):
            path = self.folder / ONNX_FILES[name]
            if path.is_file() and self._onnx_fits(path):
                return name
        return "torch"

    def _load_torch(self) -> None:
        import transformers
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

        cls = {"classify": AutoModelForSequenceClassification, "tokens": AutoModelForTokenClassification,
               "embed": AutoModel}[self.task]
        import kompakt

        kompakt.register_hf()  # model_type lattice-bert
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.model = cls.from_pretrained(str(self.folder), attn_implementation="sdpa")
        except (OSError, ValueError) as err:
            raise DataError(f"{self.folder}: stock transformers cannot load it "
                            f"({str(err).splitlines()[0][:160]})") from None
        self.model.to(self.device).eval()
        if self.lattice:
            from kompakt.hf_lattice import folder_lexicon

            self.lexicon = folder_lexicon(self.folder, self.model.config)
        import inspect

        params = inspect.signature(self.model.forward).parameters
        self._input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]

    def _load_onnx(self, threads: int | None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.folder / ONNX_FILES[self.runtime]), opts,
                                            providers=["CPUExecutionProvider"])
        self._input_names = [i.name for i in self.session.get_inputs()]
        self._output = "logits" if self.task != "embed" else "last_hidden_state"

    # ---------------------------------------------------------------------------------------- encoding
    def encode(self, texts: list[str]) -> Encoded:
        """Token ids (with specials, untruncated) of every text; offsets and word ids for token tasks."""
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=False, return_attention_mask=False,
                             return_token_type_ids=False, return_offsets_mapping=self.task == "tokens",
                             verbose=False)
        out = Encoded(ids=enc["input_ids"])
        if self.task == "tokens":
            out.offsets = enc["offset_mapping"]
            out.word_ids = [enc.word_ids(i) for i in range(len(texts))]
        return out

    def truncate(self, enc: Encoded, i: int) -> None:
        """Cut row i to max_length in place, keeping its final special token ([SEP])."""
        n = self.max_length
        enc.ids[i] = enc.ids[i][:n - 1] + enc.ids[i][-1:]
        if enc.offsets:
            enc.offsets[i] = enc.offsets[i][:n - 1] + enc.offsets[i][-1:]
            enc.word_ids[i] = enc.word_ids[i][:n - 1] + [None]

    # --------------------------------------------------------------------------------------- predicting
    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Row indices grouped into length-bucketed batches of at most batch_tokens padded tokens and at most
        MAX_PADDING padding over their real tokens (rows sorted by length, so a batch's width is its last row's)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        out, cur, real = [], [], 0
        for i in order:
            padded = (len(cur) + 1) * lengths[i]
            if cur and (padded > self.batch_tokens or padded > (1 + MAX_PADDING) * (real + lengths[i])
                        or len(cur) >= MAX_ROWS):
                out.append(cur)
                cur, real = [], 0
            cur.append(i)
            real += lengths[i]
        if cur:
            out.append(cur)
        return out

    def forward(self, ids: list[list[int]]) -> np.ndarray:
        """Logits (B, L, C) or (B, C), or hidden states (B, L, H), float32, for rows of token ids."""
        width = max(map(len, ids))
        arr = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for r, row in enumerate(ids):
            arr[r, :len(row)] = row
            mask[r, :len(row)] = 1
        feeds = {"input_ids": arr, "attention_mask": mask, "token_type_ids": np.zeros_like(arr)}
        if self.lattice:
            return self._forward_lattice(ids, width)
        if self.runtime.startswith("onnx"):
            return self.session.run([self._output], {n: feeds[n] for n in self._input_names})[0].astype(np.float32)
        kw = {n: torch.from_numpy(feeds[n]).to(self.device) for n in self._input_names}
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(**kw)
        res = out.logits if self.task != "embed" else out.last_hidden_state
        return res.float().cpu().numpy()

    def _forward_lattice(self, ids: list[list[int]], width: int) -> np.ndarray:
        """`forward` of a Lattice-BERT: the rows' lattices (words appended, max_length tokens in all), outputs
        of the character positions only (the first `width`), so callers read them as for any model."""
        from kompakt.hf_lattice import lattice_batch, lattice_of_row

        tok = self.tokenizer
        lattices = [lattice_of_row(row, self.lexicon, cls_id=tok.cls_token_id, sep_id=tok.sep_token_id,
                                   max_len=max(self.max_length, len(row))) for row in ids]
        kw = {k: v.to(self.device) for k, v in lattice_batch(lattices, self.pad_id).items()}
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(**kw)
        res = out.logits if self.task != "embed" else out.last_hidden_state
        return (res if res.dim() == 2 else res[:, :width]).float().cpu().numpy()

    def predict_encoded(self, enc: Encoded, rows: list[int] | None = None) -> list[dict]:
        """Outputs for rows of `enc` (default all), in their order; every row must fit max_length."""
        rows = list(range(len(enc.ids))) if rows is None else rows
        results: list[dict | None] = [None] * len(rows)
        for group in self.batches([len(enc.ids[r]) for r in rows]):
            out = self.forward([enc.ids[rows[g]] for g in group])
            for k, g in enumerate(group):
                results[g] = self._row_output(out[k], enc, rows[g])
        return results  # type: ignore[return-value]

    def predict(self, texts: list[str], truncate: bool = True) -> list[dict]:
        """One output dict per text (see the module docstring); texts over max_length are cut when `truncate`,
        else a ValueError names the first."""
        enc = self.encode(texts)
        for i, row in enumerate(enc.ids):
            if len(row) > self.max_length:
                if not truncate:
                    raise ValueError(f"text {i} has {len(row)} tokens, over the limit of {self.max_length}")
                self.truncate(enc, i)
        return self.predict_encoded(enc)

    def _row_output(self, out: np.ndarray, enc: Encoded, r: int) -> dict:
        n = len(enc.ids[r])
        if self.task == "classify":
            if self.regression:
                return {"value": float(out[0])}
            p = _softmax(out)
            k = int(p.argmax())
            return {"label": self.labels[k], "score": float(p[k]), "probs": p.astype(np.float32).tolist()}
        if self.task == "tokens":
            return {"spans": self._spans(_softmax(out[:n]), enc.offsets[r], enc.word_ids[r])}
        h = out[:n]
        vec = h[0] if self.pooling == "cls" else h.mean(axis=0)
        if self.normalize:
            vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
        return {"embedding": vec.astype(np.float32)}

    def _spans(self, probs: np.ndarray, offsets, word_ids) -> list[dict]:
        """Entity spans from the tag of each word's first sub-word: B-X starts a span, I-X continues one of
        the same type (an I-X without one starts it, as seqeval reads it), O and other types end it. Tags
        without a B-/I- prefix are spans of one word each."""
        words, prev = [], None
        for pos, w in enumerate(word_ids):
            if w is None:
                continue
            if w != prev:
                k = int(probs[pos].argmax())
                words.append({"start": offsets[pos][0], "end": offsets[pos][1], "tag": self.labels[k],
                              "score": float(probs[pos][k])})
            else:
                words[-1]["end"] = offsets[pos][1]
            prev = w
        spans: list[dict] = []
        open_span = None
        for wd in words:
            tag = wd["tag"]
            kind, _, typ = tag.partition("-") if tag[:2] in ("B-", "I-") else ("S", "", tag)
            if tag == "O" or not typ:
                open_span = None
                continue
            if kind == "I" and open_span is not None and open_span["label"] == typ:
                open_span["end"] = wd["end"]
                open_span["scores"].append(wd["score"])
                continue
            open_span = {"start": wd["start"], "end": wd["end"], "label": typ, "scores": [wd["score"]]}
            spans.append(open_span)
            if kind == "S":
                open_span = None
        return [{"start": int(s["start"]), "end": int(s["end"]), "label": s["label"],
                 "score": float(np.mean(s["scores"]))} for s in spans]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def load_predictor(folder: str | Path, task: str | None = None, **kwargs) -> Predictor:
    """A `Predictor` for the folder (see the module docstring for tasks, runtimes and options)."""
    return Predictor(folder, task, **kwargs)


def default_threads() -> int:
    """Intra-op threads for one process: the CPUs this process may use (Slurm's cgroup, taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)

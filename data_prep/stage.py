"""data_prep: raw files -> clean, language-filtered, deduplicated, sentence-split Parquet shards.

Two steps, wired by kompakt/pipeline.py:

1. `run_part` (one per input part, `num_proc` worker processes): read documents in fixed chunks of
   CHUNK_DOCS, and per document normalise, filter (length, alphabetic share, repeated lines,
   language), split sentences, hash the text and compute its MinHash signature. Results come back
   in chunk order, so a part is byte-identical for any `num_proc`. Writes `docs.parquet`,
   `signatures.u32` (uint32, one row of num_perm values per document) and `part_stats.json`.
2. `merge` (one process): exact and near dedup over all parts in one global order (the recipe's
   file order, then document order, restored across parts), keeping the first copy; writes
   `corpus/part-00000.parquet ...` with columns id, text, sentences, lang, and `stats.json` with
   documents and characters in and out of every step.

All dedup happens in the merge, so the corpus does not depend on `num_proc` or `num_shards`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kompakt.config import DataConfig
from kompakt.data_prep import langid
from kompakt.data_prep.dedup import NearDedup, signatures, text_digest
from kompakt.data_prep.normalize import alpha_ratio, normalize_text, repeated_line_ratio, words
from kompakt.readers import DecodeCounter, read_documents
from kompakt.data_prep.sentences import split_sentences
from kompakt.errors import DataError
from kompakt.log import info, table
from kompakt.runs import StageRun, write_json_atomic

# Documents per work unit: big enough to amortise inter-process transfer (about 150 KB of text on
# the demo corpus), small enough to keep both cores busy on a few thousand documents.
CHUNK_DOCS = 1000
# Chunks in flight per worker: the reader stays ahead of the workers without buffering a whole corpus.
CHUNKS_IN_FLIGHT = 4
# The per-document steps in the order they are applied; a document leaves at the first it fails.
PART_STEPS = (
    "normalize",
    "min_chars",
    "max_chars",
    "min_words",
    "max_words",
    "min_alpha_ratio",
    "max_repeated_line_ratio",
    "language",
)
DEDUP_STEPS = ("exact_dedup", "near_dedup")
DOCS_FILE, SIGS_FILE, PART_STATS = "docs.parquet", "signatures.u32", "part_stats.json"
PART_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("sentences", pa.list_(pa.string())),
        ("lang", pa.string()),
        ("digest", pa.binary(16)),
    ]
)
CORPUS_SCHEMA = pa.schema(
    [("id", pa.string()), ("text", pa.string()), ("sentences", pa.list_(pa.string())), ("lang", pa.string())]
)


@dataclass
class Chunk:
    """What a worker returns for one chunk: the kept documents and the counts of every step."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    sentences: list[list[str]] = field(default_factory=list)
    langs: list[str] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    sigs: np.ndarray | None = None
    num_docs_in: int = 0
    num_chars_in: int = 0
    # Documents and characters that came out of each PART_STEPS step.
    docs_out: list[int] = field(default_factory=lambda: [0] * len(PART_STEPS))
    chars_out: list[int] = field(default_factory=lambda: [0] * len(PART_STEPS))
    detected: Counter = field(default_factory=Counter)
    # Position in the chunk of each kept document, so the parent can tell which file it came from.
    kept_pos: list[int] = field(default_factory=list)


def _first_failure(cfg: DataConfig, text: str) -> int:
    """Index into PART_STEPS of the first length/quality filter `text` fails, or the language step."""
    n = len(text)
    if n < cfg.min_chars:
        return 1
    if n > cfg.max_chars:
        return 2
    num_words = len(words(text))
    if num_words < cfg.min_words:
        return 3
    if num_words > cfg.max_words:
        return 4
    if alpha_ratio(text) < cfg.min_alpha_ratio:
        return 5
    if repeated_line_ratio(text) > cfg.max_repeated_line_ratio:
        return 6
    return 7


def process_chunk(cfg: DataConfig, docs: list[tuple[str, str]]) -> Chunk:
    """Normalise, filter, identify the language of, split and sign one chunk of `(id, raw text)`."""
    detector = langid.get_detector(langid.candidates(cfg.languages), cfg.langid_accuracy)
    keep = frozenset(cfg.languages)
    out = Chunk(num_docs_in=len(docs))
    for pos, (doc_id, raw) in enumerate(docs):
        out.num_chars_in += len(raw)
        text = normalize_text(raw, cfg.normalization, cfg.lowercase)
        num_passed = 0 if not text else _first_failure(cfg, text)
        lang = langid.UNKNOWN
        if num_passed == PART_STEPS.index("language"):
            lang, score, top = langid.detect(detector, text, keep)
            out.detected[top] += 1
            if score >= cfg.langid_threshold or not keep:
                num_passed = len(PART_STEPS)
        for k in range(num_passed):
            out.docs_out[k] += 1
            out.chars_out[k] += len(text)
        if num_passed < len(PART_STEPS):
            continue
        out.kept_pos.append(pos)
        out.ids.append(doc_id)
        out.texts.append(text)
        out.sentences.append(split_sentences(text, lang))
        out.langs.append(lang)
        out.digests.append(text_digest(text))
    if cfg.dedup.near:
        out.sigs = signatures(out.texts, cfg.dedup)
    return out


_WORKER_CFG: DataConfig | None = None


def _init_worker(cfg: DataConfig) -> None:
    global _WORKER_CFG
    _WORKER_CFG = cfg
    # Already built when the pool forked from the parent; built here under spawn.
    langid.get_detector(langid.candidates(cfg.languages), cfg.langid_accuracy)


def _worker(docs: list[tuple[str, str]]) -> Chunk:
    assert _WORKER_CFG is not None, "worker used before _init_worker"
    return process_chunk(_WORKER_CFG, docs)


def _chunks(cfg: DataConfig, files: list[Path], counter: DecodeCounter) -> Iterator[tuple[list[int], list]]:
    """(file index of each document, [(id, raw text)]) in fixed-size chunks across all files in order.

    An input file with no documents is an error.
    """
    chunk: list[tuple[str, str]] = []
    file_idx: list[int] = []
    for i, path in enumerate(files):
        num_docs = 0
        for doc in read_documents(path, cfg, counter):
            num_docs += 1
            chunk.append(doc)
            file_idx.append(i)
            if len(chunk) == CHUNK_DOCS:
                yield file_idx, chunk
                chunk, file_idx = [], []
        if num_docs == 0:
            skipped = (
                f" ({counter.num_skipped_lines} undecodable lines skipped so far)"
                if counter.num_skipped_lines
                else ""
            )
            raise DataError(
                f"{path}: contains no documents{skipped}; remove it from data.inputs "
                "or check data.txt_document / data.text_field"
            )
    if chunk:
        yield file_idx, chunk


def _map_ordered(
    cfg: DataConfig, chunks: Iterable[tuple[list[int], list]]
) -> Iterator[tuple[list[int], Chunk]]:
    """process_chunk over `chunks`, in order, in `cfg.num_proc` processes with a bounded window."""
    if cfg.num_proc == 1:
        for file_idx, chunk in chunks:
            yield file_idx, process_chunk(cfg, chunk)
        return
    # Build the detector (about 2-6 s of model loading) and the normaliser's translate table (about
    # 1 s) here, so forked workers inherit them instead of each building its own.
    langid.get_detector(langid.candidates(cfg.languages), cfg.langid_accuracy)
    normalize_text("\x00", cfg.normalization)
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(cfg.num_proc, initializer=_init_worker, initargs=(cfg,)) as pool:
        pending: deque = deque()
        for file_idx, chunk in chunks:
            pending.append((file_idx, pool.apply_async(_worker, (chunk,))))
            if len(pending) >= CHUNKS_IN_FLIGHT * cfg.num_proc:
                file_idx, res = pending.popleft()
                yield file_idx, res.get()
        while pending:
            file_idx, res = pending.popleft()
            yield file_idx, res.get()


def _step_rows(counts: list[tuple[str, int, int]]) -> list[dict]:
    """[(step, docs out, chars out)] with the input first -> one dict per step with in, out and removed."""
    rows = []
    for (_, d_in, c_in), (step, d_out, c_out) in zip(counts, counts[1:]):
        rows.append(
            {
                "step": step,
                "documents_in": d_in,
                "documents_out": d_out,
                "documents_removed": d_in - d_out,
                "characters_in": c_in,
                "characters_out": c_out,
                "characters_removed": c_in - c_out,
            }
        )
    return rows


def run_part(cfg: DataConfig, files: list[Path], run: StageRun) -> None:
    """Read, normalise, filter, language-ID, sentence-split and sign one part's files into `run.work_dir`."""
    counter = DecodeCounter()
    total = Chunk()
    num_kept = 0
    kept_per_file = [0] * len(files)
    writer = pq.ParquetWriter(run.work_dir / DOCS_FILE, PART_SCHEMA, compression="zstd")
    try:
        with open(run.work_dir / SIGS_FILE, "wb") as sig_file, run.timed("part_s"):
            for file_idx, res in _map_ordered(cfg, _chunks(cfg, files, counter)):
                for pos in res.kept_pos:
                    kept_per_file[file_idx[pos]] += 1
                total.num_docs_in += res.num_docs_in
                total.num_chars_in += res.num_chars_in
                total.docs_out = [a + b for a, b in zip(total.docs_out, res.docs_out)]
                total.chars_out = [a + b for a, b in zip(total.chars_out, res.chars_out)]
                total.detected.update(res.detected)
                if res.ids:
                    writer.write_table(
                        pa.table(
                            {
                                "id": res.ids,
                                "text": res.texts,
                                "sentences": res.sentences,
                                "lang": res.langs,
                                "digest": res.digests,
                            },
                            schema=PART_SCHEMA,
                        )
                    )
                    num_kept += len(res.ids)
                if res.sigs is not None:
                    sig_file.write(res.sigs.tobytes())
    finally:
        writer.close()
    assert num_kept == total.docs_out[-1], "kept documents and step counts disagree"
    stats = {
        "files": [str(f) for f in files],
        # Kept documents per file, in file order: the merge uses them to restore the recipe's file order.
        "kept_per_file": kept_per_file,
        "documents_in": total.num_docs_in,
        "characters_in": total.num_chars_in,
        "documents_out": total.docs_out,
        "characters_out": total.chars_out,
        "skipped_undecodable_lines": counter.num_skipped_lines,
        "languages_detected": dict(sorted(total.detected.items())),
    }
    write_json_atomic(run.work_dir / PART_STATS, stats)
    run.counts.update(
        documents_in=total.num_docs_in,
        documents_out=num_kept,
        skipped_undecodable_lines=counter.num_skipped_lines,
    )
    info(f"prepare: part read {total.num_docs_in:,} documents, kept {num_kept:,} before dedup")


def _part_rows(part_dir: Path, num_docs: int, cfg: DataConfig) -> Iterator[tuple]:
    """(id, text, sentences, lang, digest, signature or None) of a part's documents, in order."""
    sigs = None
    if cfg.dedup.near and num_docs:
        sigs = np.memmap(
            part_dir / SIGS_FILE, dtype=np.uint32, mode="r", shape=(num_docs, cfg.dedup.num_perm)
        )
    row = 0
    for batch in pq.ParquetFile(part_dir / DOCS_FILE).iter_batches(batch_size=CHUNK_DOCS):
        cols = batch.to_pydict()
        for i in range(len(cols["id"])):
            yield (
                cols["id"][i],
                cols["text"][i],
                cols["sentences"][i],
                cols["lang"][i],
                cols["digest"][i],
                sigs[row] if sigs is not None else None,
            )
            row += 1
    assert row == num_docs, f"{part_dir}: {row} documents but part_stats says {num_docs}"


def _global_order(cfg: DataConfig, part_dirs: list[Path], part_stats: list[dict]) -> Iterator[tuple]:
    """Every part's documents in the recipe's file order.

    kompakt/pipeline.py gives part i the files `files[i::num_shards]`, so file j of the recipe is file
    j // n of part j % n; taking one file at a time from each part in turn restores the order a
    single part would have read. Which copy of a duplicate survives then does not depend on num_shards.
    """
    rows = [_part_rows(d, s["documents_out"][-1], cfg) for d, s in zip(part_dirs, part_stats)]
    for j in range(max((len(s["kept_per_file"]) for s in part_stats), default=0)):
        for p, stats in enumerate(part_stats):
            if j < len(stats["kept_per_file"]):
                yield from islice(rows[p], stats["kept_per_file"][j])
    for p, it in enumerate(rows):  # every row was consumed, and the part's own count check ran
        assert next(it, None) is None, f"{part_dirs[p]}: more documents than kept_per_file says"


class _ShardWriter:
    """Writes kept documents to corpus/part-NNNNN.parquet, `docs_per_shard` rows each."""

    def __init__(self, out_dir: Path, docs_per_shard: int) -> None:
        self.out_dir, self.docs_per_shard = out_dir, docs_per_shard
        out_dir.mkdir(parents=True)
        self.cols: dict[str, list] = {name: [] for name in CORPUS_SCHEMA.names}
        self.num_shards = 0

    def add(self, doc_id: str, text: str, sentences: list[str], lang: str) -> None:
        for name, value in zip(CORPUS_SCHEMA.names, (doc_id, text, sentences, lang)):
            self.cols[name].append(value)
        if len(self.cols["id"]) == self.docs_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.cols["id"]:
            return
        pq.write_table(
            pa.table(self.cols, schema=CORPUS_SCHEMA),
            self.out_dir / f"part-{self.num_shards:05d}.parquet",
            compression="zstd",
        )
        self.num_shards += 1
        self.cols = {name: [] for name in CORPUS_SCHEMA.names}


def merge(cfg: DataConfig, part_dirs: list[Path], run: StageRun) -> None:
    """Deduplicate all parts in global order and write `corpus/*.parquet` and `stats.json`."""
    part_stats = [json.loads((d / PART_STATS).read_text(encoding="utf-8")) for d in part_dirs]
    num_docs_in = sum(s["documents_in"] for s in part_stats)
    if num_docs_in == 0:
        raise DataError(
            "data.inputs: the corpus has no documents; check the input files and data.txt_document"
        )
    docs_out = [sum(s["documents_out"][k] for s in part_stats) for k in range(len(PART_STEPS))]
    chars_out = [sum(s["characters_out"][k] for s in part_stats) for k in range(len(PART_STEPS))]
    counts = [
        ("input", num_docs_in, sum(s["characters_in"] for s in part_stats)),
        *zip(PART_STEPS, docs_out, chars_out),
    ]

    seen: set[bytes] = set()
    near = NearDedup(cfg.dedup) if cfg.dedup.near else None
    writer = _ShardWriter(run.work_dir / "corpus", cfg.docs_per_shard)
    removed = {step: [0, 0] for step in DEDUP_STEPS}
    languages: Counter = Counter()
    key = 0
    with run.timed("dedup_s"):
        for doc_id, text, sentences, lang, digest, sig in _global_order(cfg, part_dirs, part_stats):
            key += 1
            if cfg.dedup.exact:
                if digest in seen:
                    removed["exact_dedup"][0] += 1
                    removed["exact_dedup"][1] += len(text)
                    continue
                seen.add(digest)
            if near is not None and near.seen(key, sig):
                removed["near_dedup"][0] += 1
                removed["near_dedup"][1] += len(text)
                continue
            writer.add(doc_id, text, sentences, lang)
            languages[lang] += 1
    writer.flush()
    num_docs, num_chars = counts[-1][1:]
    for step in DEDUP_STEPS:
        num_docs -= removed[step][0]
        num_chars -= removed[step][1]
        counts.append((step, num_docs, num_chars))
    steps = _step_rows(counts)
    table(
        "data_prep: documents and characters per step",
        ["step", "docs in", "docs out", "removed", "chars in", "chars out"],
        [
            (
                r["step"],
                r["documents_in"],
                r["documents_out"],
                r["documents_removed"],
                r["characters_in"],
                r["characters_out"],
            )
            for r in steps
        ],
    )
    if num_docs == 0:
        summary = ", ".join(
            f"{r['step']} -{r['documents_removed']:,}" for r in steps if r["documents_removed"]
        )
        raise DataError(
            f"data: all {num_docs_in:,} documents were removed ({summary}); loosen those data.* "
            "filters or check data.languages"
        )
    detected: Counter = Counter()
    for s in part_stats:
        detected.update(s["languages_detected"])
    stats = {
        "documents_in": num_docs_in,
        "documents_out": num_docs,
        "characters_in": counts[0][2],
        "characters_out": num_chars,
        "skipped_undecodable_lines": sum(s["skipped_undecodable_lines"] for s in part_stats),
        "steps": steps,
        "languages": dict(sorted(languages.items())),
        "languages_detected": dict(sorted(detected.items())),
        "num_shards": writer.num_shards,
        "files": [
            s["files"][j]
            for j in range(max(len(s["files"]) for s in part_stats))
            for s in part_stats
            if j < len(s["files"])
        ],
    }
    write_json_atomic(run.work_dir / "stats.json", stats)
    run.counts.update(
        documents_in=num_docs_in,
        documents_out=num_docs,
        characters_in=counts[0][2],
        characters_out=num_chars,
        num_shards=writer.num_shards,
    )
    info(f"prepare: kept {num_docs:,} of {num_docs_in:,} documents in {writer.num_shards} shard(s)")

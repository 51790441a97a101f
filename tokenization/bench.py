"""`kompakt bench data`, tokenisation part: our pre-tokenisation against raw `encode_batch`.

Ours is the whole stage step (read Parquet, encode sentences, word starts, write the training and
held-out shard files and their indexes) with the recipe's `num_proc`; the baseline is `Tokenizer.encode_batch` on the same
documents' texts with the Rust thread pool on, the fastest a user gets with no extra work. Both
use every core, are timed in the same run taking turns, best of a few repeats, and are reported
in MB/s of UTF-8 text; `ratio` is our speed over the baseline's (also in CPU seconds, `cpu_ratio`).
"""

from __future__ import annotations

import gzip
import resource
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kompakt.config import TokenizerConfig, load_recipe
from kompakt.log import info, table
from kompakt.tokenization.corpus import corpus_files, heldout_split, iter_batches, iter_texts, write_corpus
from kompakt.tokenization.pretokenize import DOCS_PER_STEP, _rust_parallelism, pretokenize
from kompakt.tokenization.train import train_tokenizer

# Documents timed with --quick, and training documents then; the full run uses the whole corpus.
QUICK_DOCS = 3000
QUICK_TRAIN_DOCS = 2000
# Best of 5 even with --quick: one quick repeat is about 0.1 s a side on 2 cores, where one burst of
# another process's load moves the ratio by 0.1; 5 repeats cost a second.
NUM_REPEATS_QUICK, NUM_REPEATS = 5, 5


def _raw_documents(files: list[Path], paragraph: bool) -> list[str]:
    """Documents straight from the recipe's text files, for when data_prep cannot run."""
    docs: list[str] = []
    for f in files:
        data = f.read_bytes()
        text = (gzip.decompress(data) if f.suffix == ".gz" else data).decode("utf-8")
        docs += text.split("\n\n") if paragraph else text.splitlines()
    return [d for d in docs if d.strip()]


def _corpus(recipe, work: Path, quick: bool, prepared: Path | Exception | None) -> tuple[list[Path], str]:
    """The corpus files to time, and where they came from.

    `prepared` is the data_prep stage folder the dispatcher (kompakt/bench.py) ensured, or the error
    that stopped it; stage code never runs the pipeline itself.
    """
    try:
        if isinstance(prepared, Exception):
            raise prepared
        if prepared is None:
            raise RuntimeError("data.shard_index is set, so no merged corpus")
        files, source = corpus_files(prepared), f"data_prep output {prepared}"
    except Exception as err:  # data_prep missing or failing must not hide the tokenizer figures
        docs = _raw_documents(recipe.resolve_inputs(), recipe.data.txt_document == "paragraph")
        files = corpus_files(write_corpus(docs, work / "raw"))
        source = (f"raw text of data.inputs with naive sentence splits, because data_prep failed: "
                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    if quick:
        # The first QUICK_DOCS documents, as one Parquet file.
        first = list(iter_batches(files, pq.read_schema(files[0]).names, 0, QUICK_DOCS))
        (work / "quick" / "corpus").mkdir(parents=True)
        pq.write_table(pa.Table.from_batches(first), work / "quick" / "corpus" / "00000.parquet")
        files = corpus_files(work / "quick")
    return files, source


def _cpu_s() -> float:
    """CPU seconds of this process (all threads) and its reaped children (pool workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _best_interleaved(num_repeats: int, *fns) -> list[tuple[float, float]]:
    """Best (wall, CPU) seconds of each function, the functions taking turns in every repeat so that
    a burst of load from another process hits both sides alike."""
    best = [(float("inf"), float("inf"))] * len(fns)
    for i in range(num_repeats):
        for k, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), _cpu_s()
            fn(i)
            wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
            best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
    return best


def pretokenize_throughput(recipe: str, quick: bool = False, prepared: Path | Exception | None = None) -> dict:
    """Time our pre-tokenisation into shards against raw encode_batch on the recipe's corpus."""
    rec = load_recipe(recipe)
    cfg = rec.tokenizer or TokenizerConfig()
    with tempfile.TemporaryDirectory(prefix="kompakt-bench-tok-") as tmp:
        work = Path(tmp)
        files, source = _corpus(rec, work, quick, prepared)
        info(f"bench data: corpus from {source}")
        train_cfg = cfg.model_copy(update={"max_train_docs": QUICK_TRAIN_DOCS}) if quick else cfg
        split = heldout_split(files, cfg.heldout_fraction)
        tok = train_tokenizer(train_cfg, lambda: iter_texts(files, split, heldout=False,
                                                            max_docs=train_cfg.max_train_docs))
        texts = [t for batch in iter_texts(files, 0.0, heldout=False) for t in batch]
        num_bytes = sum(len(t.encode("utf-8")) for t in texts)
        num_repeats = NUM_REPEATS_QUICK if quick else NUM_REPEATS
        index: dict = {}

        def ours(i: int) -> None:
            index.update(pretokenize(tok, files, work / f"tokens-{i}", cfg.docs_per_shard, cfg.num_proc,
                                     split=split, heldout_dir=work / f"heldout-{i}"))

        def baseline(i: int) -> None:
            with _rust_parallelism(True):
                for a in range(0, len(texts), DOCS_PER_STEP):
                    tok.encode_batch(texts[a:a + DOCS_PER_STEP])

        (ours_s, ours_cpu), (base_s, base_cpu) = _best_interleaved(num_repeats, ours, baseline)
    # One process on the Rust thread pool when there are fewer shards than num_proc (pretokenize).
    num_workers = max(1, min(cfg.num_proc, len(index["train"]["shards"])))
    result = {
        "what": "pre-tokenisation into packed shards vs raw tokenizer.encode_batch",
        "corpus": source,
        "kind": cfg.kind,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "num_proc": cfg.num_proc,
        "num_workers": num_workers,
        "num_docs": index["train"]["num_docs"] + index["heldout"]["num_docs"],
        "num_tokens": index["train"]["num_tokens"] + index["heldout"]["num_tokens"],
        "num_mb": num_bytes / 1e6,
        "ours_s": ours_s,
        "baseline_s": base_s,
        "ours_mb_per_s": num_bytes / 1e6 / ours_s,
        "baseline_mb_per_s": num_bytes / 1e6 / base_s,
        "ratio": base_s / ours_s,
        # CPU seconds are less sensitive to other load on the machine than wall time.
        "ours_cpu_s": ours_cpu,
        "baseline_cpu_s": base_cpu,
        "cpu_ratio": base_cpu / ours_cpu,
        "num_repeats": num_repeats,
    }
    table("bench data: pre-tokenisation", ["", "seconds", "MB/s", "CPU seconds"], [
        (f"ours: shards, {num_workers} process(es)", ours_s, result["ours_mb_per_s"], ours_cpu),
        ("baseline: encode_batch", base_s, result["baseline_mb_per_s"], base_cpu),
        ("ratio ours/baseline (speed)", "", result["ratio"], result["cpu_ratio"]),
    ])
    return result

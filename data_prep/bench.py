"""Dedup throughput: documents per second of exact + MinHash signature + LSH on the recipe's corpus.

The baseline, measured in the same run on the same documents, is the textbook loop: one
`MinHash.update` per shingle, then the same exact-hash and LSH steps. Reading and normalising
are not timed; they are the same for both.
"""

from __future__ import annotations

import time
from itertools import islice

import numpy as np
from datasketch import MinHash

from kompakt.config import load_recipe
from kompakt.data_prep.dedup import SCHEME, NearDedup, shingles, signatures, text_digest
from kompakt.data_prep.normalize import normalize_text
from kompakt.readers import DecodeCounter, read_documents
from kompakt.log import table

# Documents measured: the whole demo corpus (about 19k) or a quick smoke-test slice.
FULL_DOCS, QUICK_DOCS = 50_000, 2_000
# The per-shingle baseline is about 4x slower, so it runs on a slice of the same documents.
BASELINE_DOCS, QUICK_BASELINE_DOCS = 3_000, 500


def _dedup(texts: list[str], sigs: np.ndarray, cfg) -> int:
    seen: set[bytes] = set()
    near = NearDedup(cfg)
    num_removed = 0
    for i, text in enumerate(texts):
        digest = text_digest(text)
        if digest in seen or near.seen(i, sigs[i]):
            num_removed += 1
            continue
        seen.add(digest)
    return num_removed


def _per_shingle_signatures(texts: list[str], cfg) -> np.ndarray:
    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint32)
    for i, text in enumerate(texts):
        mh = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME)
        for sh in shingles(text, cfg.shingle_size):
            mh.update(sh)
        out[i] = mh.hashvalues
    return out


def dedup_rate(recipe: str, quick: bool = False) -> dict:
    """Documents/s of the dedup step on the recipe's corpus, against per-shingle MinHash updates."""
    r = load_recipe(recipe)
    cfg = r.data
    num_docs = QUICK_DOCS if quick else FULL_DOCS
    counter = DecodeCounter()
    docs = (text for path in r.resolve_inputs() for _, text in read_documents(path, cfg, counter))
    texts = [
        t for t in (normalize_text(d, cfg.normalization, cfg.lowercase) for d in islice(docs, num_docs)) if t
    ]

    t0 = time.perf_counter()
    num_removed = _dedup(texts, signatures(texts, cfg.dedup), cfg.dedup)
    ours_s = time.perf_counter() - t0

    base = texts[: QUICK_BASELINE_DOCS if quick else BASELINE_DOCS]
    t0 = time.perf_counter()
    _dedup(base, _per_shingle_signatures(base, cfg.dedup), cfg.dedup)
    base_s = time.perf_counter() - t0

    result = {
        "docs_per_s": len(texts) / ours_s,
        "baseline_docs_per_s": len(base) / base_s,
        "num_docs": len(texts),
        "num_baseline_docs": len(base),
        "removed": num_removed,
        "num_perm": cfg.dedup.num_perm,
        "shingle_size": cfg.dedup.shingle_size,
    }
    result["ratio"] = result["docs_per_s"] / result["baseline_docs_per_s"]
    table(
        "dedup: exact + MinHash + LSH",
        ["method", "docs", "docs/s"],
        [
            ("MinHash.bulk (ours)", len(texts), result["docs_per_s"]),
            ("per-shingle update (baseline)", len(base), result["baseline_docs_per_s"]),
            ("ratio", "", result["ratio"]),
        ],
    )
    return result

"""Exact and near-duplicate detection.

Exact: a 128-bit BLAKE2b digest of the normalised text (a collision among 10^10 documents has a
probability of about 10^-19). Near: MinHash signatures of word shingles (datasketch, "affine32"
scheme, uint32 values) indexed by MinHash LSH. An LSH hit is only a candidate; a document is
dropped when its estimated Jaccard similarity with a candidate reaches `jaccard_threshold`, so
the threshold means what it says and unrelated documents that collide in one band survive.

Signatures are computed in the workers (`signatures`); the index runs in one process over all
parts in global order (`NearDedup`), so which copy survives (the first) never depends on
`num_proc` or `num_shards`.
"""

from __future__ import annotations

import hashlib

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from kompakt.config import DedupConfig
from kompakt.data_prep.normalize import shingle_tokens

SCHEME = "affine32"


def text_digest(text: str) -> bytes:
    """16-byte digest of a normalised document, the key of exact dedup."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, size: int) -> list[bytes]:
    """The document's distinct `size`-word shingles (the whole token list when it is shorter)."""
    tokens = shingle_tokens(text)
    if len(tokens) <= size:
        return [" ".join(tokens).encode("utf-8")]
    return list({" ".join(tokens[i : i + size]).encode("utf-8") for i in range(len(tokens) - size + 1)})


def signatures(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """MinHash signatures, uint32 of shape (len(texts), num_perm).

    `MinHash.bulk` shares one permutation set across documents and hashes each document's shingles
    in one vectorised `update_batch`; with the LSH step included the dedup runs about 4x faster than
    with one `update` per shingle (`kompakt bench data`, demo corpus).
    """
    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint32)
    if not texts:
        return out
    mhs = MinHash.bulk(
        [shingles(t, cfg.shingle_size) for t in texts], num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME
    )
    for i, mh in enumerate(mhs):
        out[i] = mh.hashvalues
    return out


class NearDedup:
    """A MinHash LSH index that answers "is this a near duplicate of a document kept before?"."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.lsh = MinHashLSH(threshold=cfg.jaccard_threshold, num_perm=cfg.num_perm)
        # Signatures of kept documents by key, for verifying LSH candidates (num_perm * 4 bytes each).
        self.kept: dict[int, np.ndarray] = {}

    def seen(self, key: int, sig: np.ndarray) -> bool:
        """True when `sig` is within the threshold of a kept document; otherwise index it under `key`."""
        mh = LeanMinHash(seed=self.cfg.seed, hashvalues=sig, scheme=SCHEME)
        for cand in self.lsh.query(mh):
            if float(np.mean(self.kept[cand] == sig)) >= self.cfg.jaccard_threshold:
                return True
        self.lsh.insert(key, mh, check_duplication=False)
        self.kept[key] = sig
        return False

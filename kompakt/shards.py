"""Packed token shards: the contract between tokenization (writer) and pretraining (reader).

A shard set is a folder with `index.json` and, per shard `NNNNN`:

- `NNNNN.tokens`        flat token ids, no special tokens, dtype uint16 if the vocabulary fits
                        in 65,536 ids else uint32 (raw little-endian, read with `np.memmap`)
- `NNNNN.wordstart`     uint8, 1 where a token begins a whole word (for whole-word and span masking)
- `NNNNN.docs.npy`      int64 token offsets of documents, length num_docs + 1, starting at 0
- `NNNNN.sents.npy`     int64 token offsets of sentences, length num_sents + 1; every document
                        offset is also a sentence offset

Readers check every file's length against the index, so a truncated shard is a clear error rather
than silently short data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from kompakt.errors import DataError
from kompakt.runs import write_json_atomic

INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Write one shard: documents arrive as lists of sentences, each (token ids, word-start flags)."""

    def __init__(self, folder: Path, shard_id: int, vocab_size: int):
        self.folder = Path(folder)
        self.name = f"{shard_id:05d}"
        self.dtype = token_dtype(vocab_size)
        self._tok = open(self.folder / f"{self.name}.tokens", "wb")
        self._ws = open(self.folder / f"{self.name}.wordstart", "wb")
        self.doc_offsets = [0]
        self.sent_offsets = [0]
        self.num_tokens = 0

    def add_document(self, sentences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
        """Append one document; empty sentences are dropped, an empty document is skipped."""
        for ids, starts in sentences:
            if len(ids) == 0:
                continue
            assert len(ids) == len(starts), "every token needs a word-start flag"
            self._tok.write(np.asarray(ids, dtype=self.dtype).tobytes())
            self._ws.write(np.asarray(starts, dtype=np.uint8).tobytes())
            self.num_tokens += len(ids)
            self.sent_offsets.append(self.num_tokens)
        if self.num_tokens > self.doc_offsets[-1]:
            self.doc_offsets.append(self.num_tokens)

    def close(self) -> dict:
        """Flush the files and return this shard's entry for the index."""
        self._tok.close()
        self._ws.close()
        np.save(self.folder / f"{self.name}.docs.npy", np.asarray(self.doc_offsets, dtype=np.int64))
        np.save(self.folder / f"{self.name}.sents.npy", np.asarray(self.sent_offsets, dtype=np.int64))
        return {"name": self.name, "num_tokens": self.num_tokens, "num_docs": len(self.doc_offsets) - 1,
                "num_sentences": len(self.sent_offsets) - 1}


def write_index(folder: Path, shards: Iterable[dict], vocab_size: int, **extra) -> dict:
    shards = sorted(shards, key=lambda s: s["name"])
    index = {
        "format": "kompakt-token-shards-v1",
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": vocab_size,
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_docs": sum(s["num_docs"] for s in shards),
        "num_sentences": sum(s["num_sentences"] for s in shards),
        "shards": shards,
        **extra,
    }
    write_json_atomic(Path(folder) / INDEX, index)
    return index


@dataclass
class Shard:
    tokens: np.ndarray        # (num_tokens,) uint16/uint32 memmap
    word_starts: np.ndarray   # (num_tokens,) uint8 memmap
    doc_offsets: np.ndarray   # (num_docs + 1,) int64
    sent_offsets: np.ndarray  # (num_sents + 1,) int64

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, word starts and sentence offsets (relative to the document, with 0 and its length)."""
        a, b = int(self.doc_offsets[i]), int(self.doc_offsets[i + 1])
        lo, hi = np.searchsorted(self.sent_offsets, [a, b])
        return self.tokens[a:b], self.word_starts[a:b], self.sent_offsets[lo:hi + 1] - a


class TokenShards:
    """Read a shard folder through memory maps, checking sizes against the index."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DataError(f"{self.folder}: no readable {INDEX}; re-run `kompakt tokenizer` to write the shards") from None
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["vocab_size"])
        self.shards = [self._open(s) for s in self.index["shards"]]
        # Global document numbering: doc g lives in shard k at local index g - doc_starts[k].
        self.doc_starts = np.cumsum([0] + [s.num_docs for s in self.shards])

    def _open(self, entry: dict) -> Shard:
        name, n = entry["name"], int(entry["num_tokens"])
        tok_path, ws_path = self.folder / f"{name}.tokens", self.folder / f"{name}.wordstart"
        for path, itemsize in ((tok_path, self.dtype.itemsize), (ws_path, 1)):
            size = path.stat().st_size if path.exists() else -1
            if size != n * itemsize:
                raise DataError(f"{path}: expected {n * itemsize} bytes, found {size}; the shard is truncated "
                                f"or missing, re-run `kompakt tokenizer --force`")
        try:
            docs = np.load(self.folder / f"{name}.docs.npy")
            sents = np.load(self.folder / f"{name}.sents.npy")
        except (OSError, ValueError):
            raise DataError(f"{self.folder}/{name}: offsets are missing or corrupt; re-run `kompakt tokenizer --force`") from None
        if len(docs) != entry["num_docs"] + 1 or docs[-1] != n or len(sents) != entry["num_sentences"] + 1:
            raise DataError(f"{self.folder}/{name}: offsets do not match {INDEX}; re-run `kompakt tokenizer --force`")
        tokens = np.memmap(tok_path, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
        ws = np.memmap(ws_path, dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
        return Shard(tokens, ws, docs, sents)

    @property
    def num_docs(self) -> int:
        return int(self.doc_starts[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.index["num_tokens"])

    def document(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global document `g`: (tokens, word_starts, sentence offsets within it)."""
        k = int(np.searchsorted(self.doc_starts, g, side="right") - 1)
        return self.shards[k].document(g - int(self.doc_starts[k]))

    def doc_lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(s.doc_offsets) for s in self.shards]) if self.shards else np.zeros(0, np.int64)

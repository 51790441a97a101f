"""Pre-tokenisation: corpus sentences -> packed token shards (kompakt/shards.py).

This is the hot path. Sentences go to `Tokenizer.encode_batch` in large batches (Rust), the
ids and word ids of a whole batch become two numpy arrays in one pass each, word starts are a
vectorised comparison of neighbouring word ids, and a batch goes to the shard with one write per file.

Shard k holds global documents `[k * docs_per_shard, (k + 1) * docs_per_shard)`, whatever
`num_proc` is; each process writes a contiguous run of shards, so the output is byte-identical
for any `num_proc`.

Word starts: 1 on the first token of every pre-tokenizer word (`Encoding.word_ids`): for
WordPiece a whitespace- or punctuation-separated word, for Unigram a `▁`-marked word, for
byte-level BPE a word of the GPT-2 split pattern. For Chinese with `chinese_chars`, BERT's
normaliser makes every CJK character its own word, so every character is a word start; the
word lexicon (lexicon.txt) is left to lattice pretraining, which matches words itself.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from itertools import chain
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from kompakt.shards import ShardWriter, write_index
from kompakt.tokenization.corpus import iter_batches, row_counts

# Documents per read-and-encode step: about 10k sentences of Norwegian, so encode_batch has
# enough work to amortise its call overhead while one step stays a few MB.
DOCS_PER_STEP = 1024


class BatchShardWriter(ShardWriter):
    """A ShardWriter that appends a whole batch of documents with two writes and no per-sentence Python."""

    def add_documents(self, ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                      sents_per_doc: np.ndarray) -> None:
        """Append documents given flat ids and word starts, tokens per sentence and sentences per document.

        Same result as `add_document` once per document: empty sentences and documents are dropped.
        """
        assert len(ids) == len(starts) == int(lengths.sum()), "ids, word starts and lengths disagree"
        assert int(sents_per_doc.sum()) == len(lengths), "sentence counts and lengths disagree"
        ends = np.cumsum(lengths)
        bounds = np.concatenate([[0], ends])
        doc_sent = np.concatenate([[0], np.cumsum(sents_per_doc)])
        doc_ends = bounds[doc_sent[1:]]
        nonempty_docs = doc_ends > bounds[doc_sent[:-1]]
        self._tok.write(ids.astype(self.dtype, copy=False).tobytes())
        self._ws.write(starts.astype(np.uint8, copy=False).tobytes())
        self.sent_offsets.extend((self.num_tokens + ends[lengths > 0]).tolist())
        self.doc_offsets.extend((self.num_tokens + doc_ends[nonempty_docs]).tolist())
        self.num_tokens += len(ids)


def encode_sentences(tok: Tokenizer, sentences: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode sentences without special tokens.

    Returns (ids, word_starts, lengths): flat uint32 ids and uint8 word-start flags of all
    sentences back to back, and int64 token counts per sentence.
    """
    encs = tok.encode_batch(sentences, add_special_tokens=False)
    lengths = np.fromiter(map(len, encs), dtype=np.int64, count=len(encs))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.uint32, count=total)
    try:
        wids = np.fromiter(chain.from_iterable(e.word_ids for e in encs), dtype=np.int64, count=total)
    except TypeError:
        # A token without a word (an added token such as [unused3] typed into the text) starts one.
        wids = np.fromiter((-2 - i if w is None else w
                            for i, w in enumerate(chain.from_iterable(e.word_ids for e in encs))),
                           dtype=np.int64, count=total)
    starts = np.ones(total, dtype=np.uint8)
    if total:
        starts[1:] = wids[1:] != wids[:-1]
        # Word ids restart at 0 in every sentence, so a sentence's first token is set explicitly.
        sent_starts = np.cumsum(lengths) - lengths
        starts[sent_starts[lengths > 0]] = 1
    return ids, starts, lengths


def _iter_documents(tok: Tokenizer, files: Sequence[Path], start: int, stop: int
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per read step: (ids, starts, sentence lengths, sentences per document) for docs [start, stop)."""
    for batch in iter_batches(files, ["sentences"], start, stop, batch_rows=DOCS_PER_STEP):
        col = batch.column(0)
        sentences = col.flatten().to_pylist()
        offsets = col.offsets.to_numpy()
        # A null row has equal start and end offsets: an empty document, which the writer skips.
        sents_per_doc = np.diff(offsets)
        ids, starts, lengths = encode_sentences(tok, sentences)
        yield ids, starts, lengths, sents_per_doc


def _write_shards(tokenizer_json: str, files: list[Path], shard_ids: list[int], docs_per_shard: int,
                  num_docs: int, out_dir: Path, vocab_size: int, rust_threads: bool) -> list[dict]:
    """Write shards `shard_ids` (contiguous); one process's share of the work."""
    with _rust_parallelism(rust_threads):
        tok = Tokenizer.from_str(tokenizer_json)
        entries = []
        for k in shard_ids:
            writer = BatchShardWriter(out_dir, k, vocab_size)
            a, b = k * docs_per_shard, min((k + 1) * docs_per_shard, num_docs)
            for ids, starts, lengths, sents_per_doc in _iter_documents(tok, files, a, b):
                writer.add_documents(ids, starts, lengths, sents_per_doc)
            entries.append(writer.close())
        return entries


@contextmanager
def _rust_parallelism(enabled: bool) -> Iterator[None]:
    """Let encode_batch use its Rust thread pool (one process) or not (several processes share the cores)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def pretokenize(tok: Tokenizer, files: Sequence[Path], out_dir: Path, docs_per_shard: int,
                num_proc: int = 1, **index_extra) -> dict:
    """Tokenise every corpus document into `out_dir` (shards and index.json); returns the index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list(files)
    num_docs = sum(row_counts(files))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    num_shards = max(1, -(-num_docs // docs_per_shard))
    num_workers = max(1, min(num_proc, num_shards))
    # Contiguous runs of shard ids, one per process, as even as the shard count allows.
    bounds = np.linspace(0, num_shards, num_workers + 1).round().astype(int)
    parts = [list(range(bounds[i], bounds[i + 1])) for i in range(num_workers)]
    args = (tok.to_str(), files)
    if num_workers == 1:
        entries = _write_shards(*args, parts[0], docs_per_shard, num_docs, out_dir, vocab_size, True)
    else:
        # fork where there is one: a spawned child re-imports the parent's main module (seconds when
        # that pulls in transformers and torch). tokenizers disables its Rust pool in forked children,
        # and the children run with it off anyway.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(num_workers, mp_context=get_context(method)) as pool:
            futures = [pool.submit(_write_shards, *args, p, docs_per_shard, num_docs, out_dir, vocab_size, False)
                       for p in parts]
            entries = [e for f in futures for e in f.result()]
    return write_index(out_dir, entries, vocab_size, docs_per_shard=docs_per_shard, **index_extra)

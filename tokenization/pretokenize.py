"""Pre-tokenisation: corpus sentences -> packed token shards (kompakt/shards.py).

This is the hot path. Sentences go to `Tokenizer.encode_batch_fast` (Rust, no offsets) in large
batches, the ids of a whole batch become one numpy array in one pass, word starts are a table
look-up on those ids, and a batch goes to the shard with one write per file.

Shard k holds global documents `[k * docs_per_shard, (k + 1) * docs_per_shard)`, whatever
`num_proc` is; each process writes a contiguous run of shards, so the output is byte-identical
for any `num_proc`.

Word starts come from the token ids through a per-vocabulary lookup table, not from
`Encoding.word_ids` (which needs offset tracking, about 20% of the encoding time, and one Python
list per sentence): a WordPiece token starts a word unless it is a `##` continuation (the same as
BERT's pre-tokenizer words: whitespace- or punctuation-separated), a Unigram token when it carries
the `▁` marker, a byte-level BPE token when it carries `Ġ` (a space before it, so punctuation
stays with its word, as whole-word masking wants); added and special tokens always start one, and
so does every sentence's first token. For Chinese with `chinese_chars`, BERT's normaliser makes
every CJK character its own word, so every character is a word start; the word lexicon is left to
lattice pretraining, which matches words over the characters itself.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from itertools import chain
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, models

from kompakt.shards import ShardWriter, write_index
from kompakt.tokenization.corpus import iter_batches, row_counts

# Documents per read-and-encode step: about 10k sentences of Norwegian, so encode_batch has
# enough work to amortise its call overhead while one step stays a few MB.
DOCS_PER_STEP = 1024


class BatchShardWriter(ShardWriter):
    """A ShardWriter that appends a whole batch of documents with two writes and no per-sentence Python.

    It writes through ShardWriter's own files and offset lists, so `close()` and the format are
    unchanged; tests/unit/test_tokenization_shards.py checks it gives the same bytes as `add_document`.
    """

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


def word_start_table(tok: Tokenizer) -> np.ndarray:
    """A bool per token id: does this token begin a word (see the module docstring)?"""
    vocab = tok.get_vocab(with_added_tokens=True)
    table = np.ones(len(vocab), dtype=bool)
    model = tok.model
    if isinstance(model, models.WordPiece):
        prefix = model.continuing_subword_prefix
        for token, i in vocab.items():
            table[i] = not token.startswith(prefix)
    else:
        marker = "▁" if isinstance(model, models.Unigram) else "Ġ"
        for token, i in vocab.items():
            table[i] = token.startswith(marker)
    for added in tok.get_added_tokens_decoder().values():
        table[tok.token_to_id(added.content)] = True
    return table


def _encode(tok: Tokenizer, sentences: list[str]) -> list:
    # encode_batch_fast skips offset tracking (tokenizers >= 0.20.2); ids are the same.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return encode(sentences, add_special_tokens=False)


def _flatten(encs: list, starts_table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat uint32 ids, uint8 word-start flags and int64 token counts of encoded sentences."""
    lengths = np.fromiter(map(len, encs), dtype=np.int64, count=len(encs))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.uint32, count=total)
    starts = starts_table[ids].view(np.uint8)
    # A sentence's first token starts a word even without a marker (e.g. "##" after a cut).
    starts[(np.cumsum(lengths) - lengths)[lengths > 0]] = 1
    return ids, starts, lengths


def encode_sentences(tok: Tokenizer, sentences: list[str], starts_table: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode sentences without special tokens.

    Returns (ids, word_starts, lengths): flat uint32 ids and uint8 word-start flags of all
    sentences back to back, and int64 token counts per sentence.
    """
    return _flatten(_encode(tok, sentences), starts_table)


def _iter_documents(tok: Tokenizer, starts_table: np.ndarray, files: Sequence[Path], start: int, stop: int
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per read step: (ids, starts, sentence lengths, sentences per document) for docs [start, stop).

    Reading and encoding of step i+1 run on a helper thread while this thread flattens and writes
    step i: encode_batch releases the GIL inside Rust, so on 2 cores the Python-side work (ids
    to numpy, writing) overlaps the encoding instead of adding to it (about 15% of the wall time).
    """

    def read_and_encode(batch) -> tuple[list, np.ndarray]:
        col = batch.column(0)
        # A null row has equal start and end offsets: an empty document, which the writer skips.
        return _encode(tok, col.flatten().to_pylist()), np.diff(col.offsets.to_numpy())

    batches = iter_batches(files, ["sentences"], start, stop, batch_rows=DOCS_PER_STEP)
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in batches:
            nxt = pool.submit(read_and_encode, batch)
            if pending is not None:
                encs, sents_per_doc = pending.result()
                yield (*_flatten(encs, starts_table), sents_per_doc)
            pending = nxt
        if pending is not None:
            encs, sents_per_doc = pending.result()
            yield (*_flatten(encs, starts_table), sents_per_doc)


def _write_shards(tokenizer_json: str, files: list[Path], shard_ids: list[int], docs_per_shard: int,
                  num_docs: int, out_dir: Path, vocab_size: int, rust_threads: bool) -> list[dict]:
    """Write shards `shard_ids` (contiguous); one process's share of the work."""
    with _rust_parallelism(rust_threads):
        tok = Tokenizer.from_str(tokenizer_json)
        starts_table = word_start_table(tok)
        entries = []
        for k in shard_ids:
            writer = BatchShardWriter(out_dir, k, vocab_size)
            a, b = k * docs_per_shard, min((k + 1) * docs_per_shard, num_docs)
            for ids, starts, lengths, sents_per_doc in _iter_documents(tok, starts_table, files, a, b):
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

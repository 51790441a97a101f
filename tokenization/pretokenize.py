"""Pre-tokenisation: corpus sentences -> packed token shards (kompakt/shards.py).

This is the hot path. Sentences are not encoded one by one: runs of 256 consecutive sentences are
joined with a marker that a private copy of the tokenizer encodes as one token of its own, and the
runs go to `Tokenizer.encode_batch_fast` (Rust, no offsets) in large batches. The marker cuts the
text so that each piece between markers is encoded exactly as that sentence alone would be (every
kind, Chinese included; tests/unit/test_tokenization_shards.py checks it), while `tokenizers`'
per-input cost is paid per run instead of per sentence. The marker positions in the ids give the
sentence lengths; a batch in which some sentence holds the marker character itself is encoded
sentence by sentence instead. The ids of a batch become one numpy array in one pass, word starts
are a table look-up on those ids, and a batch goes to the shard with one write per file.

Held-out documents (`HeldoutSplit`) are written to a second shard set, never to the training one:
shard k of either set holds that set's documents among global documents
`[k * docs_per_shard, (k + 1) * docs_per_shard)`, whatever `num_proc` is; each process writes a
contiguous run of shards, so the output is byte-identical for any `num_proc`.

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

import json
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from kompakt.shards import ShardWriter, write_index
from kompakt.tokenization.corpus import HeldoutSplit, iter_batches, row_counts

# Documents per read-and-encode step: about 10k sentences of Norwegian, so encode_batch has
# enough work to amortise its call overhead while one step stays a few MB.
DOCS_PER_STEP = 1024
# Sentences joined into one input of encode_batch: the per-input cost inside `tokenizers` is large
# (the 3,000 demo documents encode in 87 ms as 3,000 inputs, in 63 ms as 18 runs of 256 sentences,
# baseline encode_batch 106 ms), while 18 inputs per step still keep every Rust thread busy.
SENTENCES_PER_CHUNK = 256


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
    return ids, _word_starts(ids, lengths, starts_table), lengths


def encode_sentences(tok: Tokenizer, sentences: list[str], starts_table: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode sentences without special tokens.

    Returns (ids, word_starts, lengths): flat uint32 ids and uint8 word-start flags of all
    sentences back to back, and int64 token counts per sentence.
    """
    return _flatten(_encode(tok, sentences), starts_table)


# Sentence markers. The general one is an added token, a private-use character (U+E000): added
# tokens cut the text before normalisation. For WordPiece behind BERT's pre-tokenizer, which splits
# at whitespace only around words, the marker is instead a word of its own, " ꙮ " (U+A66E, a
# letter with no case, accents or decomposition that BERT's normaliser keeps) put into the vocabulary:
# a word costs the encoder less than an added-token cut (84 against 92 ms for the 3,000 documents of
# the demo benchmark). A batch in which some sentence holds the marker character is encoded sentence
# by sentence instead, so the shards never depend on the marker.
MARKER = "\ue000"
WORD_MARKER = "\ua66e"


@dataclass(frozen=True)
class _Marker:
    tokenizer: Tokenizer  # a private copy of the tokenizer that knows the marker
    id: int               # the marker's token id
    char: str             # no sentence may contain it
    separator: str        # what joins a document's sentences


def _marked_tokenizer(tok: Tokenizer) -> _Marker:
    """A copy of `tok` that encodes a sentence marker as one token of its own id."""
    if (isinstance(tok.model, models.WordPiece) and isinstance(tok.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
            and (tok.normalizer is None or isinstance(tok.normalizer, normalizers.BertNormalizer))):
        # Past every id, [unusedN] included, so no other token shares it. Spliced into the JSON
        # text rather than parsed and rebuilt: 4 ms less for an 8k vocabulary, a tenth of the fixed cost.
        text = tok.to_str()
        at = text.index('"vocab":{', text.index('"model":')) + len('"vocab":{')
        entry = f"{json.dumps(WORD_MARKER)}:{tok.get_vocab_size(with_added_tokens=True)},"
        marked = Tokenizer.from_str(text[:at] + entry + text[at:])
        return _Marker(marked, marked.token_to_id(WORD_MARKER), WORD_MARKER, f" {WORD_MARKER} ")
    marked = Tokenizer.from_str(tok.to_str())
    marked.add_special_tokens([AddedToken(MARKER, special=True, normalized=False)])
    return _Marker(marked, marked.token_to_id(MARKER), MARKER, MARKER)


def _encode_marked(marker: _Marker, sentences: pa.ListArray) -> tuple[list, np.ndarray] | None:
    """Encode documents' sentences in runs of `SENTENCES_PER_CHUNK` joined by the marker.

    Returns the encodings and the number of sentences in each, or None when a sentence holds the marker.
    """
    flat = sentences.flatten()
    if flat.null_count or (len(flat) and pc.any(pc.match_substring(flat, marker.char)).as_py()):
        return None
    bounds = np.unique(np.append(np.arange(0, len(flat), SENTENCES_PER_CHUNK), len(flat))).astype(np.int32)
    if len(bounds) < 2:
        return [], np.zeros(0, dtype=np.int64)
    runs = pa.ListArray.from_arrays(pa.array(bounds), flat)
    texts = pc.binary_join(runs, marker.separator).to_pylist()
    return marker.tokenizer.encode_batch_fast(texts, add_special_tokens=False), np.diff(bounds).astype(np.int64)


def _split_marked(encs: list, marker_id: int, sents_per_chunk: np.ndarray, starts_table: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, starts, sentence lengths) from encodings of marker-joined runs of sentences, markers dropped."""
    chunk_tokens = np.fromiter(map(len, encs), dtype=np.int64, count=len(encs))
    stream = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.uint32, count=int(chunk_tokens.sum()))
    is_mark = stream == marker_id
    num_marks = np.cumsum(is_mark)
    assert int(num_marks[-1] if len(num_marks) else 0) == int(np.maximum(sents_per_chunk - 1, 0).sum()), \
        "sentence markers and sentence counts disagree"
    # A token's sentence: its run's first sentence plus the markers before it in that run.
    first_sent = np.cumsum(sents_per_chunk) - sents_per_chunk
    marks_before = np.concatenate([[0], num_marks])[np.cumsum(chunk_tokens) - chunk_tokens]
    sent = np.repeat(first_sent - marks_before, chunk_tokens) + num_marks
    keep = ~is_mark
    ids = stream[keep]
    lengths = np.bincount(sent[keep], minlength=int(sents_per_chunk.sum())).astype(np.int64)
    return ids, _word_starts(ids, lengths, starts_table), lengths


def _encode_documents(marker: _Marker, sentences: pa.ListArray, starts_table: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(ids, starts, sentence lengths) of documents of sentences, or None when a sentence holds the marker."""
    encoded = _encode_marked(marker, sentences)
    if encoded is None:
        return None
    encs, sents_per_chunk = encoded
    return _split_marked(encs, marker.id, sents_per_chunk, starts_table)


def _word_starts(ids: np.ndarray, lengths: np.ndarray, starts_table: np.ndarray) -> np.ndarray:
    starts = starts_table[ids].view(np.uint8)
    # A sentence's first token starts a word even without a marker (e.g. "##" after a cut).
    starts[(np.cumsum(lengths) - lengths)[lengths > 0]] = 1
    return starts


def _select(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, sents_per_doc: np.ndarray,
            keep_docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The documents of a batch where `keep_docs` is true, in the same flat form."""
    keep_sents = np.repeat(keep_docs, sents_per_doc)
    keep_tokens = np.repeat(keep_sents, lengths)
    return ids[keep_tokens], starts[keep_tokens], lengths[keep_sents], sents_per_doc[keep_docs]


def _iter_documents(tok: Tokenizer, marker: _Marker, files: Sequence[Path], start: int, stop: int,
                    split: HeldoutSplit | None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per read step for docs [start, stop): (ids, starts, sentence lengths, sentences per document,
    held-out flag per document).

    Encoding of step i+1 runs on a helper thread while this thread reads, flattens and writes step
    i: encode_batch releases the GIL inside Rust, so the Python-side work (ids to numpy, the held-out
    hashes, writing) overlaps the encoding instead of adding to it.
    """

    def encode(col: pa.ListArray) -> tuple[list, np.ndarray | None]:
        encoded = _encode_marked(marker, col)
        return encoded if encoded is not None else (_encode(tok, col.flatten().to_pylist()), None)

    def finish(batch, encoded: tuple[list, np.ndarray | None]) -> tuple:
        col = batch.column(1)
        # A null row has equal start and end offsets: an empty document, which the writer skips.
        sents_per_doc = np.diff(col.offsets.to_numpy())
        encs, sents_per_chunk = encoded
        flat = (_flatten(encs, starts_table) if sents_per_chunk is None
                else _split_marked(encs, marker.id, sents_per_chunk, starts_table))
        heldout = split.mask(batch.column(0).to_pylist()) if split is not None else np.zeros(len(col), bool)
        return (*flat, sents_per_doc, heldout)

    batches = iter_batches(files, ["id", "sentences"], start, stop, batch_rows=DOCS_PER_STEP)
    starts_table = None
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in batches:
            nxt = (batch, pool.submit(encode, batch.column(1)))
            if starts_table is None:
                # Built while the first batch encodes: 3 ms for the demo's 8k vocabulary, all overlapped.
                starts_table = word_start_table(tok)
            if pending is not None:
                yield finish(pending[0], pending[1].result())
            pending = nxt
        if pending is not None:
            yield finish(pending[0], pending[1].result())


def _write_shards(tokenizer: Tokenizer | str, files: list[Path], shard_ids: list[int], docs_per_shard: int,
                  num_docs: int, out_dirs: dict[str, Path], split: HeldoutSplit | None, vocab_size: int,
                  rust_threads: bool) -> dict[str, list[dict]]:
    """Write shards `shard_ids` (contiguous) of every set in `out_dirs`; one process's share of the work.

    `tokenizer` is the object itself in the parent process, its JSON in a pool worker.
    """
    with _rust_parallelism(rust_threads):
        tok = Tokenizer.from_str(tokenizer) if isinstance(tokenizer, str) else tokenizer
        marker = _marked_tokenizer(tok)
        entries: dict[str, list[dict]] = {name: [] for name in out_dirs}
        for k in shard_ids:
            writers = {name: BatchShardWriter(d, k, vocab_size) for name, d in out_dirs.items()}
            a, b = k * docs_per_shard, min((k + 1) * docs_per_shard, num_docs)
            for ids, starts, lengths, sents_per_doc, heldout in _iter_documents(
                    tok, marker, files, a, b, split):
                writers["train"].add_documents(*_select(ids, starts, lengths, sents_per_doc, ~heldout))
                if "heldout" in writers:
                    writers["heldout"].add_documents(*_select(ids, starts, lengths, sents_per_doc, heldout))
            for name, w in writers.items():
                entries[name].append(w.close())
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
                num_proc: int = 1, split: HeldoutSplit | None = None, heldout_dir: Path | None = None) -> dict[str, dict]:
    """Tokenise the corpus into shards; returns each set's index by name ("train", and "heldout").

    Without `split` every document goes to `out_dir`. With it, the training documents go to
    `out_dir` and the held-out ones to `heldout_dir`; each index.json names its `split` and the
    `heldout_fraction`.
    """
    if (split is None) != (heldout_dir is None):
        raise TypeError("pretokenize: give both split and heldout_dir, or neither")
    out_dirs = {"train": Path(out_dir)}
    if heldout_dir is not None:
        out_dirs["heldout"] = Path(heldout_dir)
    for d in out_dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    files = list(files)
    num_docs = sum(row_counts(files))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    num_shards = max(1, -(-num_docs // docs_per_shard))
    num_workers = max(1, min(num_proc, num_shards))
    # Contiguous runs of shard ids, one per process, as even as the shard count allows.
    bounds = np.linspace(0, num_shards, num_workers + 1).round().astype(int)
    parts = [list(range(bounds[i], bounds[i + 1])) for i in range(num_workers)]
    rest = (docs_per_shard, num_docs, out_dirs, split, vocab_size)
    if num_workers == 1:
        entries = _write_shards(tok, files, parts[0], *rest, True)
    else:
        # fork where there is one: a spawned child re-imports the parent's main module (seconds when
        # that pulls in transformers and torch). tokenizers disables its Rust pool in forked children,
        # and the children run with it off anyway.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(num_workers, mp_context=get_context(method)) as pool:
            tok_json = tok.to_str()
            futures = [pool.submit(_write_shards, tok_json, files, p, *rest, False) for p in parts]
            results = [f.result() for f in futures]
        entries = {name: [e for r in results for e in r[name]] for name in out_dirs}
    fraction = split.fraction if split is not None else 0.0
    return {name: write_index(d, entries[name], vocab_size, docs_per_shard=docs_per_shard, split=name,
                              heldout_fraction=fraction)
            for name, d in out_dirs.items()}

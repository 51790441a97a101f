"""Pre-tokenisation into shards: the batch writer, whole-document encoding, the held-out split,
num_proc independence, uint32 ids, corpus errors."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kompakt.config import TokenizerConfig
from kompakt.errors import DataError
from kompakt.shards import ShardWriter, TokenShards, write_index
from kompakt.tokenization.corpus import (HeldoutSplit, corpus_files, heldout_split, is_heldout, iter_batches, iter_texts,
                                         naive_sentences, write_corpus)
from kompakt.tokenization.pretokenize import (BatchShardWriter, _encode_documents, _marked_tokenizer,
                                              encode_sentences, pretokenize, word_start_table)
from kompakt.tokenization.train import train_tokenizer


@pytest.fixture(scope="module")
def small(demo_docs, tmp_path_factory):
    """A 900-document corpus in 3 files and a small WordPiece tokenizer trained on it."""
    corpus = write_corpus(demo_docs[:900], tmp_path_factory.mktemp("corpus"), docs_per_file=300)
    files = corpus_files(corpus)
    tok = train_tokenizer(TokenizerConfig(vocab_size=1000), lambda: iter_texts(files, 0.0, heldout=False))
    return files, tok


def _random_batch(rng, vocab, num_docs):
    sents_per_doc = rng.integers(0, 4, num_docs)
    lengths = rng.integers(0, 6, int(sents_per_doc.sum()))
    ids = rng.integers(0, vocab, int(lengths.sum()))
    starts = rng.integers(0, 2, len(ids)).astype(np.uint8)
    return ids, starts, lengths, sents_per_doc


@pytest.mark.parametrize("vocab", [1000, 70_000])
def test_batch_writer_matches_add_document(tmp_path, vocab):
    """The vectorised writer gives the same bytes as ShardWriter.add_document, empty parts included."""
    rng = np.random.default_rng(0)
    batches = [_random_batch(rng, vocab, 50) for _ in range(3)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fast, slow = BatchShardWriter(tmp_path / "a", 0, vocab), ShardWriter(tmp_path / "b", 0, vocab)
    for ids, starts, lengths, spd in batches:
        fast.add_documents(ids, starts, lengths, spd)
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        s = 0
        for n in spd:
            slow.add_document([(ids[bounds[j]:bounds[j + 1]], starts[bounds[j]:bounds[j + 1]]) for j in range(s, s + n)])
            s += n
    assert fast.close() == slow.close()
    for name in ("00000.tokens", "00000.wordstart", "00000.docs.npy", "00000.sents.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_vocab_above_65536_writes_uint32(tmp_path):
    ids = np.array([1, 65_535, 65_536, 99_999], dtype=np.uint32)
    w = BatchShardWriter(tmp_path, 0, 100_000)
    w.add_documents(ids, np.array([1, 0, 1, 1], np.uint8), np.array([2, 2]), np.array([2]))
    write_index(tmp_path, [w.close()], 100_000)
    shards = TokenShards(tmp_path)
    assert shards.dtype == np.uint32
    assert shards.document(0)[0].tolist() == ids.tolist()


def test_num_proc_1_and_2_give_identical_shards(small, tmp_path):
    files, tok = small
    split = heldout_split(files, 0.1)
    a = pretokenize(tok, files, tmp_path / "p1" / "tokens", 250, 1, split, tmp_path / "p1" / "heldout")
    b = pretokenize(tok, files, tmp_path / "p2" / "tokens", 250, 2, split, tmp_path / "p2" / "heldout")
    assert a == b and len(a["train"]["shards"]) == len(a["heldout"]["shards"]) == 4
    assert a["train"]["num_docs"] + a["heldout"]["num_docs"] == 900 and 60 < a["heldout"]["num_docs"] < 120
    for part in ("tokens", "heldout"):
        names = sorted(p.name for p in (tmp_path / "p1" / part).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "p2" / part).iterdir())
        for name in names:
            assert (tmp_path / "p1" / part / name).read_bytes() == (tmp_path / "p2" / part / name).read_bytes(), name


@pytest.mark.parametrize("kind, options", [("wordpiece", {}), ("wordpiece", {"lowercase": True, "strip_accents": True}),
                                           ("wordpiece", {"chinese_chars": True}), ("unigram", {}),
                                           ("unigram", {"lowercase": True}), ("bpe", {})])
def test_documents_encoded_whole_match_their_sentences_encoded_alone(kind, options, demo_docs):
    """The marker-joined document encoding gives each sentence's own ids, edge cases included, and a
    batch whose text holds the marker character falls back to sentence by sentence."""
    docs = [naive_sentences(d) for d in demo_docs[:400]] + [
        ["  leading", "trailing  ", "", " ", "x"], ["你好。", "世界！", "中文"], ["##e", "[SEP] inside", "a[CLS]b"], [],
        ["\u0301e", "e\u0301", "\t tab", "ÆØÅ æøå"], ["[unused0]"], [""]]
    tok = train_tokenizer(TokenizerConfig(kind=kind, vocab_size=500, **options), [demo_docs[:300]])
    table = word_start_table(tok)
    marker = _marked_tokenizer(tok)
    ref = encode_sentences(tok, [s for d in docs for s in d], table)
    column = pa.array(docs, type=pa.list_(pa.string()))
    got = _encode_documents(marker, column, table)
    for r, g in zip(ref, got):
        assert r.tolist() == g.tolist()
    assert marker.id not in got[0]
    # A slice (as iter_batches gives for part of a row group) starting mid-corpus.
    tail = _encode_documents(marker, column.slice(7), table)
    skip = sum(len(d) for d in docs[:7])
    assert tail[2].tolist() == ref[2][skip:].tolist()
    assert tail[0].tolist() == ref[0][int(ref[2][:skip].sum()):].tolist()
    with_marker = pa.array([["a", "b" + marker.char]], type=pa.list_(pa.string()))
    assert _encode_documents(marker, with_marker, table) is None


def test_heldout_split_holds_out_at_least_one_document(tmp_path):
    docs = ["Første dokument her.", "Andre dokument her.", "Tredje dokument her."]
    files = corpus_files(write_corpus(docs, tmp_path / "c"))
    ids = [f"doc-{i:08d}" for i in range(3)]
    tiny = heldout_split(files, 1e-9)
    assert not any(is_heldout(i, 1e-9) for i in ids)
    assert sum(tiny(i) for i in ids) == 1
    everything = heldout_split(files, 0.999999)
    assert sum(everything(i) for i in ids) == 2
    assert sum(heldout_split(files, 0.0)(i) for i in ids) == 0
    one = corpus_files(write_corpus(docs[:1], tmp_path / "one"))
    assert not heldout_split(one, 1e-9)("doc-00000000")


def test_encode_sentences_word_starts(small):
    _, tok = small
    ids, starts, lengths = encode_sentences(tok, ["Hei på deg.", "", "Blåbærsyltetøy smaker godt"],
                                           word_start_table(tok))
    assert lengths[1] == 0 and len(ids) == len(starts) == lengths.sum()
    tokens = [tok.id_to_token(i) for i in ids.tolist()]
    assert starts.tolist() == [0 if t.startswith("##") else 1 for t in tokens]
    # "Hei", "på", "deg", "." and "Blåbærsyltetøy", "smaker", "godt": 7 pre-tokenizer words
    assert int(starts.sum()) == 7


def test_iter_batches_reads_a_global_slice_across_files(small):
    files, _ = small
    every = [i for b in iter_batches(files, ["id"]) for i in b.column(0).to_pylist()]
    part = [i for b in iter_batches(files, ["id"], 250, 650, batch_rows=64) for i in b.column(0).to_pylist()]
    assert len(every) == 900 and part == every[250:650]


def test_heldout_split_is_deterministic_and_about_the_fraction():
    ids = [f"doc-{i}" for i in range(20_000)]
    flags = [is_heldout(i, 0.1) for i in ids]
    assert flags == [is_heldout(i, 0.1) for i in ids]
    assert 0.09 < np.mean(flags) < 0.11
    assert not any(is_heldout(i, 0.0) for i in ids[:100])


def test_missing_column_is_a_clear_error(tmp_path):
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "corpus" / "00000.parquet")
    with pytest.raises(DataError, match=r"00000\.parquet: missing column\(s\) text, sentences"):
        corpus_files(tmp_path)
    with pytest.raises(DataError, match="no \\*.parquet files"):
        corpus_files(tmp_path / "nothing")


def test_heldout_mask_matches_the_split_per_id():
    ids = [f"doc-{i}" for i in range(3000)] + ["x", "y"]
    for split in (HeldoutSplit(0.1), HeldoutSplit(0.0), HeldoutSplit(0.1, forced_heldout="x"),
                  HeldoutSplit(0.999, forced_train="y")):
        assert split.mask(ids).tolist() == [split(i) for i in ids]

"""Lattice-BERT micro-batches through the shared packed loader: the token budget counts the words the
collator adds, and workers started by spawn (no inherited module state) build the same batches."""

from __future__ import annotations

import itertools
import multiprocessing

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from kompakt.model_config import ModelConfig
from kompakt.objective_config import DataLoaderConfig, ObjectiveConfig
from kompakt.pretrain.data import MLMCollator, PackedLoader
from kompakt.shards import ShardWriter, TokenShards, write_index
from kompakt.tokenizer import SpecialIds

CHARS = "研究生命起源中国人民银行"
WORDS = ["研究", "研究生", "生命", "起源", "中国", "人民", "银行", "中国人"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A character tokenizer, its lexicon and shards of 60 documents over those characters."""
    root = tmp_path_factory.mktemp("lattice-loader")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, **{c: 5 + i for i, c in enumerate(CHARS)}}
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "lexicon.txt").write_text("".join(f"{w}\t1\n" for w in WORDS), encoding="utf-8")
    rng = np.random.default_rng(0)
    (root / "tokens").mkdir()
    writer = ShardWriter(root / "tokens", 0, len(vocab))
    words = [[vocab[c] for c in w] for w in WORDS]
    for _ in range(60):
        sentences = []
        for _ in range(int(rng.integers(2, 5))):
            ids = [c for k in rng.integers(0, len(words), size=int(rng.integers(4, 12))) for c in words[k]]
            sentences.append((ids, [1] * len(ids)))
        writer.add_document(sentences)
    write_index(root / "tokens", [writer.close()], len(vocab))
    cfg = ModelConfig(family="lattice", vocab_size=64, lattice={"num_words": 64, "max_word_len": 4})
    return tok_dir, TokenShards(root / "tokens"), SpecialIds.from_tokenizer(tok), cfg


def loader(run, **kw):
    tok_dir, shards, specials, cfg = run
    objective = ObjectiveConfig(masking="msp", max_seq_len=32)
    data = DataLoaderConfig(tokens_per_micro_batch=160, global_batch_tokens=160, seed=1)
    collator = MLMCollator(objective, specials, data.seed, lexicon_from=(tok_dir, cfg))
    return PackedLoader(shards, objective, data, specials, prefetch=0, collator=collator, **kw)


def test_micro_batches_hold_at_most_their_budget_words_included(run):
    batches = list(itertools.islice(loader(run), 40))
    sizes = [int(b["input_ids"].numel()) for b in batches]
    assert max(sizes) <= 160, sizes
    # Words are a large share of the tokens (each word spans 2+ characters), so a budget counting
    # characters only would overfill; the micro-batches are still well filled.
    words = sum(int((b["lattice_start"] < b["lattice_end"]).sum()) for b in batches)
    assert words > 0.3 * sum(sizes) and np.mean(sizes) > 100


def test_spawn_started_workers_build_the_same_batches(run, monkeypatch):
    expected = list(itertools.islice(loader(run), 12))
    real_get_context = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with loader(run, num_workers=2) as lo:
        got = list(itertools.islice(lo, 12))
    assert multiprocessing.get_context is real_get_context
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k

"""In-process parts of deterministic training: Unigram rescoring ignores input order and tiny noise,
the WordPiece alphabet seeding leaves no extra added tokens. (Across processes:
tests/integration/test_tokenizer_determinism.py.)"""

import json
import random
from collections import Counter

import numpy as np
import pytest

from kompakt.config import TokenizerConfig
from kompakt.tokenization.train import MAX_PIECE_CHARS, build_tokenizer, special_tokens, train_tokenizer
from kompakt.tokenization.unigram import rescore, word_counts


@pytest.fixture(scope="module")
def unigram(demo_docs):
    cfg = TokenizerConfig(kind="unigram", family="albert", vocab_size=600)
    tok = train_tokenizer(cfg, [demo_docs[:400]])
    counts = word_counts(tok, [demo_docs[:400]])
    pieces = [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"][len(special_tokens("albert")):]]
    return pieces, counts


def test_unigram_rescore_ignores_order_and_noise_below_the_start_grid(unigram):
    pieces, counts = unigram
    ref = rescore(pieces, counts, MAX_PIECE_CHARS)
    rng = random.Random(0)
    shuffled = pieces[:]
    rng.shuffle(shuffled)
    # Noise of 1e-11 nats is what the trainer's hash-ordered sums leave (4e-11 on the demo corpus).
    noisy = [(p, s + rng.uniform(-1e-11, 1e-11)) for p, s in shuffled]
    words = list(counts.items())
    rng.shuffle(words)
    assert rescore(noisy, Counter(dict(words)), MAX_PIECE_CHARS) == ref
    scores = [s for _, s in ref]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert sorted(p for p, _ in ref) == sorted(p for p, _ in pieces)


def test_unigram_rescoring_keeps_the_trainers_pieces_and_segmentations(demo_docs):
    """The rescored model has the trainer's pieces and segments held-out text into about as many tokens."""
    cfg = TokenizerConfig(kind="unigram", family="albert", vocab_size=1000)
    docs, held = demo_docs[:800], demo_docs[800:1000]
    ours = train_tokenizer(cfg, [docs])
    theirs, trainer = build_tokenizer(cfg)
    theirs.train_from_iterator([docs], trainer=trainer)
    pieces = [{p for p, _ in json.loads(t.to_str())["model"]["vocab"]} for t in (ours, theirs)]
    assert pieces[0] == pieces[1]
    n_ours, n_theirs = (sum(len(e.ids) for e in t.encode_batch(held, add_special_tokens=False)) for t in (ours, theirs))
    assert abs(n_ours - n_theirs) / n_theirs < 0.01, (n_ours, n_theirs)


def test_wordpiece_alphabet_is_not_left_as_added_tokens(demo_docs):
    cfg = TokenizerConfig(kind="wordpiece", vocab_size=500)
    tok = train_tokenizer(cfg, [demo_docs[:300]])
    added = {a.content for a in tok.get_added_tokens_decoder().values()}
    assert added == set(special_tokens("bert").values()) | {f"[unused{i}]" for i in range(len(added) - 5)}
    vocab = tok.get_vocab(with_added_tokens=False)
    assert "##e" in vocab and "e" in vocab
    # BERT order: specials, characters, `##` characters, then merged tokens.
    ids = sorted(vocab.values())
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert ids == list(range(len(ids)))
    first_cont = next(i for i, t in enumerate(tokens) if t.startswith("##"))
    assert all(len(t) == 1 for t in tokens[5:first_cont])
    # "##e" in a text is text, not the vocabulary entry matched as an added token.
    assert "##e" not in tok.encode("a ##e", add_special_tokens=False).tokens


def test_a_one_shot_iterator_is_refused(demo_docs):
    with pytest.raises(TypeError, match="reads the texts twice"):
        train_tokenizer(TokenizerConfig(vocab_size=300), iter([demo_docs[:50]]))

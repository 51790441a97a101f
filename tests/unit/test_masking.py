"""Masking statistics, layout and determinism on real WordPiece shards of the demo corpus."""

import importlib

import numpy as np
import pytest

from _pretrain_shards import demo_tokenizer_and_shards
from kompakt.errors import KompaktError
from kompakt.objective_config import ObjectiveConfig
from kompakt.pretrain.collate import collate_examples
from kompakt.pretrain.data import build_examples, read_example
from kompakt.pretrain.masking import (Example, SpecialIds, describe_sample, mask_example, span_length_pmf)

SEED = 1234


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_docs):
    tok, shards = demo_tokenizer_and_shards(tmp_path_factory.mktemp("objectives"), demo_docs)
    return tok, shards, SpecialIds.from_tokenizer(tok)


def real_examples(shards, max_seq_len=128, sop=False):
    """The loader's own examples (documents of the demo corpus, ~40 tokens each)."""
    specials = 3 if sop else 2
    index = build_examples(shards, max_seq_len - specials, 2 if sop else 1)
    return [read_example(shards, index, i, i) for i in range(len(index))]


def long_windows(shards, n, count):
    """Windows of n tokens of the flat stream (masking does not care about documents)."""
    shard = shards.shards[0]
    starts = np.arange(count) * 97 % (len(shard.tokens) - n)
    return [Example(i, np.asarray(shard.tokens[a:a + n], np.int64), np.asarray(shard.word_starts[a:a + n]),
                    np.zeros(0, np.int64)) for i, a in enumerate(starts.tolist())]


def units_of(m, ex_word_starts, split=None):
    """Unit id (word) of every real position of a non-SOP masked example, -1 for specials."""
    ws = np.asarray(ex_word_starts, dtype=bool).copy()
    ws[0] = True
    unit = np.full(len(m.input_ids), -1)
    unit[1:-1] = np.cumsum(ws) - 1
    return unit


@pytest.mark.parametrize("masking", ["token", "whole_word", "ngram", "span"])
@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_mask_rate_is_exact_in_expectation(demo, masking, rate):
    _, shards, sp = demo
    cfg = ObjectiveConfig(masking=masking, mask_rate=rate)
    examples = real_examples(shards)[:1500]
    masked = [mask_example(ex, cfg, sp, SEED) for ex in examples]
    num_real = sum(len(ex.tokens) for ex in examples)
    num_masked = sum(len(m.mlm_positions) for m in masked)
    assert abs(num_masked / num_real - rate) < 0.01, (masking, num_masked / num_real)
    for m in masked:  # specials are never predicted
        assert not np.isin(m.mlm_labels, [sp.cls, sp.sep]).any()


def test_80_10_10_replacement(demo):
    _, shards, sp = demo
    cfg = ObjectiveConfig(masking="token", mask_rate=0.3)
    masked = [mask_example(ex, cfg, sp, SEED) for ex in real_examples(shards)]
    shown = np.concatenate([m.input_ids[m.mlm_positions] for m in masked])
    labels = np.concatenate([m.mlm_labels for m in masked])
    assert len(labels) > 20_000
    is_mask = shown == sp.mask
    is_kept = shown == labels
    is_random = ~is_mask & ~is_kept
    assert abs(is_mask.mean() - 0.8) < 0.01
    # A random draw equals the original 1 time in ~2000, so "kept" is 0.1 plus a hair.
    assert abs(is_kept.mean() - 0.1) < 0.01 and abs(is_random.mean() - 0.1) < 0.01
    banned = [sp.cls, sp.sep, sp.mask, sp.pad, *sp.excluded]
    assert not np.isin(shown[is_random], banned).any()


@pytest.mark.parametrize("masking", ["whole_word", "ngram", "span"])
def test_whole_words_masked_together(demo, masking):
    _, shards, sp = demo
    cfg = ObjectiveConfig(masking=masking, mask_rate=0.3)
    num_partial = num_words = 0
    for ex in real_examples(shards)[:800]:
        m = mask_example(ex, cfg, sp, SEED)
        unit = units_of(m, ex.word_starts)
        hit = np.zeros(len(m.input_ids), bool)
        hit[m.mlm_positions] = True
        for u in np.unique(unit[m.mlm_positions]):
            num_words += 1
            num_partial += int(not hit[unit == u].all())
    assert num_words > 1000 and num_partial == 0


def test_ngrams_at_most_three_words_and_favour_short(demo):
    _, shards, sp = demo
    cfg = ObjectiveConfig(masking="ngram", mask_rate=0.15)
    counts = np.zeros(5, int)
    for ex in long_windows(shards, 254, 300):
        m = mask_example(ex, ObjectiveConfig(masking="ngram", max_seq_len=256), sp, SEED)
        unit = units_of(m, ex.word_starts)
        for a, b in m.spans:
            counts[len(np.unique(unit[a:b]))] += 1
    assert counts[4:].sum() == 0 and counts[0] == 0
    # p(n) ∝ 1/n: 6/11, 3/11, 2/11 before overlaps and the budget shorten a few.
    share = counts[1:4] / counts.sum()
    assert share[0] > share[1] > share[2] > 0.1 and cfg.max_ngram == 3


def test_span_lengths_follow_truncated_geometric(demo):
    _, shards, sp = demo
    cfg = ObjectiveConfig(masking="span", mask_rate=0.15, max_seq_len=512)
    lengths = []
    for ex in long_windows(shards, 510, 700):
        m = mask_example(ex, cfg, sp, SEED)
        unit = units_of(m, ex.word_starts)
        for (a, b), cut in zip(m.spans.tolist(), m.span_truncated.tolist()):
            if not cut:  # the budget's last span is shortened on purpose
                lengths.append(len(np.unique(unit[a:b])))
    lengths = np.asarray(lengths)
    assert len(lengths) > 5000
    hist = np.bincount(lengths, minlength=11)[1:11] / len(lengths)
    pmf = span_length_pmf(0.2, 10)
    assert np.abs(hist - pmf).max() < 0.02, np.round(hist - pmf, 3)
    assert abs(lengths.mean() - 3.8) < 0.15


def test_span_boundary_targets(demo):
    _, shards, sp = demo
    cfg = ObjectiveConfig(masking="span", sop=True, mask_rate=0.3)
    for ex in real_examples(shards, sop=True)[:300]:
        m = mask_example(ex, cfg, sp, SEED)
        hit = np.zeros(len(m.input_ids), bool)
        hit[m.mlm_positions] = True
        assert len(m.sbo_left) == len(m.sbo_right) == len(m.sbo_rel) == len(m.mlm_positions)
        assert (m.sbo_left + 1 + m.sbo_rel == m.mlm_positions).all()
        # Boundaries are outside every span (spans keep a gap) and inside the sequence.
        assert not hit[m.sbo_left].any() and not hit[m.sbo_right].any()
        assert (m.sbo_right < len(m.input_ids)).all() and (m.sbo_left >= 0).all()
        # A span never crosses the middle [SEP].
        for a, b in m.spans:
            assert len(np.unique(m.token_type_ids[a:b])) == 1


def test_sop_layout_and_balance(demo):
    _, shards, sp = demo
    cfg = ObjectiveConfig(masking="whole_word", sop=True)
    examples = real_examples(shards, sop=True)
    labels = []
    for ex in examples:
        m = mask_example(ex, cfg, sp, SEED)
        ids = m.input_ids.copy()
        ids[m.mlm_positions] = m.mlm_labels
        seps = np.flatnonzero(ids == sp.sep)
        assert ids[0] == sp.cls and len(seps) == 2 and seps[-1] == len(ids) - 1
        a, b = ids[1:seps[0]], ids[seps[0] + 1:-1]
        assert len(a) and len(b)
        assert (m.token_type_ids[:seps[0] + 1] == 0).all() and (m.token_type_ids[seps[0] + 1:] == 1).all()
        original = np.concatenate((b, a) if m.sop_label else (a, b))
        assert (original == ex.tokens).all()
        labels.append(m.sop_label)
        if len(ex.sent_starts):  # several sentences: A ends at a sentence boundary
            assert len(b if m.sop_label else a) in set(ex.sent_starts.tolist())
    assert 0.45 <= np.mean(labels) <= 0.55 and len(labels) > 1000


def test_masking_is_a_pure_function_of_seed_and_index(demo):
    _, shards, sp = demo
    cfg = ObjectiveConfig(masking="span", sop=True)
    ex = long_windows(shards, 125, 1)[0]
    first, again = mask_example(ex, cfg, sp, SEED), mask_example(ex, cfg, sp, SEED)
    for key in ("input_ids", "mlm_positions", "sbo_rel", "token_type_ids"):
        assert np.array_equal(getattr(first, key), getattr(again, key))

    def ids(index, seed):
        return mask_example(Example(index, ex.tokens, ex.word_starts, ex.sent_starts), cfg, sp, seed).input_ids

    assert all(not np.array_equal(ids(i, SEED), first.input_ids) for i in range(1, 6))
    assert not np.array_equal(ids(0, SEED + 1), first.input_ids)


def test_describe_sample_shows_masks(demo):
    tok, shards, sp = demo
    cfg = ObjectiveConfig(masking="whole_word", mask_rate=0.3)
    ex = real_examples(shards)[3]
    m = mask_example(ex, cfg, sp, SEED)
    text = describe_sample(m, tok)
    assert text.count("→") == len(m.mlm_positions) > 0
    assert "[CLS]" in text and "[SEP]" in text
    label = tok.id_to_token(int(m.mlm_labels[0]))
    assert f"→{label}]" in text
    batch = collate_examples([ex, real_examples(shards)[4]], cfg, sp, SEED)
    assert describe_sample(batch, tok).split("\n")[1] == text.split("\n")[1]


def test_msp_dispatches_to_lattice_code(demo):
    _, shards, sp = demo
    cfg = ObjectiveConfig(masking="msp")
    lattice = importlib.import_module("kompakt.pretrain.lattice")
    if not hasattr(lattice, "collate_msp"):
        with pytest.raises(KompaktError, match="collate_msp"):
            collate_examples(real_examples(shards)[:2], cfg, sp, SEED)
    with pytest.raises(KompaktError, match="lattice"):
        mask_example(real_examples(shards)[0], cfg, sp, SEED)


def test_special_ids_from_tokenizer(demo):
    tok, _, sp = demo
    assert (sp.cls, sp.sep, sp.mask, sp.pad) == tuple(tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]"))
    assert len(sp.replacement_ids) == tok.get_vocab_size() - 5

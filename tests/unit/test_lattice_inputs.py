"""Lattice construction and masked segment prediction (pretrain/lattice.py)."""

import numpy as np
import pytest
import torch

from kompakt.errors import ConfigError, DataError
from kompakt.objective_config import ObjectiveConfig
from kompakt.pretrain.collate import collate_examples
from kompakt.pretrain.lattice import (
    Lexicon,
    build_lattice,
    collate_lattice,
    lattice_segments,
    install_run_lexicon,
    load_run_lexicon,
    msp_mask,
    read_lexicon,
    use_lexicon,
)
from kompakt.pretrain.masking import Example, SpecialIds

CLS, SEP, MASK = 1, 2, 3
SPECIALS = {0, CLS, SEP, MASK}
CHARS = {"研": 10, "究": 11, "生": 12, "命": 13, "起": 14, "源": 15}
# A character vocabulary of 20 ids: lexicon word k gets id 20 + k.
VOCAB_SIZE = 20


def lexicon(words=("研究", "研究生", "生命", "起源")):
    return Lexicon.from_words(words, CHARS, first_word_id=VOCAB_SIZE, max_word_len=8)


def sentence(text):
    return [CHARS[c] for c in text]


def test_hand_checked_lattice():
    ex = build_lattice([sentence("研究生命起源")], lexicon(), cls_id=CLS, sep_id=SEP)
    # [CLS] 研 究 生 命 起 源 [SEP] 研究 研究生 生命 起源, spans worked out by hand.
    assert ex.input_ids.tolist() == [CLS, 10, 11, 12, 13, 14, 15, SEP, 20, 21, 22, 23]
    spans = list(zip(ex.lattice_start.tolist(), ex.lattice_end.tolist()))
    assert spans == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7),
                     (1, 2), (1, 3), (3, 4), (5, 6)]
    assert ex.num_chars == 8
    assert ex.token_type_ids.tolist() == [0] * 12


def test_uncovered_characters_are_the_ones_msp_masks_alone():
    from kompakt.lattice_inputs import uncovered_characters

    # 研究 covers 0-1 and 起源 3-4; 命 (2) and 生 (5) stand alone, since 生命 is not in this order.
    assert uncovered_characters(sentence("研究命起源生"), lexicon()) == {2, 5}
    assert uncovered_characters(sentence("研究生命起源"), lexicon()) == set()


def test_two_segments_never_match_across_sep():
    # "生命" would match across the boundary of A="研究生" and B="命起源" if words could cross [SEP].
    ex = build_lattice([sentence("研究生"), sentence("命起源")], lexicon(), cls_id=CLS, sep_id=SEP)
    words = ex.input_ids[ex.num_chars :].tolist()
    assert words == [20, 21, 23]
    spans = list(zip(ex.lattice_start[ex.num_chars :].tolist(), ex.lattice_end[ex.num_chars :].tolist()))
    # A occupies positions 1..3 ([SEP] at 4), B 5..7 ([SEP] at 8).
    assert spans == [(1, 2), (1, 3), (6, 7)]
    assert ex.token_type_ids.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1]


def test_max_len_drops_words_from_the_end():
    ex = build_lattice([sentence("研究生命起源")], lexicon(), cls_id=CLS, sep_id=SEP, max_len=10)
    assert ex.input_ids[8:].tolist() == [20, 21]
    with pytest.raises(DataError, match="max_len"):
        build_lattice([sentence("研究生命起源")], lexicon(), cls_id=CLS, sep_id=SEP, max_len=7)


def test_jieba_lexicon_matches_real_words():
    words = read_lexicon("jieba", max_words=20000)
    assert len(words) == 20000 and all(len(w) >= 2 for w in words)
    chars = {c: i for i, c in enumerate(sorted({c for w in words for c in w}))}
    lex = Lexicon.from_words(words, chars, first_word_id=len(chars), max_word_len=4)
    assert 0 < len(lex) <= len(words)
    found = {words[w - len(chars)] for _, _, w in lex.match([chars[c] for c in "中国人民银行"])}
    assert {"中国", "人民", "银行"} <= found and all(len(w) <= 4 for w in found)


def test_segments_merge_overlaps_only():
    ex = build_lattice([sentence("研究生命起源")], lexicon(), cls_id=CLS, sep_id=SEP)
    maskable = ~np.isin(ex.input_ids, list(SPECIALS))
    assert lattice_segments(ex.lattice_start, ex.lattice_end, maskable) == [(1, 4), (5, 6)]


def mask(ex, seed, **kw):
    return msp_mask(ex, np.random.default_rng(seed), mask_id=MASK, special_ids=SPECIALS,
                    replacement_ids=np.arange(4, 24), **kw)


def test_msp_masks_whole_segments_without_leakage():
    text = "研究生命起源" * 6
    ex = build_lattice([sentence(text)], lexicon(), cls_id=CLS, sep_id=SEP)
    num_predicted = 0
    for seed in range(20):
        masked, positions, labels = mask(ex, seed, mask_prob=0.3)
        assert labels.tolist() == ex.input_ids[positions].tolist()
        chosen = np.zeros(len(ex), bool)
        chosen[positions] = True
        assert not chosen[np.isin(ex.input_ids, list(SPECIALS))].any()
        masked_chars = {int(p) for p in positions if p < ex.num_chars}
        for t in range(len(ex)):
            covered = set(range(ex.lattice_start[t], ex.lattice_end[t] + 1))
            # No leakage: any token touching a masked character is itself masked ...
            if covered & masked_chars:
                assert chosen[t], (seed, t)
            # ... and a masked word's characters are all masked (whole words).
            if chosen[t]:
                assert covered <= masked_chars, (seed, t)
        unchanged = np.setdiff1d(np.arange(len(ex)), positions)
        assert (masked[unchanged] == ex.input_ids[unchanged]).all()
        num_predicted += len(positions)
        # Budget: round(0.3 * 36) = 11 characters at most.
        assert len(masked_chars) <= 11
    assert num_predicted > 0


def test_msp_is_a_pure_function_of_the_seed():
    ex = build_lattice([sentence("研究生命起源" * 5)], lexicon(), cls_id=CLS, sep_id=SEP)
    a, b, c = mask(ex, 7), mask(ex, 7), mask(ex, 8)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all(x.shape == y.shape and (x == y).all() for x, y in zip(a, c))


def test_collate_offsets_positions_into_the_packed_stream():
    ex1 = build_lattice([sentence("研究生命起源")], lexicon(), cls_id=CLS, sep_id=SEP)
    ex2 = build_lattice([sentence("起源")], lexicon(), cls_id=CLS, sep_id=SEP)
    m1, m2 = mask(ex1, 0, mask_prob=0.5), mask(ex2, 1, mask_prob=0.5)
    batch = collate_lattice([ex1, ex2], [m1, m2])
    assert batch["cu_seqlens"].tolist() == [0, 12, 17]
    assert batch["max_seqlen"] == 12
    assert batch["lattice_start"][12:].tolist() == [0, 1, 2, 3, 1]
    assert batch["mlm_positions"].tolist() == m1[1].tolist() + (m2[1] + 12).tolist()
    flat_orig = np.concatenate([ex1.input_ids, ex2.input_ids])
    assert batch["mlm_labels"].tolist() == flat_orig[batch["mlm_positions"].numpy()].tolist()


def test_words_do_not_cross_sentence_starts():
    # "生命" spans the cut between "研究生" and "命起源".
    ex = build_lattice([sentence("研究生命起源")], lexicon(), cls_id=CLS, sep_id=SEP, cuts=[[3]])
    assert ex.input_ids[ex.num_chars :].tolist() == [20, 21, 23]


def test_msp_replacement_follows_the_80_10_10_rule():
    ex = build_lattice([sentence("研究生命起源" * 40)], lexicon(), cls_id=CLS, sep_id=SEP)
    kinds = np.zeros(3)
    for seed in range(30):
        masked, positions, labels = mask(ex, seed)
        new = masked[positions]
        kinds += [(new == MASK).sum(), ((new != MASK) & (new != labels)).sum(), (new == labels).sum()]
    share = kinds / kinds.sum()
    assert 0.7 < share[0] < 0.9 and 0.03 < share[1] < 0.17 and 0.03 < share[2] < 0.17


def test_collate_msp_through_the_shared_collator(tmp_path):
    (tmp_path / "lexicon.txt").write_text("研究\t50\n生命\t40\n起源\t30\n研究生\t20\n", encoding="utf-8")
    lex = load_run_lexicon(tmp_path / "lexicon.txt", CHARS, VOCAB_SIZE, max_word_len=8, num_words=4)
    assert lex.word_ids[(10, 11)] == 20 and lex.word_ids[(10, 11, 12)] == 23
    with pytest.raises(DataError, match="num_words=4"):
        load_run_lexicon(tmp_path / "lexicon.txt", CHARS, VOCAB_SIZE, max_word_len=8, num_words=3)
    use_lexicon(lex)
    specials = SpecialIds(cls=CLS, sep=SEP, mask=MASK, pad=0, vocab_size=VOCAB_SIZE)
    cfg = ObjectiveConfig(masking="msp", mask_rate=0.3, max_seq_len=64)
    examples = [Example(index=i, tokens=np.array(sentence("研究生命起源" * (i + 1))),
                        word_starts=np.ones(6 * (i + 1)),
                        sent_starts=np.array([6 * k for k in range(1, i + 1)])) for i in range(3)]
    batch = collate_examples(examples, cfg, specials, seed=5)
    again = collate_examples(examples, cfg, specials, seed=5)
    assert all(torch.equal(batch[k], again[k]) for k in batch if k != "max_seqlen")
    # Example i holds i + 1 copies of the sentence: 6 characters and 4 words each, plus [CLS] and [SEP].
    assert batch["cu_seqlens"].tolist() == [0, 12, 34, 66]
    assert batch["lattice_start"].shape == batch["input_ids"].shape
    assert len(batch["mlm_positions"]) > 0
    cfg_sop = ObjectiveConfig(masking="msp", sop=True, max_seq_len=64)
    with pytest.raises(ConfigError, match="sop"):
        collate_examples(examples, cfg_sop, specials, seed=5)


def test_install_run_lexicon_from_a_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from kompakt.model_config import ModelConfig

    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[MASK]": 3, **CHARS}
    Tokenizer(WordLevel(vocab, unk_token="[PAD]")).save(str(tmp_path / "tokenizer.json"))
    cfg = ModelConfig(family="lattice", vocab_size=64, lattice={"num_words": 2})
    with pytest.raises(DataError, match="lexicon.txt"):
        install_run_lexicon(tmp_path, cfg)
    (tmp_path / "lexicon.txt").write_text("生命\t9\n起源\t8\n", encoding="utf-8")
    lex = install_run_lexicon(tmp_path, cfg)
    assert lex.word_ids == {(12, 13): 64, (14, 15): 65}
    with pytest.raises(DataError, match="num_words=1"):
        small = cfg.lattice.model_copy(update={"num_words": 1})
        install_run_lexicon(tmp_path, cfg.model_copy(update={"lattice": small}))

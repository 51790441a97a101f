"""The packed loader: examples, rank split, token budget, resume (also on another world size)."""

import itertools
import multiprocessing
import os

import numpy as np
import pytest
import torch

from _pretrain_shards import demo_tokenizer_and_shards
from kompakt.errors import ConfigError, DataError
from kompakt.objective_config import DataLoaderConfig, ObjectiveConfig
import kompakt.pretrain.data as data_module
from kompakt.pretrain.data import PackedLoader, build_examples, cut_micro_batches, expected_epochs, steps_info
from kompakt.pretrain.masking import SpecialIds

OBJECTIVE = ObjectiveConfig(masking="span", sop=True, max_seq_len=64)
DATA = DataLoaderConfig(tokens_per_micro_batch=600, global_batch_tokens=4800, seed=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_docs):
    tok, shards = demo_tokenizer_and_shards(tmp_path_factory.mktemp("objectives"), demo_docs)
    sp = SpecialIds.from_tokenizer(tok)
    return shards, sp, build_examples(shards, OBJECTIVE.max_seq_len - 3, 2)


def loader(demo, rank=0, world_size=1, **data):
    shards, sp, examples = demo
    # Prefetch and workers are run control (pretrain.run), not data: they change no batch.
    run = {k: data.pop(k) for k in ("prefetch", "num_workers") if k in data}
    return PackedLoader(shards, OBJECTIVE, DATA.model_copy(update=data), sp, rank, world_size, examples,
                        prefetch=run.get("prefetch", 0), **({"num_workers": run["num_workers"]} if "num_workers" in run else {}))


def same_batch(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k] for k, v in a.items())


def test_examples_stay_in_documents_and_cover_every_token(demo):
    shards, _, _ = demo
    examples = build_examples(shards, 14)  # short: many sentences are cut
    assert (examples.length >= 1).all() and (examples.length <= 14).all()
    cut_at_word, cut_mid_word = 0, 0
    for k, shard in enumerate(shards.shards):
        mine = examples.shard == k
        start, length = examples.start[mine], examples.length[mine].astype(np.int64)
        # Contiguous and complete: every token is in exactly one example.
        assert start[0] == 0 and (start[1:] == start[:-1] + length[:-1]).all()
        assert start[-1] + length[-1] == len(shard.tokens)
        # No example contains a document boundary.
        inner = np.searchsorted(shard.doc_offsets, start, side="right")
        assert (start + length <= shard.doc_offsets[inner]).all()
        not_sentence = ~np.isin(start, shard.sent_offsets)
        ws = np.asarray(shard.word_starts)[start[not_sentence]]
        cut_at_word += int(ws.sum())
        cut_mid_word += int((ws == 0).sum())
    # Long sentences are cut, at a word start unless one word is longer than the example.
    assert cut_at_word > 100 and cut_mid_word <= cut_at_word // 20


def test_sop_examples_have_two_tokens(demo):
    _, _, examples = demo
    assert (examples.length >= 2).all() and (examples.length <= 61).all()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_disjoint_and_complete_over_an_epoch(demo, world_size):
    _, _, examples = demo
    seen, epoch_of_round = [], []
    plans = [loader(demo, r, world_size).plan() for r in range(world_size)]
    for _ in range(400):
        rows = [next(p) for p in plans]
        states = {row[2] for row in rows}
        assert len(states) == 1  # every rank reports the same global state
        for epoch, ids, _ in rows:
            if epoch == 0:
                seen.append(ids)
        if all(row[0] >= 1 for row in rows):
            break
    ids = np.concatenate(seen)
    assert len(ids) == len(examples) and len(np.unique(ids)) == len(examples)


def test_micro_batches_respect_the_token_budget(demo):
    budget = DATA.tokens_per_micro_batch
    batches = list(itertools.islice(loader(demo, prefetch=2), 30))
    sizes = [len(b["input_ids"]) for b in batches]
    assert max(sizes) <= budget
    # Greedy fill: a micro-batch closes only when the next sequence (<= 64 tokens) would not fit.
    assert min(sizes) > budget - OBJECTIVE.max_seq_len
    assert all(b["cu_seqlens"][-1] == len(b["input_ids"]) for b in batches)


def test_cut_never_splits_a_sequence():
    bounds = cut_micro_batches(np.array([5, 5, 5, 10, 1, 9]), 10)
    assert bounds.tolist() == [0, 2, 3, 4, 6]


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_yields_the_same_batches(demo, prefetch):
    it = iter(first := loader(demo, prefetch=prefetch))
    for _ in range(7):
        next(it)
    state = first.state_dict()
    expected = [next(it) for _ in range(5)]
    resumed = loader(demo, prefetch=0)
    resumed.load_state_dict(state)
    got = list(itertools.islice(resumed, 5))
    assert all(same_batch(a, b) for a, b in zip(expected, got))
    assert not same_batch(expected[0], expected[1])


def test_two_rank_state_resumes_on_one_rank(demo):
    _, _, examples = demo
    ranks = [loader(demo, r, 2) for r in range(2)]
    consumed = []
    for lo in ranks:
        for epoch, ids, state in itertools.islice(lo.plan(), 20):
            consumed.append(ids)
            lo.epoch, lo.position = state  # what __iter__ records after each batch
    assert ranks[0].state_dict() == ranks[1].state_dict()
    single = loader(demo)
    single.load_state_dict(ranks[0].state_dict())
    rest = []
    for epoch, ids, _ in single.plan():
        if epoch > 0:
            break
        rest.append(ids)
    ids = np.concatenate(consumed + rest)
    assert len(ids) == len(examples) and len(np.unique(ids)) == len(examples)

    # And the batches themselves are the ones an uninterrupted one-rank run yields from there.
    straight = iter(loader(demo))
    for _ in range(len(consumed)):
        next(straight)
    assert same_batch(next(straight), next(iter(single)))


def test_epoch_rollover_reshuffles_and_remasks(demo):
    lo = loader(demo)
    rows = []
    for epoch, ids, state in lo.plan():
        rows.append((epoch, ids))
        if epoch == 2:
            break
    epoch0 = np.concatenate([ids for e, ids in rows if e == 0])
    epoch1 = np.concatenate([ids for e, ids in rows if e == 1])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) and not np.array_equal(epoch0, epoch1)
    # Crossing the epoch end moves the state to (epoch + 1, 0) after its last micro-batch.
    lo2 = loader(demo)
    it = iter(lo2)
    num_first = sum(1 for e, _ in rows if e == 0)
    for _ in range(num_first):
        next(it)
    assert lo2.state_dict()["epoch"] == 1 and lo2.state_dict()["position"] == 0


def test_bad_state_and_budget_are_clear_errors(demo):
    lo = loader(demo)
    with pytest.raises(DataError, match="seed"):
        lo.load_state_dict({"epoch": 0, "position": 0, "num_examples": lo.num_examples, "seed": 99})
    with pytest.raises(ConfigError, match="tokens_per_micro_batch"):
        loader(demo, tokens_per_micro_batch=32)


def test_steps_info(demo):
    shards, _, examples = demo
    info = steps_info(shards, OBJECTIVE, DATA, world_size=2, examples=examples)
    assert info.num_examples == len(examples)
    assert info.tokens_per_epoch == int(examples.length.sum()) + 3 * len(examples)
    assert DATA.tokens_per_micro_batch - OBJECTIVE.max_seq_len < info.mean_tokens_per_micro_batch <= 600
    # 4800 tokens over 2 ranks of ~580-token micro-batches: 4 micro-batches per rank per step.
    assert info.grad_accum_steps == 4
    assert abs(info.tokens_per_step - DATA.global_batch_tokens) < 0.1 * DATA.global_batch_tokens
    assert info.steps_per_epoch == pytest.approx(info.micro_batches_per_epoch / 8)
    assert expected_epochs(info, 100) == pytest.approx(100 / info.steps_per_epoch)
    assert loader(demo, 0, 2).steps_info() == info


def test_workers_yield_the_same_batches_across_epochs(demo):
    # ~105k tokens per epoch in 6000-token micro-batches: ~18 per epoch, so 40 cross two epoch ends.
    def run(num_workers):
        with loader(demo, tokens_per_micro_batch=6000, num_workers=num_workers) as lo:
            it = iter(lo)
            return [(next(it), lo.state_dict()) for _ in range(40)]

    expected = run(0)
    assert expected[-1][1]["epoch"] == 2
    for num_workers in (1, 2):
        got = run(num_workers)
        assert [state for _, state in got] == [state for _, state in expected]
        assert all(same_batch(a, b) for (a, _), (b, _) in zip(expected, got))
    assert not multiprocessing.active_children()  # leaving the with block stopped the workers


def test_resume_with_workers_yields_the_same_batches(demo):
    straight = list(itertools.islice(loader(demo), 12))
    with loader(demo, num_workers=2) as first:
        it = iter(first)
        for _ in range(7):
            next(it)
        state = first.state_dict()
    with loader(demo, num_workers=2) as resumed:
        resumed.load_state_dict(state)
        got = list(itertools.islice(resumed, 5))
    assert all(same_batch(a, b) for a, b in zip(straight[7:], got))


def test_a_worker_error_is_raised_in_the_trainer(demo, monkeypatch):
    parent = os.getpid()

    def broken(*args):
        raise ValueError(f"masking failed in process {os.getpid()}")

    # Workers are forked after the patch, so they build with it.
    monkeypatch.setattr(data_module, "collate_examples", broken)
    with loader(demo, num_workers=2) as lo:
        with pytest.raises(ValueError, match="masking failed in process") as err:
            next(iter(lo))
    assert str(err.value) != f"masking failed in process {parent}"
    assert not multiprocessing.active_children()

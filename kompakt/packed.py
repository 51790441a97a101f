"""The packed data loader over kompakt token shards, shared by every stage that trains on them.

1. Examples (`build_examples`, once, deterministic): inside each document, consecutive sentences
   are packed greedily up to a token budget (the stage's sequence length minus its specials); a
   longer sentence is cut at the last word start that fits. An example never crosses a document
   boundary. The index is three numpy arrays (shard, token start, length), 16 bytes per example.
2. Order: epoch e visits every example once, in the permutation drawn from (seed, e).
3. Micro-batches: that order is cut greedily into micro-batches of at most
   `tokens_per_micro_batch` tokens (specials included; a sequence is never split). The cut depends
   on the order and the budget only, never on the number of ranks.
4. Ranks: the global stream of micro-batches (epoch after epoch) is dealt round-robin: rank r of
   W takes micro-batches r, r+W, r+2W, ... counted from the resume point, so every optimizer step
   holds the same number of micro-batches on every rank, and the ranks' shares are disjoint and
   together complete.
5. State: (epoch, position) where position counts the examples of that epoch consumed by all ranks
   together, after the last full round of W micro-batches. It is the same on every rank, so a state
   saved by W ranks resumes on any other number of ranks with no example replayed or skipped.
6. Collation is the stage's: a picklable `collator(examples) -> batch dict`, which must be a pure
   function of each example's sample index (epoch x num_examples + example id), so a resumed or
   re-sharded run rebuilds exactly the same batches (pretraining's masking is; see pretrain/data.py).
   A collator that needs files (Lattice-BERT's lexicon) carries their paths and loads them itself,
   so a worker started by fork or by spawn builds the same batches.
7. Workers (`run.num_workers` > 0): masking and collation take 50-130 ms per 16k-token micro-batch
   on one core, slower than a base model's step on an H100, so a pool of worker processes builds
   them ahead. The main process keeps the plan (step 3-5) and hands each worker only the
   (shard, start, length, sample index) rows of one micro-batch; results come back in plan order,
   so the batches and the state are exactly those of `num_workers=0`.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import signal
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from kompakt.errors import ConfigError, DataError
from kompakt.objective_config import DataLoaderConfig
from kompakt.shards import TokenShards


@dataclass
class Example:
    """One raw training example: consecutive real tokens of one document (no specials)."""

    index: int                 # sample index: seeds this example's randomness
    tokens: np.ndarray         # (n,) token ids
    word_starts: np.ndarray    # (n,) 1 where a token begins a word
    sent_starts: np.ndarray    # sentence starts inside the example, real indices in (0, n)


def example_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index`: Philox keyed by (seed, index), independent of everything else.

    Every collator draws an example's masking from it, so a batch is a pure function of its sample indices."""
    return np.random.Generator(np.random.Philox(key=(int(seed) << 64) | int(index)))


class Collator(Protocol):
    """Builds one micro-batch from its examples; picklable; a pure function of the examples' indices."""

    def __call__(self, examples: list[Example]) -> dict: ...


# ---------------------------------------------------------------------------------------------
# 1. Examples
# ---------------------------------------------------------------------------------------------


@dataclass
class ExampleIndex:
    """Every example as (shard, token start in the shard, number of real tokens)."""

    shard: np.ndarray   # (N,) int32
    start: np.ndarray   # (N,) int64
    length: np.ndarray  # (N,) int32, specials not counted

    def __len__(self) -> int:
        return len(self.length)


def build_examples(shards: TokenShards, max_tokens: int, min_tokens: int = 1) -> ExampleIndex:
    """Pack consecutive sentences of each document into examples of at most `max_tokens` real tokens.

    Examples shorter than `min_tokens` (SOP needs 2) are dropped.
    """
    assert max_tokens >= 1
    shard_ids, starts, lengths = [], [], []
    for k, shard in enumerate(shards.shards):
        sent, docs, ws = shard.sent_offsets, shard.doc_offsets, shard.word_starts
        out_start, out_len = [], []
        pos, d, end = 0, 0, int(docs[-1])
        while pos < end:
            while docs[d + 1] <= pos:
                d += 1
            limit = min(pos + max_tokens, int(docs[d + 1]))
            b = int(sent[np.searchsorted(sent, limit, side="right") - 1])
            if b <= pos:
                # A sentence longer than the example: cut it at the last word start that fits.
                # limit < document end here, since a document end is also a sentence offset.
                w = np.flatnonzero(ws[pos + 1:limit + 1])
                b = pos + 1 + int(w[-1]) if len(w) else limit
            if b - pos >= min_tokens:
                out_start.append(pos)
                out_len.append(b - pos)
            pos = b
        shard_ids.append(np.full(len(out_start), k, dtype=np.int32))
        starts.append(np.asarray(out_start, dtype=np.int64))
        lengths.append(np.asarray(out_len, dtype=np.int32))
    if not shard_ids:
        return ExampleIndex(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32))
    return ExampleIndex(np.concatenate(shard_ids), np.concatenate(starts), np.concatenate(lengths))


def read_example(shards: TokenShards, examples: ExampleIndex, example_id: int, sample_index: int) -> Example:
    """The tokens, word starts and inner sentence starts of one example."""
    shard = shards.shards[int(examples.shard[example_id])]
    a = int(examples.start[example_id])
    b = a + int(examples.length[example_id])
    sent = shard.sent_offsets
    # Sentence starts strictly inside (a, b): the example's own start and end are not split points.
    lo, hi = int(np.searchsorted(sent, a, side="right")), int(np.searchsorted(sent, b, side="left"))
    return Example(index=sample_index, tokens=np.asarray(shard.tokens[a:b], dtype=np.int64),
                   word_starts=np.asarray(shard.word_starts[a:b]), sent_starts=sent[lo:hi] - a)


def build_batch(shards: TokenShards, rows: ExampleIndex, sample_indices: np.ndarray, collator: Collator) -> dict:
    """One micro-batch: example row j of `rows`, as sample `sample_indices[j]`, in row order, collated.

    The single place a batch is built, in the training process (`num_workers=0`) or in a worker.
    """
    examples = [read_example(shards, rows, j, s) for j, s in enumerate(sample_indices.tolist())]
    return collator(examples)


# ---------------------------------------------------------------------------------------------
# 2-3. Order and micro-batches
# ---------------------------------------------------------------------------------------------


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The permutation of example ids visited in `epoch`."""
    rng = np.random.Generator(np.random.Philox(key=(int(seed) << 64) | int(epoch), counter=[0, 0, 0, 1]))
    return rng.permutation(num_examples)


def cut_micro_batches(seq_lengths: np.ndarray, budget: int) -> np.ndarray:
    """Greedy cut of sequences (in order) into runs of at most `budget` tokens; returns the bounds.

    One searchsorted per micro-batch: ~0.2 s for a million micro-batches.
    """
    total = np.concatenate(([0], np.cumsum(seq_lengths, dtype=np.int64)))
    bounds, i, n = [0], 0, len(seq_lengths)
    while i < n:
        j = int(np.searchsorted(total, total[i] + budget, side="right")) - 1
        assert j > i, "a sequence longer than the micro-batch budget"
        bounds.append(j)
        i = j
    return np.asarray(bounds, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Step arithmetic for the engine
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExampleLayout:
    """How a stage lays out an example: its sequence length and the specials it adds.

    `max_tokens` real tokens per example (the sequence length minus `num_specials`); examples with
    fewer than `min_tokens` are dropped (ALBERT's SOP needs 2 to split).
    """

    max_seq_len: int
    num_specials: int
    min_tokens: int = 1

    @property
    def max_tokens(self) -> int:
        return self.max_seq_len - self.num_specials


@dataclass(frozen=True)
class StepsInfo:
    """Tokens and micro-batches per optimizer step (tokens include specials; there is no padding)."""

    world_size: int
    num_examples: int
    tokens_per_epoch: int
    micro_batches_per_epoch: int
    mean_tokens_per_micro_batch: float  # measured on epoch 0's cut; at most tokens_per_micro_batch
    grad_accum_steps: int               # micro-batches per rank per optimizer step
    tokens_per_step: float              # expected tokens of one optimizer step over all ranks
    steps_per_epoch: float


def steps_info(shards: TokenShards, layout: ExampleLayout, data: DataLoaderConfig, world_size: int,
               examples: ExampleIndex | None = None, seq_lengths: np.ndarray | None = None) -> StepsInfo:
    """Gradient accumulation that brings a step closest to `data.global_batch_tokens`.

    Micro-batches are filled to the budget, not exactly to it, so the count uses the mean fill of
    epoch 0's cut: accum = round(global_batch_tokens / (world_size x mean tokens per micro-batch)),
    at least 1. `seq_lengths` (tokens of each collated sequence) defaults to length + specials.
    """
    if examples is None:
        examples = build_examples(shards, layout.max_tokens, layout.min_tokens)
    if seq_lengths is None:
        seq_lengths = examples.length.astype(np.int64) + layout.num_specials
    order = epoch_order(data.seed, 0, len(examples))
    num_mb = len(cut_micro_batches(seq_lengths[order], data.tokens_per_micro_batch)) - 1
    total = int(seq_lengths.sum())
    mean = total / max(1, num_mb)
    accum = max(1, round(data.global_batch_tokens / (world_size * mean)))
    return StepsInfo(world_size=world_size, num_examples=len(examples), tokens_per_epoch=total,
                     micro_batches_per_epoch=num_mb, mean_tokens_per_micro_batch=mean, grad_accum_steps=accum,
                     tokens_per_step=accum * world_size * mean, steps_per_epoch=num_mb / (accum * world_size))


# ---------------------------------------------------------------------------------------------
# 4-6. The loader
# ---------------------------------------------------------------------------------------------


class PackedLoader:
    """An endless iterator of this rank's packed micro-batches (the dicts the stage's collator builds).

    `state_dict()` after a batch was received describes the position after that batch's round on
    all ranks (call it when every rank has taken the same number of batches, e.g. after an
    optimizer step); `load_state_dict()` before iterating resumes there, on any world size.

    `prefetch` micro-batches are built ahead by a thread; with `num_workers` > 0 a pool of worker
    processes builds them instead, started by the first batch; `close()` (or leaving a `with`
    block, dropping the iterator, interpreter exit) stops it. Neither changes a batch.
    """

    def __init__(self, shards: TokenShards, layout: ExampleLayout, data: DataLoaderConfig, collator: Collator,
                 rank: int = 0, world_size: int = 1, examples: ExampleIndex | None = None, *,
                 prefetch: int = 2, num_workers: int = 0, seq_lengths: np.ndarray | None = None):
        if layout.max_seq_len > data.tokens_per_micro_batch:
            raise ConfigError(f"data.tokens_per_micro_batch={data.tokens_per_micro_batch} is below the sequence "
                            f"length {layout.max_seq_len}; raise it so one sequence fits")
        assert 0 <= rank < world_size
        self.shards, self.layout, self.data, self.collator = shards, layout, data, collator
        self.rank, self.world_size = rank, world_size
        self.prefetch, self.num_workers = prefetch, num_workers
        self.examples = examples if examples is not None else build_examples(
            shards, layout.max_tokens, layout.min_tokens)
        if len(self.examples) == 0:
            raise DataError(f"{shards.folder}: no training examples in the shards; check the tokenization stage")
        # Tokens each example becomes once collated: its real tokens and specials, or what the stage
        # measured when its collator adds more (Lattice-BERT's words); the budget counts these.
        self.seq_lengths = (self.examples.length.astype(np.int64) + layout.num_specials if seq_lengths is None
                            else np.asarray(seq_lengths, dtype=np.int64))
        assert len(self.seq_lengths) == len(self.examples)
        if int(self.seq_lengths.max()) > data.tokens_per_micro_batch:
            raise ConfigError(f"data.tokens_per_micro_batch={data.tokens_per_micro_batch} is below the longest "
                              f"collated sequence ({int(self.seq_lengths.max())} tokens); raise it")
        self.epoch, self.position = 0, 0
        self._stop: threading.Event | None = None
        self._pool: ProcessPoolExecutor | None = None

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def steps_info(self) -> StepsInfo:
        """`steps_info` for this loader's examples and world size."""
        return steps_info(self.shards, self.layout, self.data, self.world_size, self.examples, self.seq_lengths)

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain ints: where the next round of micro-batches starts, counted over all ranks."""
        return {"epoch": self.epoch, "position": self.position, "num_examples": self.num_examples,
                "seed": self.data.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (from any world size); the data and seed must be the ones it was saved with."""
        if int(state["num_examples"]) != self.num_examples or int(state["seed"]) != self.data.seed:
            raise DataError(f"data loader state is for {state['num_examples']} examples with seed {state['seed']}, "
                            f"but this run has {self.num_examples} with seed {self.data.seed}; resume with the "
                            f"same shards, objective.max_seq_len/sop and data.seed, or start a fresh run")
        self._stop_worker()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # -- iteration ------------------------------------------------------------------------------

    def _global_micro_batches(self, epoch: int, position: int) -> Iterator[tuple[int, np.ndarray, int]]:
        """(epoch, example ids, position after it) for every micro-batch from the given point on."""
        n = self.num_examples
        while True:
            order = epoch_order(self.data.seed, epoch, n)
            bounds = position + cut_micro_batches(self.seq_lengths[order[position:]], self.data.tokens_per_micro_batch)
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                yield epoch, order[a:b], b
            epoch, position = epoch + 1, 0

    def plan(self) -> Iterator[tuple[int, np.ndarray, tuple[int, int]]]:
        """This rank's micro-batches from the current state: (epoch, example ids, state after its round).

        Cheap (no token is read); `__iter__` turns each entry into a batch.
        """
        stream = self._global_micro_batches(self.epoch, self.position)
        while True:
            round_ = [next(stream) for _ in range(self.world_size)]
            epoch, ids, _ = round_[self.rank]
            last_epoch, _, last_pos = round_[-1]
            yield epoch, ids, (last_epoch + 1, 0) if last_pos == self.num_examples else (last_epoch, last_pos)

    def _task(self, epoch: int, ids: np.ndarray) -> tuple[ExampleIndex, np.ndarray]:
        """What building one micro-batch needs: its examples' rows and their sample indices (~16 B each)."""
        rows = ExampleIndex(self.examples.shard[ids], self.examples.start[ids], self.examples.length[ids])
        return rows, epoch * self.num_examples + ids

    def _rank_batches(self) -> Iterator[tuple[dict, tuple[int, int]]]:
        for epoch, ids, state in self.plan():
            rows, samples = self._task(epoch, ids)
            yield build_batch(self.shards, rows, samples, self.collator), state

    def _pool_batches(self) -> Iterator[tuple[dict, tuple[int, int]]]:
        """`_rank_batches`, built by `data.num_workers` processes and returned in plan order.

        2 x num_workers micro-batches are in flight: every worker has one to build and one queued,
        so none idles while the trainer takes a result, and memory stays bounded (a 16k-token
        micro-batch is ~0.5 MB). A worker's exception is re-raised here with its message.
        """
        num_workers = self.num_workers
        # fork starts a worker in ~50 ms and shares the parent's memory copy-on-write; spawn (where
        # fork is missing) re-imports torch, 1-2 s per worker. Either way the worker reopens the
        # shards by path, so nothing large is pickled.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = self._pool = ProcessPoolExecutor(
            num_workers, mp_context=multiprocessing.get_context(method), initializer=_worker_init,
            initargs=(str(self.shards.folder), self.collator))
        plan, in_flight = self.plan(), deque()
        try:
            while True:
                while len(in_flight) < 2 * num_workers:
                    epoch, ids, state = next(plan)
                    in_flight.append((pool.submit(_worker_build, *self._task(epoch, ids)), state))
                future, state = in_flight.popleft()
                try:
                    arrays = future.result()
                except BrokenProcessPool:
                    raise DataError(f"a data loader worker died (killed, e.g. out of memory?) while building "
                                    f"micro-batches; lower run.num_workers={num_workers} or set it "
                                    f"to 0 to build them in the training process") from None
                yield {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}, state
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if self._pool is pool:
                self._pool = None

    def __iter__(self) -> Iterator[dict]:
        self._stop_worker()
        if self.num_workers > 0:
            # The workers already build ahead; a prefetch thread on top would only add a queue.
            for batch, (self.epoch, self.position) in self._pool_batches():
                yield batch
            return
        source = self._rank_batches()
        if self.prefetch == 0:
            for batch, (self.epoch, self.position) in source:
                yield batch
            return
        stop = self._stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        worker = threading.Thread(target=_fill, args=(source, q, stop), daemon=True, name="kompakt-prefetch")
        worker.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "error":
                    raise item
                batch, (self.epoch, self.position) = item
                yield batch
        finally:
            stop.set()

    def close(self) -> None:
        """Stop the prefetch thread or the worker processes; iterating again restarts them."""
        self._stop_worker()

    def __enter__(self) -> PackedLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stop_worker(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if self._pool is not None:
            # Waits for the <= num_workers + 1 batches already handed to workers (~0.1 s each)
            # and drops the rest, so no process outlives the call.
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# What a worker process holds: the shards (reopened by path) and the stage's collator.
_WORKER: tuple | None = None


def _worker_init(shard_folder: str, collator: Collator) -> None:
    """Runs once in every worker process before its first micro-batch."""
    global _WORKER
    # The trainer owns the signals: Ctrl-C and Slurm's SIGTERM/SIGUSR1 reach the whole process group,
    # and a worker that died on them would leave the trainer unable to finish the step it saves at.
    # The trainer shuts the pool down itself.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    # Masking is numpy; one torch thread avoids oversubscribing the cores the workers share.
    torch.set_num_threads(1)
    _WORKER = (TokenShards(shard_folder), collator)


def _worker_build(rows: ExampleIndex, sample_indices: np.ndarray) -> dict:
    """`build_batch` in a worker; tensors go back as numpy arrays (plain pickle, no shared-memory fds)."""
    assert _WORKER is not None, "_worker_init did not run"
    shards, collator = _WORKER
    batch = build_batch(shards, rows, sample_indices, collator)
    return {k: v.numpy() if torch.is_tensor(v) else v for k, v in batch.items()}


def _fill(source: Iterator, q: queue.Queue, stop: threading.Event) -> None:
    """Background prefetch: build batches ahead until stopped; an error is handed to the consumer."""
    try:
        for item in source:
            while not stop.is_set():
                try:
                    q.put(("batch", item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
    except Exception as err:  # re-raised in the training thread by __iter__
        q.put(("error", err))


def expected_epochs(info: StepsInfo, max_steps: int) -> float:
    """Epochs that `max_steps` optimizer steps take (for the start-of-training log)."""
    return max_steps / info.steps_per_epoch if info.steps_per_epoch > 0 else math.inf

"""Length-bucketed batches of encoded task examples, resumable exactly (the loop's loader protocol).

Fine-tuning sets are small and their texts vary from 5 to 500 tokens, so batches are padded (the
stock heads take (B, L) tensors) but bucketed: each epoch's seeded permutation is cut into chunks of
`bucket` batches, each chunk sorted by length and cut into batches, and the batches of the epoch
shuffled again; padding falls to a few percent while the order stays random. The state is (epoch,
batch position), so a resumed job sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, bucket: int = 50) -> list[np.ndarray]:
    """The batches (arrays of feature indices) of one epoch: permuted, bucketed by length, shuffled."""
    rng = np.random.Generator(np.random.Philox(key=(int(seed) << 32) | int(epoch)))
    order = rng.permutation(len(lengths))
    batches = []
    step = batch_size * bucket
    for a in range(0, len(order), step):
        chunk = order[a:a + step]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Every feature once, sorted by length (least padding); callers restore the original order."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class BucketLoader:
    """An endless iterator of collated training batches with `state_dict()`/`load_state_dict()`."""

    def __init__(self, features: list[dict], collate: Callable[[list[dict]], dict], batch_size: int, seed: int):
        if not features:
            raise ValueError("no training features")
        self.features, self.collate = features, collate
        self.batch_size, self.seed = batch_size, seed
        self.lengths = np.array([len(f["input_ids"]) for f in features])
        self.epoch, self.position = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.features) // self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_features": len(self.features), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_features"] != len(self.features) or state["seed"] != self.seed:
            raise ValueError("the checkpoint's loader state is for other data or another seed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[dict]:
        while True:
            batches = epoch_batches(self.lengths, self.batch_size, self.seed, self.epoch)
            while self.position < len(batches):
                ids = batches[self.position]
                self.position += 1
                yield self.collate([self.features[i] for i in ids])
            self.epoch, self.position = self.epoch + 1, 0

    def close(self) -> None:
        pass

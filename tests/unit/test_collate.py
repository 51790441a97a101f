"""The packed micro-batch: the batch contract's keys, dtypes and flat indices."""

import numpy as np
import pytest
import torch

from _pretrain_shards import demo_tokenizer_and_shards
from kompakt.objective_config import ObjectiveConfig
from kompakt.pretrain.collate import collate, collate_examples
from kompakt.pretrain.data import build_examples, read_example
from kompakt.pretrain.masking import SpecialIds, mask_example

SEED = 7


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_docs):
    tok, shards = demo_tokenizer_and_shards(tmp_path_factory.mktemp("objectives"), demo_docs)
    return shards, SpecialIds.from_tokenizer(tok)


def some_examples(shards, sop, count=9):
    index = build_examples(shards, 128 - (3 if sop else 2), 2 if sop else 1)
    return [read_example(shards, index, i, 100 + i) for i in range(count)]


@pytest.mark.parametrize("masking,sop", [("whole_word", False), ("ngram", True), ("span", True), ("token", False)])
def test_batch_contract(demo, masking, sop):
    shards, sp = demo
    cfg = ObjectiveConfig(masking=masking, sop=sop, mask_rate=0.3)
    examples = some_examples(shards, sop)
    masked = [mask_example(ex, cfg, sp, SEED) for ex in examples]
    batch = collate(masked)
    again = collate_examples(examples, cfg, sp, SEED)
    assert again.keys() == batch.keys()
    assert all(torch.equal(v, again[k]) if torch.is_tensor(v) else v == again[k] for k, v in batch.items())

    lengths = [len(m.input_ids) for m in masked]
    T, B = sum(lengths), len(masked)
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.tolist() == np.concatenate(([0], np.cumsum(lengths))).tolist()
    assert batch["max_seqlen"] == max(lengths) and isinstance(batch["max_seqlen"], int)
    for key in ("input_ids", "position_ids", "token_type_ids"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (T,)
    assert batch["position_ids"].tolist() == [p for n in lengths for p in range(n)]
    M = len(batch["mlm_positions"])
    assert M == sum(len(m.mlm_positions) for m in masked) > 0
    assert batch["mlm_labels"].dtype == batch["mlm_positions"].dtype == torch.int64

    # Putting the labels back gives [CLS] tokens [SEP] ([CLS] A [SEP] B [SEP] with SOP) per sequence.
    ids = batch["input_ids"].clone()
    ids[batch["mlm_positions"]] = batch["mlm_labels"]
    for b, (ex, m) in enumerate(zip(examples, masked)):
        seq = ids[cu[b]:cu[b + 1]].numpy()
        assert seq[0] == sp.cls and seq[-1] == sp.sep
        inner = seq[1:-1]
        if sop:
            mid = int(np.flatnonzero(inner == sp.sep)[0])
            a, bb = inner[:mid], inner[mid + 1:]
            inner = np.concatenate((bb, a)) if m.sop_label else np.concatenate((a, bb))
        assert inner.tolist() == ex.tokens.tolist()

    if sop:
        assert batch["sop_labels"].tolist() == [m.sop_label for m in masked] and batch["sop_labels"].shape == (B,)
    else:
        assert "sop_labels" not in batch
    if masking == "span":
        left, right, rel = batch["sbo_left"], batch["sbo_right"], batch["sbo_rel"]
        assert left.shape == right.shape == rel.shape == (M,)
        assert torch.equal(left + 1 + rel, batch["mlm_positions"])
        # Boundaries stay inside the masked token's own sequence.
        seq_of = torch.searchsorted(cu[1:].long(), batch["mlm_positions"], right=True)
        assert torch.equal(torch.searchsorted(cu[1:].long(), left, right=True), seq_of)
        assert torch.equal(torch.searchsorted(cu[1:].long(), right, right=True), seq_of)
    else:
        assert "sbo_left" not in batch

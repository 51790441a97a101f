"""Distillation losses and layer maps (compress/losses.py, compress/distill.py) on tiny packed models.

The identity case: a student equal to its teacher, mapped layer to layer, has every loss at zero;
a different student has every loss above zero and gradients reach it. Layer maps follow TinyBERT
(uniform 4 of 12 -> 3, 6, 9, 12) and impossible maps fail before anything runs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.model_config import ModelConfig
from kompakt.models import build_pretraining_model
from kompakt.models.distill import DistillationModel
from kompakt.packed import Example

from kompakt.compress import losses as L
from kompakt.compress.distill import (DistillStep, MaskingCollator, Needs, TeacherCache, layer_map, needs_for)

ALL = {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logits": 1.0, "relation": 1.0, "similarity": 1.0,
       "mlm": 0.0}


def tiny(num_layers=4, hidden=32, heads=4, family="bert", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, vocab_size=128, hidden_size=hidden, num_layers=num_layers, num_heads=heads,
                      intermediate_size=2 * hidden, embedding_size=16, max_position_embeddings=64)
    return build_pretraining_model(cfg).eval()


def batch(seed=0, lengths=(17, 9, 30)):
    rng = np.random.default_rng(seed)
    collate = MaskingCollator(cls_id=2, sep_id=3, mask_id=4, vocab_size=128, num_specials=5, mask_rate=0.15, seed=1)
    examples = [Example(index=i, tokens=rng.integers(5, 128, n), word_starts=(rng.random(n) < 0.6).astype(np.uint8),
                        sent_starts=np.zeros(0, np.int64)) for i, n in enumerate(lengths)]
    return collate(examples)


def step_for(weights, mapping, teacher, relation_heads=4):
    needs = needs_for(weights, mapping, teacher.cfg.num_layers, True)
    return DistillStep(weights=weights, mapping=mapping, relation_layer=teacher.cfg.num_layers,
                       num_relation_heads=relation_heads, temperature=2.0, similarity_temperature=0.05,
                       cache=TeacherCache(None, "t", needs))


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_every_loss_is_zero_for_a_student_equal_to_its_teacher(family):
    teacher = tiny(family=family)
    student = DistillationModel(copy.deepcopy(teacher), teacher.cfg.hidden_size, project=True, similarity_bank=16)
    assert student.hidden_proj is None and student.sim_proj is None  # equal widths need no projection
    out = step_for(ALL, [1, 2, 3, 4], teacher)(student, batch(), teacher)
    assert set(out["losses"]) == {"embedding", "hidden", "attention", "logits", "relation", "similarity"}
    for name, value in out["losses"].items():
        assert abs(float(value.detach())) < 1e-6, (name, float(value.detach()))


def test_a_different_student_has_positive_losses_and_gradients():
    teacher = tiny(num_layers=4, hidden=32)
    student = DistillationModel(tiny(num_layers=2, hidden=16, seed=1), 32, project=True, similarity_bank=16).train()
    assert student.hidden_proj is not None and student.sim_proj is not None
    out = step_for(ALL, layer_map("uniform", 2, 4), teacher)(student, batch(), teacher)
    for name, value in out["losses"].items():
        assert float(value.detach()) > 1e-4, name
    out["loss"].backward()
    grads = [p.grad for p in student.student.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert int(student.bank_count) == 3  # the batch's three teacher embeddings went into the bank


def test_relations_need_no_projection_across_widths_and_head_counts():
    a, b = batch(), tiny(num_layers=2, hidden=24, heads=3, seed=2)
    teacher = tiny(num_layers=4, hidden=48, heads=6)
    weights = {k: 0.0 for k in ALL} | {"relation": 1.0}
    student = DistillationModel(b, 48, project=False)
    out = step_for(weights, layer_map("last", 2, 4), teacher, relation_heads=3)(student, a, teacher)
    assert float(out["loss"]) > 0 and set(out["losses"]) == {"relation"}


def test_unpack_puts_every_token_back_in_its_row():
    b = batch()
    x = torch.arange(b["input_ids"].numel(), dtype=torch.float32)[:, None]
    padded, mask = L.unpack(x, b["cu_seqlens"])
    assert padded.shape[:2] == (3, 32) and int(mask.sum()) == b["input_ids"].numel()
    assert torch.equal(padded[mask].squeeze(1), x.squeeze(1))
    assert float(padded[1, 11:].abs().sum()) == 0  # row 1 is 9 + 2 tokens long


def test_layer_maps():
    assert layer_map("uniform", 4, 12) == [3, 6, 9, 12]   # TinyBERT's g(m) = 3m
    assert layer_map("last", 2, 6) == [5, 6]
    assert layer_map([2, 5], 2, 6) == [2, 5]
    assert layer_map("uniform", 6, 6) == [1, 2, 3, 4, 5, 6]
    for spec, n, t, words in [("uniform", 5, 12, "divide"), ("uniform", 13, 12, "more than"),
                              ([1, 2], 3, 6, "one per"), ([3, 2], 2, 6, "increasing"), ([1, 7], 2, 6, "within")]:
        with pytest.raises(ConfigError, match=words):
            layer_map(spec, n, t)


def test_masking_is_a_pure_function_of_the_sample_index():
    a, b = batch(seed=0), batch(seed=0)
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "mlm_positions", "mlm_labels"))
    masked = a["mlm_positions"].numel() / (a["input_ids"].numel() - 6)
    assert 0.1 < masked < 0.35
    # the labels are the original tokens and no special position is ever predicted
    starts = a["cu_seqlens"][:-1].long()
    ends = a["cu_seqlens"][1:].long() - 1
    assert not set(a["mlm_positions"].tolist()) & set(starts.tolist() + ends.tolist())
    assert int((a["input_ids"][a["mlm_positions"]] == 4).sum()) > 0


def test_needs_follow_the_weights():
    n = needs_for({k: 0.0 for k in ALL} | {"hidden": 1.0}, [2, 4], 4, True)
    assert n == Needs(hidden_layers=[2, 4], qkv_layers=[], logits=False, pooled=False)
    n = needs_for(ALL, [2, 4], 3, True)
    assert n.hidden_layers == [0, 2, 4] and n.qkv_layers == [2, 3, 4] and n.logits and n.pooled

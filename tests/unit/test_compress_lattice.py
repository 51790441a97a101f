"""Distillation pieces for a Lattice-BERT teacher (compress/distill.py, kompakt/models/lattice.py taps): the
encoder's taps, the MSP collator (deterministic per example, picklable), the teacher cache key over lattice
spans, the student family checks, initialisation from the teacher, and every loss at zero for a lattice
student equal to its teacher on a batch with lexicon words."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.model_config import ModelConfig
from kompakt.models import build_pretraining_model
from kompakt.models.distill import DistillationModel
from kompakt.packed import Example
from kompakt.tokenizer import SpecialIds

from kompakt.compress.distill import (DistillStep, LatticeMaskingCollator, TeacherCache, heldout_mlm_loss,
                                      init_from_teacher, needs_for, student_config)
from kompakt.compress_config import StudentShape

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PAD, CLS, SEP, MASK = 0, 1, 2, 3
CHARS = {"研": 10, "究": 11, "生": 12, "命": 13, "起": 14, "源": 15}
VOCAB_SIZE = 64  # characters; lexicon word k has id 64 + k
ALL = {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logits": 1.0, "relation": 1.0, "similarity": 1.0,
       "mlm": 0.0}


def config(num_layers=2, hidden=32, heads=4) -> ModelConfig:
    return ModelConfig(family="lattice", vocab_size=VOCAB_SIZE, hidden_size=hidden, num_layers=num_layers,
                       num_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=64,
                       lattice={"num_words": 4, "max_word_len": 4, "max_relative_distance": 8})


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = build_pretraining_model(config(**kw)).eval()
    # Bias tables far from their N(0, 0.02) start, so a lost or uncopied bias shows above float noise.
    torch.nn.init.normal_(model.lattice_bert.position_bias.embeddings.weight, std=1.0)
    return model


@pytest.fixture
def tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"[PAD]": PAD, "[CLS]": CLS, "[SEP]": SEP, "[MASK]": MASK, **CHARS}
    Tokenizer(WordLevel(vocab, unk_token="[PAD]")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "lexicon.txt").write_text("研究\t50\n生命\t40\n起源\t30\n研究生\t20\n", encoding="utf-8")
    return tmp_path


def examples(first_index=0):
    """Three shard examples of 6, 12 and 18 characters ("研究生命起源" repeated), a sentence per copy."""
    return [Example(index=first_index + i, tokens=np.array([CHARS[c] for c in "研究生命起源" * (i + 1)]),
                    word_starts=np.ones(6 * (i + 1), np.uint8), sent_starts=np.array([6 * k for k in range(1, i + 1)]))
            for i in range(3)]


def collator(tokenizer_dir, mask_rate=0.3, seed=5):
    specials = SpecialIds(cls=CLS, sep=SEP, mask=MASK, pad=PAD, vocab_size=16)
    return LatticeMaskingCollator(specials, tokenizer_dir, config(), max_seq_len=32, mask_rate=mask_rate, seed=seed)


@torch.no_grad()
def test_lattice_taps_follow_bert_layout_and_the_last_equals_the_output(tokenizer_dir):
    model = tiny(num_layers=3)
    b = collator(tokenizer_dir)(examples())
    taps: list[dict] = []
    enc = model.lattice_bert
    x = enc(b["input_ids"], b["cu_seqlens"], lattice_start=b["lattice_start"], lattice_end=b["lattice_end"],
            max_seqlen=b["max_seqlen"], taps=taps)
    assert len(taps) == 3 + 1
    assert "qkv" not in taps[0] and all("qkv" in t for t in taps[1:])
    T = b["input_ids"].shape[0]
    assert taps[1]["qkv"].shape == (T, 3, 4, 8)
    torch.testing.assert_close(taps[-1]["hidden"], x, rtol=0, atol=0)
    torch.testing.assert_close(enc(b["input_ids"], b["cu_seqlens"], b["lattice_start"], b["lattice_end"],
                                   b["max_seqlen"]), x)


def test_the_msp_collator_is_a_pure_function_of_each_example_and_pickles(tokenizer_dir):
    collate = collator(tokenizer_dir)
    first = collate(examples())
    # Lexicon words were appended after each [SEP] (6 characters + [CLS]/[SEP] + 4 words per copy) and masked.
    assert first["cu_seqlens"].tolist() == [0, 12, 34, 66]
    assert first["input_ids"].max() >= VOCAB_SIZE and first["mlm_positions"].numel() > 0
    worker = pickle.loads(pickle.dumps(collate))  # what a loader worker gets: paths, not the loaded lexicon
    assert collate._lexicon is not None and worker._lexicon is None
    again = worker(examples())
    assert set(again) == set(first)
    assert all(torch.equal(first[k], again[k]) for k in first if k != "max_seqlen")
    other = collate(examples(first_index=10))  # other sample indices, other masking
    assert not torch.equal(first["mlm_positions"], other["mlm_positions"]) or not torch.equal(
        first["input_ids"], other["input_ids"])
    clean = collator(tokenizer_dir, mask_rate=0.0)(examples())  # TinyBERT's general distillation: clean text
    assert clean["mlm_positions"].numel() == 0 and not (clean["input_ids"] == MASK).any()
    assert torch.equal(clean["lattice_end"], first["lattice_end"])


def test_the_teacher_cache_key_covers_lattice_spans(tokenizer_dir):
    b = collator(tokenizer_dir)(examples())
    cache = TeacherCache(None, "digest", needs_for(ALL, [1, 2], 2, True))
    moved = dict(b, lattice_end=b["lattice_end"].clone())
    moved["lattice_end"][-1] += 1  # the last word ends one character later: same ids, other teacher outputs
    assert cache.key(b) == cache.key(dict(b)) != cache.key(moved)


def test_a_lattice_teacher_takes_only_a_lattice_student():
    lattice = config(num_layers=4)
    with pytest.raises(ConfigError, match="student.family=bert") as err:
        student_config(StudentShape(num_layers=2, family="bert"), lattice, "s")
    assert "\n" not in str(err.value)
    bert = ModelConfig(family="bert", vocab_size=128, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64)
    with pytest.raises(ConfigError, match="student.family=lattice needs a Lattice-BERT teacher") as err:
        student_config(StudentShape(num_layers=2, family="lattice"), bert, "s")
    assert "\n" not in str(err.value)
    cfg = student_config(StudentShape(num_layers=2, hidden_size=16), lattice, "s")
    assert cfg.family == "lattice" and cfg.lattice == lattice.lattice and cfg.num_layers == 2


@torch.no_grad()
def test_init_from_teacher_copies_the_lattice_bias_embeddings_head_and_mapped_layers():
    teacher, student = tiny(num_layers=4), tiny(seed=1, num_layers=2)
    init_from_teacher(student, teacher, [2, 4])
    s, t = student.state_dict(), teacher.state_dict()
    for key in ("lattice_bert.position_bias.embeddings.weight", "lattice_bert.embeddings.word_embeddings.weight",
                "cls.predictions.transform.dense.weight"):
        assert torch.equal(s[key], t[key]), key
    for i, j in enumerate([2, 4]):
        key = "lattice_bert.encoder.layer.{}.attention.self.query.weight"
        assert torch.equal(s[key.format(i)], t[key.format(j - 1)])


def test_every_loss_is_zero_for_a_lattice_student_equal_to_its_teacher(tokenizer_dir):
    teacher = tiny(num_layers=2)
    b = collator(tokenizer_dir)(examples())
    needs = needs_for(ALL, [1, 2], 2, True)
    step = DistillStep(weights=ALL, mapping=[1, 2], relation_layer=2, num_relation_heads=4, temperature=2.0,
                       similarity_temperature=0.05, cache=TeacherCache(None, "t", needs))
    student = DistillationModel(copy.deepcopy(teacher), 32, project=True, similarity_bank=16).eval()
    out = step(student, b, teacher)
    assert set(out["losses"]) == {"embedding", "hidden", "attention", "logits", "relation", "similarity"}
    for name, value in out["losses"].items():
        assert abs(float(value.detach())) < 1e-6, (name, float(value.detach()))
    # Not vacuous: another student's losses are above zero on the same batch.
    other = DistillationModel(tiny(seed=1, num_layers=2), 32, project=True, similarity_bank=16).train()
    assert float(step(other, b, teacher)["loss"].detach()) > 1e-3
    loss = heldout_mlm_loss(teacher, [b], torch.device("cpu"))  # the lattice model's loss is "msp"
    assert loss is not None and 0 < loss < 20

"""Task-specific distillation and its augmentation: the teacher's MLM proposes replacement words (labels
and O-tags kept, deterministic, for spaced and unspaced text); the KD loss is zero for a student equal
to its teacher; a distilled student learns the fine-tuned teacher's decisions, and a second job reads
the teacher's logits from the cache instead of running the teacher."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from kompakt.finetune.train import kd_loss

WORDS = "sol regn snø vind bok hus båt fjell elv skog by vei".split()


def rows(n=60, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = list(rng.choice(WORDS, size=int(rng.integers(4, 10))))
        out.append({"text": " ".join(w), "label": "snø" if "snø" in w else "annet"})
    return out


def test_augmentation_replaces_words_keeps_labels_and_is_deterministic(tiny_mlm):
    from kompakt.finetune.augment import Augmenter

    aug = Augmenter(tiny_mlm, p=0.4, device="cpu")
    src = rows(40)
    a = aug.augment(src, "classification", copies=3, seed=1)
    b = Augmenter(tiny_mlm, p=0.4, device="cpu").augment(src, "classification", copies=3, seed=1)
    assert a == b and len(a) == 120
    assert [r["label"] for r in a] == [r["label"] for r in src] * 3
    changed = sum(x["text"] != y["text"] for x, y in zip(a, src * 3))
    assert changed > 80  # p = 0.4 of 4-9 words: nearly every copy changes
    text = " ".join(r["text"] for r in a)
    assert "[MASK]" not in text and "##" not in text
    assert all(len(x["text"].split()) == len(y["text"].split()) for x, y in zip(a, src * 3))
    assert aug.report()["examples_per_second"] > 0


def test_augmentation_of_tokens_touches_only_o_words_and_unspaced_text_uses_words(tiny_mlm):
    from kompakt.finetune.augment import Augmenter, words_of

    aug = Augmenter(tiny_mlm, p=0.9, device="cpu")
    src = [{"tokens": ["Ola", "bor", "i", "Bergen", "nå"], "tags": ["B-PER", "O", "O", "B-LOC", "O"]}] * 20
    out = aug.augment(src, "token_classification", copies=1, seed=0)
    assert all(o["tokens"][0] == "Ola" and o["tokens"][3] == "Bergen" and o["tags"] == src[0]["tags"] for o in out)
    assert any(o["tokens"][1] != "bor" for o in out)
    words, joiner = words_of("这个电影非常好看")
    assert joiner == "" and len(words) >= 3 and "".join(words) == "这个电影非常好看"
    zh = aug.augment([{"text": "这个电影非常好看", "label": "pos"}] * 5, "classification", copies=1, seed=0)
    assert all(r["label"] == "pos" and " " not in r["text"] for r in zh)


def test_kd_loss_is_zero_for_the_teachers_own_logits():
    logits = torch.randn(8, 3)
    assert float(kd_loss(logits, logits.clone(), torch.zeros(8, dtype=torch.long), 2.0, False)) == pytest.approx(0, abs=1e-6)
    assert float(kd_loss(logits, torch.randn(8, 3), torch.zeros(8, dtype=torch.long), 2.0, False)) > 0
    tok = torch.randn(2, 5, 3)
    labels = torch.tensor([[-100, 1, 0, -100, -100], [-100, 2, 2, 1, -100]])
    assert float(kd_loss(tok, tok.clone(), labels, 1.0, False)) == pytest.approx(0, abs=1e-6)


def test_a_distilled_student_follows_its_teacher_and_reuses_cached_logits(tiny_mlm, tmp_path):
    from kompakt import dist
    from kompakt.engine import init_distributed
    from kompakt.loop import StopFlag
    from kompakt.train_config import EngineConfig, RunControl

    from kompakt.finetune.train import run_job

    init_distributed(dist.setup_env())
    data = rows(200, 3)
    splits = {"train": data[:140], "dev": data[140:170], "test": data[170:]}
    task = NS(name="snow", type="classification", train=NS(lr=3e-3, batch_size=16, epochs=3, max_seq_len=32,
                                                           patience=0, warmup_ratio=0.1, weight_decay=0.0))
    labels = ["annet", "snø"]
    common = dict(seed=0, engine_cfg=EngineConfig(), run_cfg=RunControl(save_every=10**9, log_every=5))
    with StopFlag() as stop:
        teacher = run_job(tiny_mlm, task, splits, labels, work_dir=tmp_path / "t", stop=stop, keep_dir=tmp_path / "tm",
                          **common)
        kd = {"teacher_dir": tmp_path / "tm", "alpha": 0.0, "temperature": 2.0, "cache_dir": tmp_path / "cache"}
        first = run_job(tiny_mlm, task, splits, labels, work_dir=tmp_path / "s1", stop=stop, distill=kd, **common)
        second = run_job(tiny_mlm, task, splits, labels, work_dir=tmp_path / "s2", stop=stop, distill=kd, **common)
    assert first["distill"]["teacher_logits_from_cache"] is False
    assert second["distill"]["teacher_logits_from_cache"] is True
    assert second["predictions"]["test"] == first["predictions"]["test"]
    t, s = teacher["predictions"]["test"], first["predictions"]["test"]
    agree = np.mean([a == b for a, b in zip(t, s)])
    assert agree > 0.8, agree

"""The compress stage end to end on real demo text: a pretrained tiny teacher is distilled (TinyBERT
losses) and module-replaced (BERT-of-Theseus) into students that stock transformers loads; the
held-out MLM loss shows they learnt; a second run reads the teacher's outputs from the cache
instead of running the teacher; a bad recipe fails before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kompakt.compress_config import CompressConfig
from kompakt.errors import ConfigError, DataError, KompaktError
from kompakt.model_config import ModelConfig

from test_pretrain import build_tokenizer_stage

FAST = {"data": {"tokens_per_micro_batch": 1024, "global_batch_tokens": 2048},
        "run": {"eval_batches": 4, "log_every": 10, "save_every": 1000},
        "optim": {"lr": 3e-3}, "schedule": {"kind": "constant", "warmup_steps": 2}}


@pytest.fixture(scope="module")
def tokenizer_stage(tmp_path_factory, demo_docs) -> Path:
    return build_tokenizer_stage(tmp_path_factory.mktemp("tok"), demo_docs[:2000])


@pytest.fixture(scope="module")
def teacher(tokenizer_stage, tmp_path_factory) -> Path:
    """A 4-layer, 64-wide BERT pretrained for 80 steps on the demo text (about 6 s on 2 cores)."""
    from kompakt.hf import export
    from kompakt.models import build_pretraining_model

    from kompakt.compress.distill import build_loaders
    from kompakt.compress_config import DistillStudent

    torch.manual_seed(0)
    cfg = ModelConfig(family="bert", vocab_size=1024, hidden_size=64, num_layers=4, num_heads=4,
                      intermediate_size=128, max_position_embeddings=128)
    model = build_pretraining_model(cfg).train()
    spec = DistillStudent.model_validate({"name": "t", "method": "distill", "student": {"num_layers": 1}, **FAST})

    class Env:
        rank, world_size = 0, 1

    loader, _ = build_loaders(spec, 1024, tokenizer_stage, Env)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _, batch in zip(range(80), loader):
        loss = model(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    loader.close()
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    return export(model.eval(), out, tokenizer_dir=tokenizer_stage / "tokenizer")


def run_stage(cfg: dict, teacher: Path, tokenizer_stage: Path, out: Path, cache: Path) -> dict:
    from kompakt.compress import stage

    stage.run(CompressConfig.model_validate({"teacher": str(teacher), "measure_speed": False, **cfg}), teacher,
              tokenizer_stage, out, stage_hash="test", inputs={}, recipe_name="test", release={},
              teacher_label="tiny teacher", cache_root=cache)
    return json.loads((out / "manifest.json").read_text())


def tiny_student(name="tiny", steps=60, **extra):
    return {"name": name, "method": "distill", "max_steps": steps,
            "student": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64, "init": "random"},
            "losses": {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logits": 1.0, "mlm": 0.0}, **FAST, **extra}


@pytest.mark.slow  # about 25 s on 2 cores
def test_general_distillation_teaches_the_student_and_a_second_run_reads_the_cache(teacher, tokenizer_stage,
                                                                                      tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM

    cfg = {"students": [tiny_student(cache_teacher=True)]}
    first = run_stage(cfg, teacher, tokenizer_stage, tmp_path / "a", tmp_path / "cache")
    f = first["students"]["tiny"]["figures"]
    # Untrained, the student predicts about uniformly over 1,024 ids (ln 1024 = 6.93); 60 steps of
    # distillation with no MLM label loss at all bring it near the teacher.
    assert f["mlm_before"] > 6.5
    assert f["mlm_after"] < f["mlm_before"] - 1.0, f
    assert f["mlm_after"] < f["mlm_teacher"] + 1.0, f
    folder = tmp_path / "a" / "students" / "tiny"
    model = AutoModel.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert AutoModelForMaskedLM.from_pretrained(folder).config.vocab_size == 1024
    card = (folder / "README.md").read_text()
    for words in ("tiny teacher", "distill", "parameters", "disk size", "held-out MLM loss"):
        assert words in card
    assert f["cache"]["teacher_forwards"] > 0 and f["cache"]["misses"] > 0

    second = run_stage(cfg, teacher, tokenizer_stage, tmp_path / "b", tmp_path / "cache")
    g = second["students"]["tiny"]["figures"]
    assert g["cache"]["teacher_forwards"] == 0, g["cache"]   # measured: the teacher never ran
    assert g["cache"]["hits"] == f["cache"]["misses"] + f["cache"]["hits"]
    assert g["final_losses"] == pytest.approx(f["final_losses"], rel=1e-6)


@pytest.mark.slow  # about 15 s
def test_theseus_successor_learns_and_loads(teacher, tokenizer_stage, tmp_path):
    from transformers import AutoModelForMaskedLM

    cfg = {"students": [{"name": "thes", "method": "theseus", "num_layers": 2, "max_steps": 40, "successor_steps": 10,
                         "rate_slope": 0.02, **FAST}]}
    m = run_stage(cfg, teacher, tokenizer_stage, tmp_path / "c", tmp_path / "cache")
    f = m["students"]["thes"]["figures"]
    # The successor starts as the teacher's first two layers (5.8 measured against the teacher's 5.5)
    # and closes most of that gap in 40 steps.
    assert f["mlm_after"] < f["mlm_before"] - 0.15, f
    assert f["mlm_after"] < f["mlm_teacher"] + 0.2, f
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "c" / "students" / "thes")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64


def test_identity_distillation_has_zero_loss_on_real_text(teacher, tokenizer_stage):
    """The teacher distilled into a copy of itself with the identity map: every loss is 0 on real batches."""
    import copy

    from kompakt.hf import load_pretrained
    from kompakt.models.distill import DistillationModel

    from kompakt.compress.distill import DistillStep, TeacherCache, build_loaders, needs_for
    from kompakt.compress_config import DistillStudent

    t = load_pretrained(teacher).eval()
    spec = DistillStudent.model_validate({"name": "s", "method": "distill", "student": {"num_layers": 4}, **FAST})

    class Env:
        rank, world_size = 0, 1

    _, batches = build_loaders(spec, 1024, tokenizer_stage, Env)
    w = {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logits": 1.0, "relation": 1.0, "similarity": 1.0,
         "mlm": 0.0}
    mapping = [1, 2, 3, 4]
    step = DistillStep(w, mapping, 4, 4, 1.0, 0.05, TeacherCache(None, "x", needs_for(w, mapping, 4, True)))
    out = step(DistillationModel(copy.deepcopy(t), 64, project=True, similarity_bank=64).eval(), batches[0], t)
    assert max(abs(float(v.detach())) for v in out["losses"].values()) < 1e-5, out["losses"]


def _expect_refusal(cfg: dict, teacher: Path, tokenizer_stage: Path, out: Path, words: str, kind=KompaktError):
    with pytest.raises(kind, match=words) as err:
        run_stage(cfg, teacher, tokenizer_stage, out, out.parent / "cache")
    assert "\n" not in str(err.value)
    assert not (out / "manifest.json").exists() and not list((out / "students").glob("*")) if out.exists() else True


def test_bad_recipes_fail_before_anything_runs(teacher, tokenizer_stage, tmp_path):
    out = tmp_path / "bad"
    layer = tiny_student(student={"num_layers": 3, "hidden_size": 32, "num_heads": 4})
    _expect_refusal({"students": [layer]}, teacher, tokenizer_stage, out, "divide", ConfigError)
    wide = tiny_student(student={"num_layers": 2, "hidden_size": 128, "num_heads": 4})
    _expect_refusal({"students": [wide]}, teacher, tokenizer_stage, out, "wider than", ConfigError)
    heads = tiny_student(student={"num_layers": 2, "hidden_size": 32, "num_heads": 2})
    _expect_refusal({"students": [heads]}, teacher, tokenizer_stage, out, "equal head counts", ConfigError)
    thes = {"name": "t", "method": "theseus", "num_layers": 3, **FAST}
    _expect_refusal({"students": [thes]}, teacher, tokenizer_stage, out, "divide the teacher", ConfigError)


def test_a_teacher_with_another_vocabulary_is_refused(teacher, tokenizer_stage, tmp_path, demo_docs):
    """Same names, same sizes, other ids: the vocabularies are compared, not the tokenizer names."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[500:502]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    _expect_refusal({"students": [tiny_student()]}, other, tokenizer_stage, tmp_path / "x", "different vocabularies",
                    DataError)


def test_a_teacher_that_is_not_bert_or_albert_is_refused(tokenizer_stage, tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    folder = tmp_path / "distil"
    DistilBertModel(DistilBertConfig(vocab_size=1024, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(folder)
    _expect_refusal({"students": [tiny_student()]}, folder, tokenizer_stage, tmp_path / "y", "distilbert", ConfigError)

"""Distillation of a Lattice-BERT teacher into a Lattice-BERT student through the compress stage, on real
Chinese text: a tokenizer stage (characters + jieba words) on People's Daily paragraphs of the demo-zh corpus,
a tiny teacher pretrained with MSP on distillation's own lattice batches, and a 2-layer student trained on
MSP-masked lattices whose held-out MSP loss falls; its folder loads through the repository's Lattice HF
classes. A bert student of a lattice teacher is refused before anything is written."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from kompakt.compress_config import CompressConfig
from kompakt.errors import ConfigError
from kompakt.model_config import ModelConfig

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "demo-zh" / "renmin-ribao-1998.txt.gz"
FAST = {"data": {"tokens_per_micro_batch": 1024, "global_batch_tokens": 1024},
        "masking": {"max_seq_len": 64},
        "run": {"eval_batches": 4, "log_every": 10, "save_every": 1000},
        "optim": {"lr": 3e-3}, "schedule": {"kind": "constant", "warmup_steps": 2}}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Env:
    rank, world_size = 0, 1


@pytest.fixture(scope="module")
def tokenizer_stage(tmp_path_factory) -> Path:
    """The real tokenizer stage on 800 paragraphs (about 80k characters): a character vocabulary of 1,024
    and jieba's words spelt with it, tokens/ and heldout/ shards."""
    from kompakt.config import TokenizerConfig
    from kompakt.runs import open_stage
    from kompakt.tokenization import stage
    from kompakt.tokenization.corpus import write_corpus

    paragraphs = [p for p in gzip.decompress(CORPUS.read_bytes()).decode("utf-8").splitlines() if p.strip()][:800]
    tmp = tmp_path_factory.mktemp("lattice-compress")
    cfg = TokenizerConfig(kind="wordpiece", family="lattice", vocab_size=1024, chinese_chars=True, lexicon="jieba",
                          lexicon_size=3000, heldout_fraction=0.05)
    with open_stage(tmp / "run", "tokenizer", cfg.model_dump(mode="json"), {}) as run:
        stage.run(cfg, write_corpus(paragraphs, tmp / "zh", lang="zh"), run)
    return run.final_dir


def teacher_config(tokenizer_stage: Path) -> ModelConfig:
    """A 4-layer, 64-wide Lattice-BERT over the stage's characters and lexicon words."""
    from transformers import AutoTokenizer

    tok_dir = tokenizer_stage / "tokenizer"
    num_words = len((tok_dir / "lexicon.txt").read_text(encoding="utf-8").splitlines())
    vocab_size = -(-len(AutoTokenizer.from_pretrained(str(tok_dir))) // 64) * 64
    return ModelConfig(family="lattice", vocab_size=vocab_size, hidden_size=64, num_layers=4, num_heads=4,
                       intermediate_size=128, max_position_embeddings=128,
                       lattice={"num_words": num_words, "max_word_len": 4, "max_relative_distance": 16})


def export_teacher(model, tokenizer_stage: Path, out: Path) -> Path:
    from kompakt import hf_lattice

    return hf_lattice.export(model.eval(), out, tokenizer_dir=tokenizer_stage / "tokenizer")


@pytest.fixture(scope="module")
def untrained_teacher(tokenizer_stage, tmp_path_factory) -> Path:
    """The teacher's shape, randomly initialised and exported: enough for the checks made before training."""
    from kompakt.models import build_pretraining_model

    torch.manual_seed(0)
    model = build_pretraining_model(teacher_config(tokenizer_stage))
    return export_teacher(model, tokenizer_stage, tmp_path_factory.mktemp("untrained") / "teacher")


@pytest.fixture(scope="module")
def teacher(tokenizer_stage, tmp_path_factory) -> Path:
    """The teacher pretrained with MSP for 60 steps on distillation's own lattice batches (about 13 s on
    2 cores), exported as pretraining exports it (with the lexicon)."""
    from kompakt.models import build_pretraining_model

    from kompakt.compress.distill import build_loaders
    from kompakt.compress_config import DistillStudent

    cfg = teacher_config(tokenizer_stage)
    torch.manual_seed(0)
    model = build_pretraining_model(cfg).train()
    spec = DistillStudent.model_validate({"name": "t", "method": "distill", "student": {"num_layers": 1}, **FAST})
    loader, _ = build_loaders(spec, cfg.vocab_size, tokenizer_stage, Env, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _, batch in zip(range(60), loader):
        assert "lattice_start" in batch  # the loader built lattices, not MaskingCollator's plain rows
        loss = model(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    loader.close()
    return export_teacher(model, tokenizer_stage, tmp_path_factory.mktemp("teacher") / "teacher")


def run_stage(cfg: dict, teacher: Path, tokenizer_stage: Path, out: Path) -> dict:
    from kompakt.compress import stage

    stage.run(CompressConfig.model_validate({"teacher": str(teacher), "measure_speed": False, **cfg}), teacher,
              tokenizer_stage, out, stage_hash="test", inputs={}, recipe_name="test", release={},
              teacher_label="tiny lattice teacher", cache_root=out.parent / "cache")
    return json.loads((out / "manifest.json").read_text())


def student(**shape) -> dict:
    return {"name": "small", "method": "distill", "max_steps": 40,
            "student": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64, "init": "random",
                        **shape},
            "losses": {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logits": 1.0, "mlm": 0.0}, **FAST}


@pytest.mark.slow  # about 30 s on 2 cores, fixtures included
def test_a_lattice_teacher_distils_into_a_lattice_student_that_loads(teacher, tokenizer_stage, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModel, AutoModelForMaskedLM

    import kompakt
    from kompakt.hf_lattice import folder_lexicon, lattice_batch, lattice_of_row

    out = tmp_path / "comp"
    f = run_stage({"students": [student()]}, teacher, tokenizer_stage, out)["students"]["small"]["figures"]
    # Held-out MSP loss over characters and words: an untrained student predicts about uniformly over the
    # 1,024 characters + about 3,000 words; 40 steps of distillation bring it to the teacher's (measured
    # 8.65 -> 7.26, teacher 7.26; the 60-step teacher is itself weak).
    assert f["mlm_before"] > 7.0, f
    assert f["mlm_after"] < f["mlm_before"] - 1.0, f
    assert math.isfinite(f["mlm_teacher"]) and f["mlm_teacher"] < f["mlm_before"], f
    assert f["steps"] == 40 and all(math.isfinite(v) for v in f["final_losses"].values()), f

    folder = out / "students" / "small"
    assert (folder / "lexicon.txt").read_bytes() == (teacher / "lexicon.txt").read_bytes()
    card = (folder / "README.md").read_text()
    assert "register_hf" in card and "held-out MSP loss" in card and "MLM loss" not in card
    kompakt.register_hf()
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "LatticeBertForMaskedLM"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert AutoModel.from_pretrained(folder).config.model_type == "lattice-bert"
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    lexicon = folder_lexicon(folder, model.config)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    rows = [lattice_of_row([cls_id, *[tok.token_to_id(c) for c in text], sep_id], lexicon, cls_id=cls_id,
                           sep_id=sep_id) for text in ("经济继续以较高速度增长", "中国人民")]
    assert any(len(lat) > lat.num_chars for lat in rows)  # lexicon words were matched
    batch = lattice_batch(rows, pad_id=tok.token_to_id("[PAD]"))
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] >= model.config.vocab_size + model.config.num_words and torch.isfinite(logits).all()


def test_a_bert_student_of_a_lattice_teacher_is_refused_before_anything_is_written(untrained_teacher,
                                                                                   tokenizer_stage, tmp_path):
    teacher, out = untrained_teacher, tmp_path / "bad"
    with pytest.raises(ConfigError, match="student.family=bert") as err:
        run_stage({"students": [student(family="bert")]}, teacher, tokenizer_stage, out)
    assert "\n" not in str(err.value)
    assert not out.exists()
    # Theseus on a lattice teacher stays refused.
    thes = {"name": "t", "method": "theseus", "num_layers": 2, **{k: v for k, v in FAST.items() if k != "masking"}}
    with pytest.raises(ConfigError, match="theseus does not support a Lattice-BERT"):
        run_stage({"students": [thes]}, teacher, tokenizer_stage, out)
    assert not out.exists()

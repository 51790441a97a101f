"""A Lattice-BERT fine-tuned by the real finetune job on the shipped demo-zh suite (sentiment, POS): a tiny
tokenizer stage (characters + jieba words) and a tiny exported LatticeBertForMaskedLM, a few epochs each on a
few hundred examples. The fine-tuned folders load through the stock Auto classes, the features carry lattice
words, POS gives one tag per word, both beat the trivial baseline, and inference (infer's Predictor) and the
zero-shot pseudo-perplexity of eval run on the lattice. About 20 s on 2 cores."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

import kompakt
from kompakt import hf_lattice
from kompakt.eval.metrics import compute
from kompakt.finetune.tasks import load_suite, load_task, subsample

MAX_SEQ_LEN = 64  # characters of a sentence cut to 62; words fill what is left
TRAIN = {"sentiment": 400, "pos": 300}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def suite():
    s = load_suite("demo-zh")
    return s, {name: load_task(s.task(name), s.folder) for name in TRAIN}


@pytest.fixture(scope="module")
def lattice_dir(tmp_path_factory, suite):
    """The tokenizer stage on the tasks' training text (characters + jieba's words), and a tiny randomly
    initialised Lattice-BERT exported with it (as pretraining exports)."""
    from transformers import AutoTokenizer

    from kompakt.config import TokenizerConfig
    from kompakt.model_config import ModelConfig
    from kompakt.models import build_pretraining_model
    from kompakt.runs import open_stage
    from kompakt.tokenization import stage
    from kompakt.tokenization.corpus import write_corpus

    _, data = suite
    tmp = tmp_path_factory.mktemp("lattice-ft")
    texts = ([e["text"] for e in data["sentiment"].splits["train"][:1500]]
             + ["".join(e["tokens"]) for e in data["pos"].splits["train"][:1500]])
    cfg = TokenizerConfig(kind="wordpiece", family="lattice", vocab_size=1024, chinese_chars=True, lexicon="jieba",
                          lexicon_size=3000, heldout_fraction=0.0)
    with open_stage(tmp / "run", "tokenizer", cfg.model_dump(mode="json"), {}) as run:
        stage.run(cfg, write_corpus(texts, tmp / "zh", lang="zh"), run)
    tok_dir = run.final_dir / "tokenizer"
    num_words = len((tok_dir / "lexicon.txt").read_text(encoding="utf-8").splitlines())
    vocab_size = -(-len(AutoTokenizer.from_pretrained(str(tok_dir))) // 64) * 64
    model_cfg = ModelConfig(family="lattice", vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=2,
                            intermediate_size=128, max_position_embeddings=128,
                            lattice={"num_words": num_words, "max_word_len": 4, "max_relative_distance": 16})
    torch.manual_seed(0)
    return hf_lattice.export(build_pretraining_model(model_cfg), tmp / "export", tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def jobs(lattice_dir, suite, tmp_path_factory):
    """Both tasks fine-tuned by finetune/train.py's run_job (the finetune stage's job), models kept."""
    from kompakt import dist
    from kompakt.engine import init_distributed
    from kompakt.finetune.train import run_job
    from kompakt.loop import StopFlag
    from kompakt.train_config import EngineConfig, RunControl

    s, data = suite
    tmp = tmp_path_factory.mktemp("jobs")
    init_distributed(dist.setup_env())
    out = {}
    for name, n in TRAIN.items():
        d = data[name]
        splits = {"train": subsample(d.splits["train"], n, 0), "dev": d.splits["dev"][:100],
                  "test": d.splits["test"][:200]}
        job = NS(name=name, type=s.task(name).type, train=NS(lr=2e-3, batch_size=32, epochs=4, max_seq_len=MAX_SEQ_LEN,
                                                            patience=0, warmup_ratio=0.1, weight_decay=0.01))
        with StopFlag() as stop:
            result = run_job(lattice_dir, job, splits, d.labels, seed=0, work_dir=tmp / name, engine_cfg=EngineConfig(),
                             run_cfg=RunControl(save_every=10**9, log_every=1000), stop=stop, keep_dir=tmp / f"{name}-model")
        assert result["stopped"] == "done"
        out[name] = (job, splits, d.labels, result, tmp / f"{name}-model")
    return out


def _kind(name: str, folder: Path, labels: list[str]):
    """The task type as run_job uses it for this folder (wrapped for the lattice), tokenizer and model."""
    from kompakt.finetune.heads import task_type
    from kompakt.finetune.lattice import for_model
    from kompakt.finetune.train import load_model

    kind = task_type({"sentiment": "classification", "pos": "token_classification"}[name])
    tokenizer, model = load_model(folder, kind, labels)
    return for_model(kind, model, folder, tokenizer), tokenizer, model


def test_features_carry_lattice_words_within_max_seq_len(lattice_dir, suite):
    _, data = suite
    for name, field in (("sentiment", "text"), ("pos", "tokens")):
        labels = data[name].labels
        kind, tokenizer, _ = _kind(name, lattice_dir, labels)
        assert type(kind).__name__ == "LatticeTask"
        rows = data[name].splits["dev"][:100]
        feats = kind.encode(rows, tokenizer, MAX_SEQ_LEN, {l: i for i, l in enumerate(labels)}, train=False)
        num_chars = [len(tokenizer("".join(r[field]) if name == "pos" else r[field], truncation=True,
                                   max_length=MAX_SEQ_LEN)["input_ids"]) for r in rows]
        lengths = [len(f["input_ids"]) for f in feats]
        assert max(lengths) <= MAX_SEQ_LEN
        # Every sentence with room left after its characters holds lexicon words (almost every Chinese one
        # has some); a sentence whose characters fill max_seq_len keeps none (words beyond it are dropped).
        room = [(n, c) for n, c in zip(lengths, num_chars) if c < MAX_SEQ_LEN - 4]
        assert len(room) >= 30 and sum(n > c for n, c in room) >= 0.9 * len(room), (name, room)
        assert any(n == MAX_SEQ_LEN for n, c in zip(lengths, num_chars) if c < MAX_SEQ_LEN)  # words cut at the limit
        assert all(n == c for n, c in zip(lengths, num_chars) if c == MAX_SEQ_LEN)
        if name == "pos":
            for f, c in zip(feats, num_chars):
                assert all(l == -100 for l in f["labels"][c:]) and max(f["first"]) < c


def test_finetuned_lattice_models_load_and_beat_the_trivial_baseline(jobs):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    kompakt.register_hf()
    for name, auto in (("sentiment", AutoModelForSequenceClassification), ("pos", AutoModelForTokenClassification)):
        job, splits, labels, result, folder = jobs[name]
        model = auto.from_pretrained(folder)
        assert model.config.model_type == "lattice-bert" and (folder / "lexicon.txt").is_file()
        assert [model.config.id2label[i] for i in range(len(labels))] == labels
        preds, test = result["predictions"]["test"], splits["test"]
        if name == "sentiment":
            gold = [e["label"] for e in test]
            top = Counter(e["label"] for e in splits["train"]).most_common(1)[0][0]
            score, trivial = compute("accuracy", gold, preds), compute("accuracy", gold, [top] * len(gold))
        else:
            gold = [e["tags"] for e in test]
            assert [len(p) for p in preds] == [len(e["tokens"]) for e in test]  # one tag per word
            top = Counter(t for e in splits["train"] for t in e["tags"]).most_common(1)[0][0]
            score = compute("token_accuracy", gold, preds)
            trivial = compute("token_accuracy", gold, [[top] * len(g) for g in gold])
        # Measured: sentiment 0.67 against 0.48 (majority class), POS 0.59 against 0.20 (most frequent tag).
        assert score > trivial + 0.05, (name, score, trivial)


def test_the_kept_folder_predicts_what_the_job_predicted(jobs):
    """The saved model, reloaded, with the same lattice features gives the job's own test predictions."""
    from kompakt.finetune.train import predict

    for name in TRAIN:
        job, splits, labels, result, folder = jobs[name]
        kind, tokenizer, model = _kind(name, folder, labels)
        feats = kind.encode(splits["test"], tokenizer, MAX_SEQ_LEN, {l: i for i, l in enumerate(labels)}, train=False)
        again = predict(model, kind, feats, splits["test"], labels, 32, tokenizer.pad_token_id, torch.device("cpu"))
        assert again == result["predictions"]["test"], name


def test_infer_predictor_runs_the_lattice(jobs):
    """infer's Predictor on the fine-tuned sentiment folder: torch with the words appended (the same labels
    as the job on texts whose lattice fits both limits), and ONNX refused with one line."""
    from kompakt.errors import ConfigError
    from kompakt.infer.runtime import load_predictor

    job, splits, labels, result, folder = jobs["sentiment"]
    predictor = load_predictor(folder, runtime="auto")
    assert predictor.runtime == "torch" and predictor.lattice
    kind, tokenizer, _ = _kind("sentiment", folder, labels)
    feats = kind.encode(splits["test"], tokenizer, MAX_SEQ_LEN, {l: i for i, l in enumerate(labels)}, train=False)
    short = [i for i, f in enumerate(feats) if len(f["input_ids"]) < MAX_SEQ_LEN][:40]
    assert len(short) >= 20
    out = predictor.predict([splits["test"][i]["text"] for i in short])
    assert [o["label"] for o in out] == [result["predictions"]["test"][i] for i in short]
    assert all(abs(sum(o["probs"]) - 1) < 1e-5 for o in out)
    with pytest.raises(ConfigError, match="ONNX does not support Lattice-BERT"):
        load_predictor(folder, runtime="onnx")
    tokens = load_predictor(jobs["pos"][4], task="tokens").predict(["中国人民银行今天发布了新的报告。"])
    assert isinstance(tokens[0]["spans"], list)


def test_zero_shot_pseudo_perplexity_reads_the_lattice(lattice_dir, suite):
    from kompakt.eval.pll import pseudo_perplexity

    _, data = suite
    texts = [e["text"] for e in data["sentiment"].splits["test"][:6]]
    z = pseudo_perplexity(lattice_dir, texts, max_len=32)
    assert z is not None and np.isfinite(z["pseudo_perplexity"]) and z["texts"] == 6
    # A random model over characters only (the word rows left out): near the character vocabulary's size.
    vocab = hf_lattice.LatticeBertConfig.from_pretrained(lattice_dir).vocab_size
    assert 0.3 * vocab < z["pseudo_perplexity"] < 3 * vocab

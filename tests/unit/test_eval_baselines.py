"""TF-IDF and BiLSTM baselines on small synthetic tasks whose labels follow a rule; learning-curve sizes."""

import collections

import numpy as np
import pytest

from kompakt.errors import ConfigError, DataError
from kompakt.eval import metrics as M
from kompakt.eval.baselines import bilstm_baseline, learning_curve_sizes, subsample, tfidf_baseline

FILLER = ("we saw the film on a rainy day with some friends and then walked home after it ended late "
          "while talking about music food trains books city weather work school").split()
POS, NEG = ["great", "excellent", "wonderful"], ["awful", "terrible", "boring"]


def sentiment(n, seed):
    """Three classes (45/30/25 %): a positive or negative cue word at a random place, or none."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = list(rng.choice(FILLER, rng.integers(5, 12)))
        label = str(rng.choice(["neutral", "positive", "negative"], p=[0.45, 0.3, 0.25]))
        if label != "neutral":
            cue = str(rng.choice(POS if label == "positive" else NEG))
            words.insert(int(rng.integers(0, len(words) + 1)), cue)
        out.append({"text": " ".join(words), "label": label})
    return out


def pairs(n, seed):
    """The second text agrees ("also", "too") or disagrees ("not", "never") with the first (60/40 %)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        agree = rng.random() < 0.6
        second = list(rng.choice(FILLER, 5))
        cue = str(rng.choice(["also", "too"] if agree else ["not", "never"]))
        second.insert(int(rng.integers(0, 6)), cue)
        out.append({"text": " ".join(rng.choice(FILLER, 6)), "text_pair": " ".join(second),
                    "label": "entailment" if agree else "contradiction"})
    return out


def scores(n, seed):
    """Regression: (number of positive cue words) - (number of negative ones) + noise (sd 0.3)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k_pos, k_neg = rng.integers(0, 3), rng.integers(0, 3)
        words = list(rng.choice(FILLER, 6)) + list(rng.choice(POS, k_pos)) + list(rng.choice(NEG, k_neg))
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": float(k_pos - k_neg + rng.normal(0, 0.3))})
    return out


def ner(n, seed):
    """Tagging rule: "<first name> Nordmann" is B-PER I-PER; a place after "i" is B-LOC; the rest O."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.integers(4, 10)):
            r = rng.random()
            if r < 0.15:
                tokens += [str(rng.choice(["Ola", "Kari", "Per", "Ingrid"])), "Nordmann"]
                tags += ["B-PER", "I-PER"]
            elif r < 0.3:
                tokens += ["i", str(rng.choice(["Oslo", "Bergen", "Tromsø", "Bodø"]))]
                tags += ["O", "B-LOC"]
            else:
                tokens.append(str(rng.choice(FILLER)))
                tags.append("O")
        out.append({"tokens": tokens, "tags": tags})
    return out


def chinese(n, seed):
    """No spaces: the label is the cue word 喜欢 (like) or 讨厌 (hate) inside a run of characters."""
    rng = np.random.default_rng(seed)
    chars = list("我们今天在公园里看见了很多人和车天气")
    out = []
    for _ in range(n):
        run = "".join(rng.choice(chars, rng.integers(6, 14)))
        label = str(rng.choice(["好", "差"]))
        k = int(rng.integers(0, len(run) + 1))
        out.append({"text": run[:k] + ("喜欢" if label == "好" else "讨厌") + run[k:], "label": label})
    return out


def _majority(train, gold):
    top = collections.Counter(e["label"] for e in train).most_common(1)[0][0]
    return M.compute("accuracy", gold, [top] * len(gold))


@pytest.mark.parametrize("make,task_type", [(sentiment, "classification"), (pairs, "pair_classification"),
                                            (chinese, "classification")])
def test_classification_baselines_beat_the_majority_class(make, task_type):
    train, dev, test = make(300, 0), make(80, 1), make(150, 2)
    gold = [e["label"] for e in test]
    majority = _majority(train, gold)
    assert majority < 0.65
    for baseline in (tfidf_baseline, bilstm_baseline):
        pred = baseline(task_type, train, dev, test, seed=0)
        assert len(pred) == len(test) and all(isinstance(p, str) for p in pred)
        assert M.compute("accuracy", gold, pred) > majority + 0.25, baseline.__name__


def test_regression_baselines_correlate():
    train, dev, test = scores(300, 0), scores(80, 1), scores(150, 2)
    gold = [e["label"] for e in test]
    for baseline in (tfidf_baseline, bilstm_baseline):
        pred = baseline("regression", train, dev, test, seed=0)
        assert all(isinstance(p, float) for p in pred)
        assert M.compute("pearson", gold, pred) > 0.8, baseline.__name__


def test_token_baselines_learn_the_tagging_rule():
    train, dev, test = ner(200, 0), ner(50, 1), ner(100, 2)
    gold = [e["tags"] for e in test]
    for baseline in (tfidf_baseline, bilstm_baseline):
        pred = baseline("token_classification", train, dev, [{"tokens": e["tokens"]} for e in test], seed=0)
        assert [len(p) for p in pred] == [len(g) for g in gold]
        assert M.compute("span_f1", gold, pred) > 0.9, baseline.__name__


def test_baselines_are_deterministic_and_leave_torch_alone():
    import torch

    train, dev, test = sentiment(120, 0), sentiment(40, 1), sentiment(60, 2)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = bilstm_baseline("classification", train, dev, test, seed=5, epochs=3)
    assert torch.equal(torch.rand(1), expected_next)  # the global RNG is untouched
    assert torch.get_num_threads() == threads
    assert a == bilstm_baseline("classification", train, dev, test, seed=5, epochs=3)
    assert tfidf_baseline("classification", train, dev, test, seed=5) == tfidf_baseline(
        "classification", train, dev, test, seed=5)


def test_qa_has_no_baseline_and_errors_are_clear():
    qa = [{"id": "1", "question": "q", "context": "c", "answers": {"text": ["c"], "answer_start": [0]}}]
    assert tfidf_baseline("qa", qa, qa, qa, seed=0) is None
    assert bilstm_baseline("qa", qa, qa, qa, seed=0) is None
    with pytest.raises(ConfigError, match="valid task types"):
        tfidf_baseline("ner", [], [], [], seed=0)
    with pytest.raises(DataError, match="train example 1 has no 'label'"):
        tfidf_baseline("classification", [{"text": "a", "label": "x"}, {"text": "b"}], [], [{"text": "c"}],
                       seed=0)
    with pytest.raises(DataError, match="train split is empty"):
        bilstm_baseline("classification", [], [], [{"text": "c"}], seed=0)


def test_learning_curve_sizes():
    assert learning_curve_sizes(800) == [100, 500, "all"]
    assert learning_curve_sizes(5000, sizes=(1000, 100)) == [100, 1000, "all"]
    assert learning_curve_sizes(50) == ["all"]
    with pytest.raises(ConfigError, match="positive integers"):
        learning_curve_sizes(100, sizes=(0, 10))


def test_subsample_is_stratified_nested_and_seeded():
    label = lambda i: "a" if i % 10 < 7 else ("b" if i % 10 < 9 else "c")  # noqa: E731  70/20/10 %
    train = [{"text": str(i), "label": label(i)} for i in range(1000)]
    small, large = subsample(train, 100, seed=1), subsample(train, 500, seed=1)
    counts = collections.Counter(e["label"] for e in small)
    assert len(small) == 100 and abs(counts["a"] - 70) <= 1 and abs(counts["b"] - 20) <= 1
    assert abs(counts["c"] - 10) <= 1
    assert {e["text"] for e in small} <= {e["text"] for e in large}
    assert small == subsample(train, 100, seed=1) and small != subsample(train, 100, seed=2)
    assert [int(e["text"]) for e in small] == sorted(int(e["text"]) for e in small)  # original order
    assert {e["label"] for e in subsample(train, 3, seed=0)} == {"a", "b", "c"}  # every label once
    assert subsample(train, "all", seed=0) == train and subsample(train, 5000, seed=0) == train
    regression = [{"text": str(i), "label": float(i)} for i in range(50)]
    assert len(subsample(regression, 10, seed=0)) == 10


def test_training_rows_cap_the_subsample_for_jobs_and_baselines_alike():
    from kompakt.finetune.tasks import training_rows

    train = [{"text": str(i), "label": "ab"[i % 2]} for i in range(300)]
    assert training_rows(train, "all", 0, None) == train
    assert training_rows(train, "all", 0, 100) == train[:100]
    assert training_rows(train, 200, 3, 50) == subsample(train, 200, seed=3)[:50]

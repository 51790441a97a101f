"""Task metrics against hand-computed values, seqeval/sklearn, and the SQuAD v1.1 normalisation."""

import numpy as np
import pytest

from kompakt.errors import ConfigError, DataError
from kompakt.eval import metrics as M


def test_classification_metrics_by_hand():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    assert M.compute("accuracy", gold, pred) == pytest.approx(3 / 5)
    # F1: a = 2*1/(2*1+1+1) = 0.5, b = 2*2/(2*2+1+0) = 0.8, c = 0 -> macro 1.3/3.
    assert M.compute("macro_f1", gold, pred) == pytest.approx(1.3 / 3)
    # Binary MCC = (tp*tn - fp*fn) / sqrt(...): tp=2, tn=1, fp=1, fn=1 -> (2-1)/sqrt(3*3*2*2) = 1/6.
    assert M.compute("mcc", ["y", "y", "y", "n", "n"], ["y", "y", "n", "y", "n"]) == pytest.approx(1 / 6)


def test_correlations_and_constant_predictions():
    gold = [1.0, 2.0, 3.0, 4.0]
    assert M.compute("pearson", gold, [2.0, 4.0, 6.0, 8.0]) == pytest.approx(1.0)
    assert M.compute("spearman", gold, [1.0, 10.0, 100.0, 1000.0]) == pytest.approx(1.0)
    assert M.compute("pearson", gold, [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    assert M.compute("pearson", gold, [5.0] * 4) == 0.0  # constant: no information, not NaN
    with pytest.raises(DataError, match="finite"):
        M.compute("pearson", gold, [1.0, float("nan"), 2.0, 3.0])


def test_span_f1_and_token_accuracy():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG"]]
    # 2 correct spans, 2 predicted, 3 gold -> P = 1, R = 2/3, F1 = 0.8.
    assert M.compute("span_f1", gold, pred) == pytest.approx(0.8)
    from seqeval.metrics import f1_score

    assert M.compute("span_f1", gold, pred) == pytest.approx(f1_score(gold, pred))
    assert M.compute("token_accuracy", gold, pred) == pytest.approx(5 / 6)
    with pytest.raises(ConfigError, match="token_accuracy"):
        M.compute("span_f1", [["NOUN", "VERB"]], [["NOUN", "NOUN"]])
    with pytest.raises(DataError, match="token example 0"):
        M.compute("token_accuracy", [["O", "O"]], [["O"]])


def test_squad_normalisation_and_scores():
    assert M.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert M.normalize_answer("an apple, a pear") == "apple pear"
    assert M.normalize_answer("«Det» står.", articles=()) == "det står"
    assert M.normalize_answer("the cat", articles=()) == "the cat"
    golds = [["the big cat", "a cat"], {"text": ["Oslo"], "answer_start": [0]},
             {"answers": {"text": ["1998"]}}]
    preds = ["Cat", "oslo.", "in 1998"]
    assert M.per_example("squad_em", golds, preds) == [1.0, 1.0, 0.0]
    # Example 3: gold [1998], pred [in, 1998] -> P = 1/2, R = 1, F1 = 2/3.
    assert M.per_example("squad_f1", golds, preds) == pytest.approx([1.0, 1.0, 2 / 3])
    assert M.compute("squad_f1", golds, preds) == pytest.approx((2 + 2 / 3) / 3)
    # Chinese has no spaces: the answer is compared character by character, not all-or-nothing.
    assert M.split_words("BERT 模型很小") == ["BERT", "模", "型", "很", "小"]
    assert M.token_f1("模型很小", "模型小", articles=()) == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert M.compute("squad_em", [[]], [""]) == 1.0  # unanswerable: only the empty answer is right


def test_errors_name_the_valid_choices():
    with pytest.raises(ConfigError, match="did you mean 'macro_f1'.*span_f1"):
        M.compute("macro-f1", ["a"], ["a"])
    with pytest.raises(ConfigError, match="accuracy, macro_f1, mcc"):
        M.check_metric("span_f1", "classification")
    with pytest.raises(ConfigError, match="not a mean"):
        M.per_example("macro_f1", ["a"], ["a"])
    with pytest.raises(DataError, match="2 predictions for 3"):
        M.compute("accuracy", ["a", "b", "c"], ["a", "b"])
    with pytest.raises(DataError, match="empty"):
        M.compute("accuracy", [], [])


@pytest.mark.parametrize("metric", M.ADDITIVE)
def test_sufficient_stats_recompute_the_metric_on_resamples(metric):
    rng = np.random.default_rng(1)
    n = 60
    if metric in ("accuracy", "macro_f1", "mcc"):
        gold = list(rng.choice(["a", "b", "c", "d"], n))
        pred = [g if rng.random() < 0.6 else str(rng.choice(["a", "b", "c", "e"])) for g in gold]
    elif metric == "pearson":
        gold = list(rng.normal(size=n))
        pred = list(np.array(gold) + rng.normal(size=n))
    elif metric in ("span_f1", "token_accuracy"):
        tags = ["O", "O", "B-PER", "I-PER", "B-LOC"]
        gold = [list(rng.choice(tags, rng.integers(1, 8))) for _ in range(n)]
        pred = [[t if rng.random() < 0.7 else str(rng.choice(tags)) for t in s] for s in gold]
    elif metric in M.RETRIEVAL:
        docs = [f"d{i}" for i in range(40)]
        gold = [{str(d): float(rng.integers(1, 3)) for d in rng.choice(docs, int(rng.integers(1, 4)), replace=False)}
                for _ in range(n)]
        pred = [list(rng.permutation(docs)[:30]) for _ in range(n)]
    else:
        words = ["oslo", "the city", "bergen", "a fjord", "norway"]
        gold = [[str(rng.choice(words))] for _ in range(n)]
        pred = [g[0] if rng.random() < 0.5 else str(rng.choice(words)) + " x" for g in gold]
    stats = M.sufficient_stats(metric, gold, pred)
    full = M.from_stats(metric, np.asarray(stats.sum(0)).ravel())
    assert full == pytest.approx(M.compute(metric, gold, pred))
    for _ in range(5):
        idx = rng.integers(0, n, n)
        w = np.bincount(idx, minlength=n).astype(float)
        direct = M.compute(metric, [gold[i] for i in idx], [pred[i] for i in idx])
        assert M.from_stats(metric, np.asarray(stats.T @ w).ravel()) == pytest.approx(direct, abs=1e-12)


def test_binary_f1_of_the_positive_label_as_glue_scores_mrpc():
    from kompakt.eval.metrics import compute, from_stats, sufficient_stats

    gold = ["equivalent", "equivalent", "not", "not", "equivalent"]
    pred = ["equivalent", "not", "equivalent", "not", "equivalent"]
    # tp 2, fp 1, fn 1: precision 2/3, recall 2/3, F1 2/3
    assert compute("f1", gold, pred, positive="equivalent") == pytest.approx(2 / 3)
    assert compute("f1", gold, pred, positive="not") == pytest.approx(0.5)
    rows = sufficient_stats("f1", gold, pred, positive="equivalent")
    assert from_stats("f1", rows[[0, 0, 1]].sum(0)) == pytest.approx(2 * 2 / (2 + 3))

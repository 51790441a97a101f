"""Bootstrap intervals over examples and seeds, the paired test and retention, on hand-checkable samples."""

import itertools
import math
import time

import numpy as np
import pytest

from kompakt.errors import DataError
from kompakt.eval import metrics as M
from kompakt.eval.stats import bootstrap_interval, bootstrap_replicates, paired_bootstrap, retention


def _right_on(n: int, n_right: int, offset: int = 0) -> tuple[list[str], list[str]]:
    """Gold all "y"; a prediction list that is right on n_right examples starting at offset (cyclic)."""
    gold = ["y"] * n
    pred = ["n"] * n
    for k in range(n_right):
        pred[(offset + k) % n] = "y"
    return gold, pred


def test_one_seed_matches_the_normal_approximation():
    gold, pred = _right_on(200, 160)  # p = 0.8
    r = bootstrap_interval(gold, [pred], "accuracy", n_boot=4000, seed=0)
    assert r["mean"] == 0.8 and r["std"] == 0.0 and r["n_seeds"] == 1
    half = 1.96 * math.sqrt(0.8 * 0.2 / 200)  # 0.0554
    assert r["low"] == pytest.approx(0.8 - half, abs=0.012)
    assert r["high"] == pytest.approx(0.8 + half, abs=0.012)
    reps = bootstrap_replicates(gold, [pred], "accuracy", n_boot=4000, seed=0)
    assert reps.mean() == pytest.approx(0.8, abs=0.003)
    assert reps.std() == pytest.approx(math.sqrt(0.8 * 0.2 / 200), rel=0.08)


def _exact_distribution(gold, pred, metric):
    """All n^n equally likely ordered resamples -> (sorted distinct values, their probabilities)."""
    n = len(gold)
    values = [M.compute(metric, [gold[i] for i in idx], [pred[i] for i in idx])
              for idx in itertools.product(range(n), repeat=n)]
    distinct, counts = np.unique(np.round(values, 12), return_counts=True)
    return distinct, counts / counts.sum()


def _exact_quantile(distinct, probs, q):
    return distinct[np.searchsorted(np.cumsum(probs), q)]


@pytest.mark.parametrize("metric,gold,pred,level", [
    # 3 examples, 2 right: all 27 resamples; accuracy 0, 1/3, 2/3, 1 with probabilities 1, 6, 12, 8 / 27.
    ("accuracy", ["y", "y", "y"], ["y", "y", "n"], 0.5),
    # 4 examples, 256 resamples; macro F1 is recomputed on each (not an average of per-example scores).
    ("macro_f1", ["a", "a", "b", "b"], ["a", "b", "b", "b"], 0.8),
])
def test_percentile_interval_equals_the_enumerated_bootstrap(metric, gold, pred, level):
    distinct, probs = _exact_distribution(gold, pred, metric)
    cdf = np.cumsum(probs)
    q_low, q_high = (1 - level) / 2, (1 + level) / 2
    # The chosen levels lie well inside a step of the exact CDF, so sampled quantiles converge to it.
    assert np.min(np.abs(cdf - q_low)) > 0.005 and np.min(np.abs(cdf - q_high)) > 0.005
    r = bootstrap_interval(gold, [pred], metric, n_boot=40_000, seed=3, level=level)
    assert r["low"] == pytest.approx(_exact_quantile(distinct, probs, q_low), abs=1e-9)
    assert r["high"] == pytest.approx(_exact_quantile(distinct, probs, q_high), abs=1e-9)
    reps = np.round(bootstrap_replicates(gold, [pred], metric, n_boot=40_000, seed=3), 12)
    freq = np.array([(reps == v).mean() for v in distinct])
    np.testing.assert_allclose(freq, probs, atol=0.01)  # the whole distribution, not only two quantiles
    assert freq.sum() == pytest.approx(1.0)


def test_seeds_that_disagree_widen_the_interval():
    gold, good = _right_on(300, 270)  # 0.9
    _, poor = _right_on(300, 180, offset=50)  # 0.6
    one = bootstrap_interval(gold, [good], "accuracy", n_boot=2000)
    two = bootstrap_interval(gold, [good, poor], "accuracy", n_boot=2000)
    assert two["mean"] == pytest.approx(0.75) and two["std"] == pytest.approx(math.sqrt(0.045))
    assert (two["high"] - two["low"]) > 4 * (one["high"] - one["low"])
    # Seed multisets {good, good}, {good, poor}, {poor, poor}: the interval reaches both seeds' scores.
    assert two["low"] < 0.65 and two["high"] > 0.85


def test_paired_identical_models_differ_by_nothing():
    gold, pred = _right_on(100, 70)
    r = paired_bootstrap(gold, [pred, pred], [pred], "accuracy", n_boot=500)
    assert r["diff"] == 0.0 and r["low"] == 0.0 and r["high"] == 0.0
    assert r["p_value"] == 1.0 and r["significant"] is False


def test_paired_clear_difference_is_significant():
    gold, a = _right_on(200, 180)  # 90 %
    _, b = _right_on(200, 120)  # 60 %
    r = paired_bootstrap(gold, [a], [b], "accuracy", n_boot=1000)
    assert r["diff"] == pytest.approx(0.3) and r["low"] > 0.2 and r["high"] < 0.4
    assert r["significant"] is True and r["p_value"] == pytest.approx(2 / 1001)


def test_pairing_sees_a_small_consistent_difference():
    # b is a with 6 more errors out of 200: each model's own interval is +-6 points wide, but on every
    # shared resample a >= b, so the paired test finds it (d_r = 0 only if none of the 6 is drawn).
    gold, a = _right_on(200, 150)
    _, b = _right_on(200, 144)
    ia, ib = bootstrap_interval(gold, [a], "accuracy"), bootstrap_interval(gold, [b], "accuracy")
    assert ia["low"] < ib["high"]  # the unpaired intervals overlap
    r = paired_bootstrap(gold, [a], [b], "accuracy", n_boot=2000, seed=1)
    assert r["diff"] == pytest.approx(0.03) and r["low"] >= 0.0 and r["significant"] is True


def test_non_decomposable_paired_and_deterministic():
    rng = np.random.default_rng(0)
    gold = list(rng.choice(["a", "b", "c"], 150))
    a = [[g if rng.random() < 0.85 else "c" for g in gold] for _ in range(3)]
    r1 = paired_bootstrap(gold, a, a[:1], "macro_f1", n_boot=300, seed=7)
    r2 = paired_bootstrap(gold, a, a[:1], "macro_f1", n_boot=300, seed=7)
    assert r1 == r2 and r1["low"] <= r1["diff"] <= r1["high"]
    x = rng.normal(size=150)
    ys = [list(x + rng.normal(size=150)) for _ in range(3)]
    s = bootstrap_interval(list(x), ys, "spearman", n_boot=300)
    assert s["low"] < s["mean"] < s["high"] and s["n_seeds"] == 3


def test_retention_of_a_student():
    gold, teacher = _right_on(400, 320)  # 0.8
    _, student = _right_on(400, 288)  # 0.72 -> 90 %
    r = retention(gold, [teacher], [student], "accuracy", n_boot=1000)
    assert r["mean"] == pytest.approx(90.0) and r["low"] < 90.0 < r["high"] and r["high"] <= 100.0
    same = retention(gold, [teacher], [teacher], "accuracy", n_boot=200)
    assert same["mean"] == 100.0 and same["low"] == same["high"] == 100.0
    with pytest.raises(DataError, match="positive teacher"):
        retention(gold, [["n"] * 400], [student], "mcc")


def test_input_errors():
    with pytest.raises(DataError, match="seed 0 has 1 predictions for 3"):
        bootstrap_interval(["a", "b", "c"], [["a"]], "accuracy")
    with pytest.raises(DataError, match="one list of predictions per seed"):
        bootstrap_interval(["a", "b"], ["ab", "ab"], "accuracy")


def test_accuracy_at_full_size_is_fast():
    rng = np.random.default_rng(0)
    gold = list(rng.choice(["a", "b", "c"], 2000))
    preds = [[g if rng.random() < 0.8 else "a" for g in gold] for _ in range(10)]
    bootstrap_interval(gold[:10], [p[:10] for p in preds], "accuracy", n_boot=10)  # imports
    start = time.perf_counter()
    r = bootstrap_interval(gold, preds, "accuracy", n_boot=1000)
    assert time.perf_counter() - start < 5.0  # about 0.3 s on 2 cores
    assert r["low"] < r["mean"] < r["high"] and r["n_seeds"] == 10

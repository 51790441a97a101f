"""Task metrics, computed offline with scikit-learn, SciPy and seqeval (`evaluate.load` needs the hub).

Every metric is a function of gold labels and predictions in the normalised formats of
`kompakt.finetune.tasks`:

- classification / pair_classification: `accuracy`, `macro_f1` (unweighted mean of per-label F1 over
  the labels present in gold or predictions), `mcc` (Matthews correlation, multi-class form), `f1`
  (binary F1 of the `positive` label, as GLUE scores MRPC and QQP);
- regression: `pearson`, `spearman` (a constant gold or prediction vector scores 0.0: it carries no
  linear or rank information, and NaN would poison a bootstrap);
- token_classification: `span_f1` (seqeval's micro F1 over BIO entity spans, conlleval-compatible
  default mode), `token_accuracy` (correct tags over all tokens, micro);
- qa: `squad_em`, `squad_f1` (SQuAD v1.1: normalised answer, max over the gold answers, mean over
  questions);
- retrieval: `recall_at_1`, `recall_at_10`, `recall_at_100` (the share of a query's relevant documents
  among its first k), `mrr_at_10` (1 / rank of the first relevant document in the first 10, else 0),
  `ndcg_at_10` (gain = the relevance grade, discount log2(rank + 1), over the ideal ordering: the
  trec_eval/BEIR definition); gold is {doc id: grade > 0} per query, the prediction its ranked doc ids;
  each is the mean over queries.

Scores are fractions (accuracy 0.9, not 90); correlations and MCC lie in [-1, 1]. The report multiplies
by 100 for display.

For the bootstrap, `sufficient_stats` turns one (gold, prediction) pair per example into a row of
additive counts (a confusion-matrix cell, entity-span counts, moments), so that the metric on any
resample is `from_stats` of the count-weighted sum of rows: the metric is recomputed exactly on each
resample (macro F1 from the resample's confusion matrix, span F1 from its span counts), never averaged
over per-example scores, and thousands of resamples cost one matrix product. Spearman has no such form
(ranks change with the resample) and `kompakt.eval.stats` re-ranks each resample instead.
"""

from __future__ import annotations

import collections
import math
import difflib
import re
import string
import unicodedata
from typing import Any, Sequence

import numpy as np

from kompakt.errors import ConfigError, DataError

VALID: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "mcc", "f1"),
    "pair_classification": ("accuracy", "macro_f1", "mcc", "f1"),
    "regression": ("pearson", "spearman"),
    "token_classification": ("span_f1", "token_accuracy"),
    "qa": ("squad_em", "squad_f1"),
    "retrieval": ("recall_at_1", "recall_at_10", "recall_at_100", "mrr_at_10", "ndcg_at_10"),
}
RETRIEVAL: tuple[str, ...] = VALID["retrieval"]
METRICS: tuple[str, ...] = tuple(sorted({m for ms in VALID.values() for m in ms}))
# compute() equals the mean of per_example() for exactly these.
PER_EXAMPLE: tuple[str, ...] = ("accuracy", "squad_em", "squad_f1") + RETRIEVAL
# The metric on a resample is from_stats(sum of count-weighted sufficient_stats rows) for these.
ADDITIVE: tuple[str, ...] = ("accuracy", "macro_f1", "mcc", "f1", "pearson", "span_f1", "token_accuracy",
                             "squad_em", "squad_f1") + RETRIEVAL

# The SQuAD v1.1 script removes these English articles. Pass articles=() for languages without
# free-standing articles (Chinese, Japanese, Finnish) or a language's own list.
ENGLISH_ARTICLES: tuple[str, ...] = ("a", "an", "the")

# Scripts written without spaces between words: each character counts as one word in squad_f1 and in
# the BiLSTM baseline (the "mixed segmentation" of the CMRC and MLQA evaluation scripts).
_NO_SPACE_CHARS = (
    "\u0e00-\u0e7f"  # Thai
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\U00020000-\U0002ffff"
)
_WORD_RE = re.compile(f"[{_NO_SPACE_CHARS}]|[^\\s{_NO_SPACE_CHARS}]+")
_ASCII_PUNCT = frozenset(string.punctuation)


def check_metric(metric: str, task_type: str | None = None) -> str:
    """`metric` itself when it is known (and applies to `task_type` if given); ConfigError otherwise."""
    if task_type is not None and task_type not in VALID:
        raise ConfigError(f"unknown task type {task_type!r}{_did_you_mean(task_type, VALID)}; "
                          f"valid task types: {', '.join(VALID)}")
    if metric not in METRICS:
        valid = "; ".join(f"{t}: {', '.join(ms)}" for t, ms in VALID.items())
        raise ConfigError(f"unknown metric {metric!r}{_did_you_mean(metric, METRICS)}; valid metrics by task "
                          f"type: {valid}")
    if task_type is not None and metric not in VALID[task_type]:
        raise ConfigError(f"metric {metric!r} does not apply to task type {task_type!r}; use one of "
                          f"{', '.join(VALID[task_type])}")
    return metric


def _did_you_mean(name: str, valid) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def compute(metric: str, gold: Sequence, pred: Sequence, *,
            articles: Sequence[str] = ENGLISH_ARTICLES, positive: str = "1") -> float:
    """`metric` of predictions `pred` against `gold` over the whole test set, as a float.

    `gold`/`pred`: one item per example: label strings (classification), floats (regression), tag lists
    (token_classification; the tags of one sentence must have the same length), or for qa the gold
    answers (a list of strings, an `answers` dict or a whole qa example) and answer strings.
    `articles` only matters for the squad metrics. Raises ConfigError for an unknown metric and
    DataError for mismatched or empty inputs.
    """
    check_metric(metric)
    _check_pair(gold, pred)
    if metric == "accuracy":
        return float(np.mean([g == p for g, p in zip(gold, pred)]))
    if metric == "macro_f1":
        from sklearn.metrics import f1_score

        return float(f1_score(_labels(gold), _labels(pred), average="macro", zero_division=0))
    if metric == "f1":
        return float(from_stats("f1", sufficient_stats("f1", gold, pred, positive=positive).sum(0)))
    if metric == "mcc":
        from sklearn.metrics import matthews_corrcoef

        return float(matthews_corrcoef(_labels(gold), _labels(pred)))
    if metric in ("pearson", "spearman"):
        from scipy import stats

        g, p = _floats(gold, "gold"), _floats(pred, "predictions")
        if np.ptp(g) == 0 or np.ptp(p) == 0:
            return 0.0
        fn = stats.pearsonr if metric == "pearson" else stats.spearmanr
        return float(fn(g, p).statistic)
    if metric == "span_f1":
        from seqeval.metrics import f1_score

        _check_tags(gold, pred, bio=True)
        if not any(t != "O" for s in list(gold) + list(pred) for t in s):
            return 0.0  # seqeval warns and returns 0 when there is no entity at all
        return float(f1_score([list(s) for s in gold], [list(s) for s in pred]))
    if metric == "token_accuracy":
        _check_tags(gold, pred, bio=False)
        n_correct = sum(g == p for gs, ps in zip(gold, pred) for g, p in zip(gs, ps))
        n_tokens = sum(len(gs) for gs in gold)
        return n_correct / n_tokens if n_tokens else 0.0
    return float(np.mean(per_example(metric, gold, pred, articles=articles)))


def per_example(metric: str, gold: Sequence, pred: Sequence, *,
                articles: Sequence[str] = ENGLISH_ARTICLES) -> list[float]:
    """One score per example for the metrics whose test-set value is their mean (`PER_EXAMPLE`:
    accuracy 1.0/0.0, squad_em 1.0/0.0, squad_f1 in [0, 1]); ConfigError for the others, which depend
    on the whole set (macro F1, MCC, correlations, span F1, micro token accuracy)."""
    check_metric(metric)
    if metric not in PER_EXAMPLE:
        raise ConfigError(f"metric {metric!r} is not a mean of per-example scores (only "
                          f"{', '.join(PER_EXAMPLE)} are); use compute()")
    _check_pair(gold, pred)
    if metric == "accuracy":
        return [float(g == p) for g, p in zip(gold, pred)]
    if metric in RETRIEVAL:
        return [retrieval_score(metric, _relevant(g, i), _ranking(p, i)) for i, (g, p) in enumerate(zip(gold, pred))]
    fn = exact_match if metric == "squad_em" else token_f1
    scores = []
    for i, (g, p) in enumerate(zip(gold, pred)):
        answers = _answers(g, i)
        if not isinstance(p, str):
            raise DataError(f"qa prediction {i} is {type(p).__name__}, not an answer string")
        scores.append(max(fn(a, p, articles=articles) for a in answers))
    return scores


# ---------------------------------------------------------------- retrieval

def retrieval_score(metric: str, relevant: dict[str, float], ranking: Sequence[str]) -> float:
    """One query's recall@k, MRR@10 or nDCG@10 (see the module docstring) of a ranking of doc ids."""
    rel = {d: float(g) for d, g in relevant.items() if float(g) > 0}
    if not rel:
        return 0.0
    if metric.startswith("recall_at_"):
        k = int(metric.rsplit("_", 1)[1])
        return len(rel.keys() & set(ranking[:k])) / len(rel)
    if metric == "mrr_at_10":
        return next((1.0 / (r + 1) for r, d in enumerate(ranking[:10]) if d in rel), 0.0)
    dcg = sum(rel.get(d, 0.0) / math.log2(r + 2) for r, d in enumerate(ranking[:10]))
    ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(rel.values(), reverse=True)[:10]))
    return dcg / ideal


def _relevant(g: Any, i: int) -> dict:
    if isinstance(g, dict) and "relevant" in g and isinstance(g["relevant"], dict):
        g = g["relevant"]  # a whole retrieval example
    if not isinstance(g, dict):
        raise DataError(f"retrieval gold {i} is {type(g).__name__}, not {{doc id: relevance grade}}")
    return g


def _ranking(p: Any, i: int) -> list:
    if not isinstance(p, (list, tuple)) or not all(isinstance(d, str) for d in p):
        raise DataError(f"retrieval prediction {i} is not a ranked list of document ids")
    return list(p)


# ---------------------------------------------------------------- SQuAD v1.1 answer normalisation


def normalize_answer(text: str, articles: Sequence[str] = ENGLISH_ARTICLES) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation, drop the words in `articles`, collapse
    whitespace. Punctuation is ASCII `string.punctuation` (as in the official script) plus every Unicode
    punctuation character (category P*), so Chinese "，。" and Norwegian «» go too; on ASCII text this
    equals the official script. "The Eiffel-Tower!" -> "eiffeltower"."""
    text = text.lower()
    text = "".join(ch for ch in text
                   if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P"))
    if articles:
        pattern = r"\b(" + "|".join(re.escape(a.lower()) for a in articles) + r")\b"
        text = re.sub(pattern, " ", text)
    return " ".join(text.split())


def split_words(text: str) -> list[str]:
    """Whitespace words, with each character of a script written without spaces (Chinese, Japanese
    kana, Thai) as a word of its own: "BERT 模型很小" -> ["BERT", "模", "型", "很", "小"]."""
    return _WORD_RE.findall(text)


def exact_match(gold_answer: str, prediction: str, *, articles: Sequence[str] = ENGLISH_ARTICLES) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(gold_answer, articles) == normalize_answer(prediction, articles))


def token_f1(gold_answer: str, prediction: str, *, articles: Sequence[str] = ENGLISH_ARTICLES) -> float:
    """SQuAD's bag-of-words F1 between the normalised answers, words from `split_words` (so a Chinese
    answer is compared character by character instead of as one all-or-nothing word). When either
    side normalises to nothing the score is 1.0 if both do, else 0.0 (the SQuAD v2 rule; an unanswerable
    question has the gold answer "")."""
    g = split_words(normalize_answer(gold_answer, articles))
    p = split_words(normalize_answer(prediction, articles))
    if not g or not p:
        return float(g == p)
    n_same = sum((collections.Counter(g) & collections.Counter(p)).values())
    if n_same == 0:
        return 0.0
    precision, recall = n_same / len(p), n_same / len(g)
    return 2 * precision * recall / (precision + recall)


def _answers(gold: Any, i: int) -> list[str]:
    """The gold answer strings of qa example `i` from a string, a list, an answers dict or an example."""
    if isinstance(gold, dict):
        gold = gold.get("answers", gold)
        if isinstance(gold, dict):
            gold = gold.get("text")
    if isinstance(gold, str):
        return [gold]
    if not isinstance(gold, (list, tuple)) or not all(isinstance(a, str) for a in gold):
        raise DataError(f"qa gold {i} is not a list of answer strings, an answers dict or a qa example")
    return list(gold) or [""]  # no gold answer: unanswerable, only an empty prediction is right


# ---------------------------------------------------------------- sufficient statistics


def sufficient_stats(metric: str, gold: Sequence, pred: Sequence, *, labels: Sequence | None = None,
                     articles: Sequence[str] = ENGLISH_ARTICLES, positive: str = "1"):
    """Per-example additive rows for `metric` (one of `ADDITIVE`): an (n, d) float64 array, or for
    macro_f1/mcc an (n, K*K) scipy CSR one-hot of the confusion cell gold*K + pred, K = len(labels).

    `from_stats(metric, w @ rows)` is the metric on a resample in which example i appears w[i] times;
    with w all ones it equals `compute`. The rows per metric:
    accuracy/squad_*: (score, 1); token_accuracy: (correct tags, tags); span_f1: (correct spans,
    predicted spans, gold spans); pearson: (1, x, y, x^2, y^2, xy) of mean-centred x=gold, y=pred.
    `labels` fixes the label order of the confusion matrix (the default: gold and pred labels in
    first-seen order), so that models or seeds share one layout.
    """
    check_metric(metric)
    if metric not in ADDITIVE:
        raise ConfigError(f"metric {metric!r} has no additive form (only {', '.join(ADDITIVE)} do)")
    _check_pair(gold, pred)
    n = len(gold)
    if metric in ("accuracy", "squad_em", "squad_f1") + RETRIEVAL:
        return np.column_stack([per_example(metric, gold, pred, articles=articles), np.ones(n)])
    if metric == "f1":  # (true positive, predicted positive, gold positive), as span_f1's counts
        g = np.array([str(x) == str(positive) for x in gold], dtype=np.float64)
        q = np.array([str(x) == str(positive) for x in pred], dtype=np.float64)
        return np.column_stack([g * q, q, g])
    if metric in ("macro_f1", "mcc"):
        from scipy import sparse

        g, p = _labels(gold), _labels(pred)
        labels = list(dict.fromkeys(g + p)) if labels is None else list(labels)
        index = {lab: k for k, lab in enumerate(labels)}
        missing = [x for x in g + p if x not in index]
        assert not missing, f"labels {sorted(set(map(str, missing)))} are not in the given label list"
        n_labels = len(labels)
        cells = np.array([index[a] * n_labels + index[b] for a, b in zip(g, p)], dtype=np.int64)
        return sparse.csr_matrix((np.ones(n), (np.arange(n), cells)), shape=(n, n_labels * n_labels))
    if metric == "pearson":
        x, y = _floats(gold, "gold"), _floats(pred, "predictions")
        x, y = x - x.mean(), y - y.mean()  # correlation is shift-invariant; centring keeps the sums exact
        return np.column_stack([np.ones(n), x, y, x * x, y * y, x * y])
    if metric == "token_accuracy":
        _check_tags(gold, pred, bio=False)
        return np.array([[sum(a == b for a, b in zip(gs, ps)), len(gs)] for gs, ps in zip(gold, pred)],
                        dtype=np.float64).reshape(n, 2)
    from seqeval.metrics.sequence_labeling import get_entities

    _check_tags(gold, pred, bio=True)
    rows = np.zeros((n, 3))
    for i, (gs, ps) in enumerate(zip(gold, pred)):
        ge, pe = set(get_entities(list(gs))), set(get_entities(list(ps)))
        rows[i] = (len(ge & pe), len(pe), len(ge))
    return rows


def from_stats(metric: str, sums: np.ndarray) -> np.ndarray:
    """The metric from summed sufficient statistics, vectorised over leading axes: (..., d) -> (...)."""
    s = np.asarray(sums, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric in ("accuracy", "squad_em", "squad_f1", "token_accuracy") + RETRIEVAL:
            out = s[..., 0] / s[..., 1]
            return np.where(s[..., 1] > 0, out, 0.0)
        if metric in ("span_f1", "f1"):
            denom = s[..., 1] + s[..., 2]
            return np.where(denom > 0, 2 * s[..., 0] / denom, 0.0)
        if metric == "pearson":
            n, sx, sy, sxx, syy, sxy = (s[..., k] for k in range(6))
            vx, vy = sxx - sx * sx / n, syy - sy * sy / n
            # A resample whose values are all equal has variance 0 up to rounding (1e-16 relative).
            ok = (vx > 1e-12 * sxx) & (vy > 1e-12 * syy) & (n > 1)
            return np.where(ok, (sxy - sx * sy / n) / np.sqrt(np.abs(vx * vy)), 0.0)
        if metric in ("macro_f1", "mcc"):
            n_labels = int(round(np.sqrt(s.shape[-1])))
            assert n_labels * n_labels == s.shape[-1], "confusion stats must have K*K columns"
            c = s.reshape(s.shape[:-1] + (n_labels, n_labels))  # [..., gold, pred]
            tp = np.diagonal(c, axis1=-2, axis2=-1)
            gold_sum, pred_sum = c.sum(-1), c.sum(-2)
            if metric == "macro_f1":
                # sklearn: labels seen in gold or predictions of this (re)sample; F1 = 2tp / (2tp+fp+fn).
                present = (gold_sum + pred_sum) > 0
                f1 = np.where(present, 2 * tp / (gold_sum + pred_sum), 0.0)
                return np.where(present.any(-1), f1.sum(-1) / present.sum(-1), 0.0)
            n = gold_sum.sum(-1)
            cov_gp = tp.sum(-1) * n - (gold_sum * pred_sum).sum(-1)
            cov_pp = n * n - (pred_sum * pred_sum).sum(-1)
            cov_gg = n * n - (gold_sum * gold_sum).sum(-1)
            denom = np.sqrt(cov_pp * cov_gg)
            return np.where(denom > 0, cov_gp / denom, 0.0)
    raise ConfigError(f"metric {metric!r} has no additive form (only {', '.join(ADDITIVE)} do)")


# ---------------------------------------------------------------- input checks


def _check_pair(gold: Sequence, pred: Sequence) -> None:
    if len(gold) != len(pred):
        raise DataError(f"{len(pred)} predictions for {len(gold)} gold examples; "
                        "give one prediction per example")
    if len(gold) == 0:
        raise DataError("no examples to score; the test split is empty")


def _labels(values: Sequence) -> list:
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def _floats(values: Sequence, what: str) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"regression {what} must be numbers") from None
    if x.ndim != 1 or not np.isfinite(x).all():
        raise DataError(f"regression {what} must be one finite number per example")
    return x


_BIO_RE = re.compile(r"^(O|[BIES]-.+)$")  # seqeval's default, prefix mode (IOB1, IOB2, IOBES)


def _check_tags(gold: Sequence, pred: Sequence, *, bio: bool) -> None:
    for i, (gs, ps) in enumerate(zip(gold, pred)):
        if isinstance(gs, str) or isinstance(ps, str):
            raise DataError(f"token example {i}: gold and prediction must be lists of tags, not strings")
        if len(gs) != len(ps):
            raise DataError(f"token example {i}: {len(ps)} predicted tags for {len(gs)} tokens")
    if bio:
        bad = sorted({t for gs in gold for t in gs if not _BIO_RE.match(str(t))})
        if bad:
            raise ConfigError(f"span_f1 needs BIO tags (O, B-X, I-X), but gold has "
                              f"{', '.join(map(str, bad[:5]))}; use token_accuracy for plain tags "
                              "such as POS")

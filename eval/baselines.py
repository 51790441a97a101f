"""Non-transformer baselines: does a compact BERT beat what a careful user gets without one?

Two baselines per task, both trained on the same train split, selected on dev, scored on test:

- `tfidf_baseline`: TF-IDF word 1-2 grams plus character 2-5 grams (within word boundaries; character
  n-grams carry Norwegian compounds such as "fotballkamp" and Chinese, which has no spaces) with
  logistic regression (classification, pairs) or ridge regression; for token classification a
  per-token logistic regression on hand features (word, affixes, shape, neighbours). The
  regularisation strength is picked on dev from three values (C 0.5/2/8, alpha 0.3/1/3).
- `bilstm_baseline`: a 100-d word embedding and a 1-layer BiLSTM of 128 units per direction, max-pooled
  for a sequence, [u, v, |u - v|, u * v] of both pooled texts for a pair (InferSent), a linear head per
  token for tagging; Adam, early stopping on dev. Words are whitespace tokens and punctuation marks,
  lowercased; each character of a script written without spaces (Chinese, Japanese, Thai) is a word.
  About 1-2 s per epoch on 2 cores for 3,000 sentences of 20 words.

Extractive QA has no baseline here (a span model without pretraining is a project of its own): both
functions return None with a warning. Predictions are in the form `kompakt.eval.metrics` reads.

`learning_curve_sizes` and `subsample` give the train sizes of a learning curve; subsamples are nested
(a smaller one lies inside a larger one) and stratified by label for classification.
"""

from __future__ import annotations

import copy
import re
from typing import Sequence

import numpy as np

from kompakt.finetune.tasks import subsample  # noqa: F401  (one subsample for models and baselines)
from kompakt.errors import ConfigError, DataError
from kompakt.eval.metrics import compute, split_words
from kompakt.log import warn

TASK_TYPES = ("classification", "pair_classification", "regression", "token_classification", "qa")
# The dev metric that picks a baseline's regularisation and its early-stopping epoch.
_SELECT = {"classification": "accuracy", "pair_classification": "accuracy", "regression": "pearson",
           "token_classification": "token_accuracy"}
_NO_QA = "extractive QA has no TF-IDF or BiLSTM baseline; the report shows none for this task"
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def _check_task(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        raise ConfigError(f"unknown task type {task_type!r}; valid task types: {', '.join(TASK_TYPES)}")


def _field(example: dict, key: str, i: int, split: str, task_type: str):
    if not isinstance(example, dict) or key not in example:
        raise DataError(f"{split} example {i} has no {key!r} field, which a {task_type} example needs")
    return example[key]


def _is_pair(task_type: str, examples: Sequence[dict]) -> bool:
    """Pairs: pair_classification always, regression when every example has a text_pair (STS)."""
    if task_type == "pair_classification":
        return True
    return (task_type == "regression" and bool(examples)
            and all(e.get("text_pair") is not None for e in examples))


def _columns(task_type: str, examples: Sequence[dict], split: str, pair: bool):
    """(texts, text_pairs or None, labels or None) of a split; test labels may be missing."""
    if task_type == "token_classification":
        tokens = [list(_field(e, "tokens", i, split, task_type)) for i, e in enumerate(examples)]
        tags = None if split == "test" else [list(_field(e, "tags", i, split, task_type))
                                              for i, e in enumerate(examples)]
        return tokens, None, tags
    texts = [str(_field(e, "text", i, split, task_type)) for i, e in enumerate(examples)]
    pairs = ([str(_field(e, "text_pair", i, split, task_type)) for i, e in enumerate(examples)]
             if pair else None)
    if split == "test":
        return texts, pairs, None
    labels = [_field(e, "label", i, split, task_type) for i, e in enumerate(examples)]
    if task_type == "regression":
        try:
            labels = [float(x) for x in labels]
        except (TypeError, ValueError):
            raise DataError(f"{split}: regression labels must be numbers") from None
    else:
        labels = [str(x) for x in labels]
    return texts, pairs, labels


def _check_splits(task_type: str, train: Sequence[dict], test: Sequence[dict]) -> None:
    if not train:
        raise DataError(f"the {task_type} train split is empty; a baseline needs training examples")
    if not test:
        raise DataError(f"the {task_type} test split is empty; there is nothing to predict")


# ---------------------------------------------------------------- TF-IDF + linear models


def _words(text: str) -> list[str]:
    """Lowercased word tokens for the word n-grams; Chinese/Japanese/Thai runs split into characters."""
    return [w for tok in re.findall(r"\w+", text.lower()) for w in split_words(tok)]


def _vectorizers():
    from sklearn.feature_extraction.text import TfidfVectorizer

    word = TfidfVectorizer(tokenizer=_words, token_pattern=None, lowercase=False, ngram_range=(1, 2),
                           sublinear_tf=True)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2,
                           max_features=300_000)
    return word, char


class _TextFeatures:
    """Sparse features of a text, or of a text pair: word and char TF-IDF of each side (one vocabulary
    fitted on both sides), their elementwise products (which words and n-grams the two texts share, the
    sparse counterpart of the BiLSTM's u * v) and three overlap features (word Jaccard, share of the
    second text's words in the first, length ratio)."""

    def __init__(self, pair: bool):
        self.pair = pair
        self.vecs = _vectorizers()

    def fit_transform(self, texts, pairs):
        for v in self.vecs:
            v.fit(list(texts) + (list(pairs) if self.pair else []))
        return self.transform(texts, pairs)

    def transform(self, texts, pairs):
        from scipy import sparse

        first = [v.transform(texts) for v in self.vecs]
        if not self.pair:
            return sparse.hstack(first, format="csr")
        second = [v.transform(pairs) for v in self.vecs]
        shared = [a.multiply(b) for a, b in zip(first, second)]
        overlap = sparse.csr_matrix(np.array([_overlap(a, b) for a, b in zip(texts, pairs)]))
        return sparse.hstack(first + second + shared + [overlap], format="csr")


def _overlap(a: str, b: str) -> tuple[float, float, float]:
    wa, wb = set(_words(a)), set(_words(b))
    union = len(wa | wb) or 1
    length_ratio = min(len(a), len(b)) / (max(len(a), len(b)) or 1)
    return len(wa & wb) / union, len(wa & wb) / (len(wb) or 1), length_ratio


def _token_features(tokens: list[str], i: int) -> dict:
    w = tokens[i]
    low = w.lower()
    return {"w=" + low: 1, "suf1=" + low[-1:]: 1, "suf2=" + low[-2:]: 1, "suf3=" + low[-3:]: 1,
            "pre3=" + low[:3]: 1, "is_title": float(w[:1].isupper()), "is_upper": float(w.isupper()),
            "is_digit": float(any(ch.isdigit() for ch in w)),
            "prev=" + (tokens[i - 1].lower() if i > 0 else "<s>"): 1,
            "next=" + (tokens[i + 1].lower() if i + 1 < len(tokens) else "</s>"): 1}


def _pick(candidates, fit_predict, dev_labels, metric: str):
    """The first candidate with the best dev score (the middle one without dev data) and its model."""
    if dev_labels is None:
        return fit_predict(candidates[len(candidates) // 2])[0]
    best, best_score = None, -np.inf
    for c in candidates:
        model, dev_pred = fit_predict(c)
        score = compute(metric, dev_labels, dev_pred)
        if score > best_score:
            best, best_score = model, score
    return best


def _warm_logreg(x, y, seed: int, max_iter: int):
    """fit(C) -> a logistic regression on (x, y), each fit starting from the previous C's solution.

    `_pick` tries C in ascending order, and the optimum moves little between neighbours: on demo-zh's part of
    speech (24,011 tokens, 39,986 features, 38 tags) lbfgs took 66/74/73 iterations from zero and 66/32/35
    warm (47 s -> 30 s), to the same dev accuracy within 0.2 points."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=max_iter, random_state=seed, warm_start=True)

    def fit(c: float):
        model.set_params(C=c).fit(x, y)
        return copy.deepcopy(model)

    return fit


def tfidf_baseline(task_type: str, train: Sequence[dict], dev: Sequence[dict], test: Sequence[dict],
                   seed: int = 0) -> list | None:
    """Predictions on `test` of a TF-IDF (or token-feature) linear model trained on `train`.

    Returns label strings (classification, pairs), floats (regression) or one tag list per sentence
    (token_classification); None for qa. `dev` picks the regularisation strength (may be empty: then
    C = 2 / alpha = 1). Deterministic for a given `seed`.
    """
    _check_task(task_type)
    if task_type == "qa":
        warn(_NO_QA)
        return None
    _check_splits(task_type, train, test)
    from sklearn.linear_model import Ridge

    metric = _SELECT[task_type]
    if task_type == "token_classification":
        from sklearn.feature_extraction import DictVectorizer

        tr_tokens, _, tr_tags = _columns(task_type, train, "train", False)
        dv_tokens, _, dv_tags = _columns(task_type, dev, "dev", False) if dev else (None, None, None)
        te_tokens, _, _ = _columns(task_type, test, "test", False)
        vec = DictVectorizer()
        x_train = vec.fit_transform(_token_features(s, i) for s in tr_tokens for i in range(len(s)))
        y_train = [t for tags in tr_tags for t in tags]
        if len(set(y_train)) < 2:
            raise DataError("token_classification train split has a single tag; nothing to learn")

        def tag(model, sentences):
            rows = (_token_features(s, i) for s in sentences for i in range(len(s)))
            flat = model.predict(vec.transform(rows))
            out, k = [], 0
            for s in sentences:
                out.append([str(t) for t in flat[k:k + len(s)]])
                k += len(s)
            return out

        fit = _warm_logreg(x_train, y_train, seed, max_iter=1000)

        def fit_tagger(c):
            model = fit(c)
            return model, (tag(model, dv_tokens) if dv_tokens else None)

        return tag(_pick((0.5, 2.0, 8.0), fit_tagger, dv_tags, metric), te_tokens)

    pair = _is_pair(task_type, train)
    tr_text, tr_pair, y_train = _columns(task_type, train, "train", pair)
    dv_text, dv_pair, y_dev = _columns(task_type, dev, "dev", pair) if dev else (None, None, None)
    te_text, te_pair, _ = _columns(task_type, test, "test", pair)
    feats = _TextFeatures(pair)
    x_train = feats.fit_transform(tr_text, tr_pair)
    x_dev = feats.transform(dv_text, dv_pair) if dev else None
    x_test = feats.transform(te_text, te_pair)
    if task_type == "regression":
        def fit_ridge(alpha):
            model = Ridge(alpha=alpha, random_state=seed).fit(x_train, y_train)
            return model, (model.predict(x_dev) if dev else None)

        return [float(y) for y in _pick((0.3, 1.0, 3.0), fit_ridge, y_dev, metric).predict(x_test)]
    if len(set(y_train)) < 2:
        raise DataError(f"{task_type} train split has a single label; nothing to learn")

    fit = _warm_logreg(x_train, y_train, seed, max_iter=2000)

    def fit_logreg(c):
        model = fit(c)
        return model, (list(model.predict(x_dev)) if dev else None)

    return [str(y) for y in _pick((0.5, 2.0, 8.0), fit_logreg, y_dev, metric).predict(x_test)]


# ---------------------------------------------------------------- BiLSTM


def _lstm_tokens(text: str) -> list[str]:
    """Words and punctuation marks, lowercased; no-space scripts one character per word."""
    return [w for tok in _TOKEN_RE.findall(text.lower()) for w in split_words(tok)] or ["<unk>"]


class _Vocab:
    """Word ids from the train split: 0 pad, 1 unknown. Training replaces a word seen c times by the
    unknown id with probability 0.25 / (0.25 + c) (word dropout), so that id learns what a rare word is."""

    def __init__(self, sequences: list[list[str]]):
        counts: dict[str, int] = {}
        for s in sequences:
            for w in s:
                counts[w] = counts.get(w, 0) + 1
        self.index = {w: k + 2 for k, w in enumerate(sorted(counts))}
        self.keep = np.ones(len(self.index) + 2)
        for w, k in self.index.items():
            self.keep[k] = counts[w] / (0.25 + counts[w])

    def __len__(self) -> int:
        return len(self.index) + 2

    def ids(self, words: list[str]) -> list[int]:
        return [self.index.get(w, 1) for w in words]


def _batch_ids(rows: list[list[int]], vocab: _Vocab | None, rng: np.random.Generator | None):
    """(B, L) padded id tensor and (B,) lengths; with rng, word dropout per the vocab's keep rates."""
    import torch

    lengths = [len(r) for r in rows]
    ids = np.zeros((len(rows), max(lengths)), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    if rng is not None:
        drop = (rng.random(ids.shape) >= vocab.keep[ids]) & (ids > 0)
        ids[drop] = 1
    return torch.from_numpy(ids), torch.tensor(lengths)


def _build(n_words: int, n_out: int, pair: bool):
    """The network as stock torch modules in a ModuleDict (nn.Module subclasses live in kompakt/models)."""
    from torch import nn

    hidden = 128
    parts = {"embed": nn.Embedding(n_words, 100, padding_idx=0),
             "lstm": nn.LSTM(100, hidden, num_layers=1, batch_first=True, bidirectional=True),
             "drop": nn.Dropout(0.3)}
    if pair:
        parts["head"] = nn.Sequential(nn.Linear(8 * hidden, hidden), nn.ReLU(), nn.Dropout(0.3),
                                      nn.Linear(hidden, n_out))
    else:
        parts["head"] = nn.Linear(2 * hidden, n_out)
    return nn.ModuleDict(parts)


def _encode(net, ids, lengths, pool: bool):
    """BiLSTM states (B, L, 256), or their max over real positions (B, 256) when pool."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    x = net["drop"](net["embed"](ids))
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = pad_packed_sequence(net["lstm"](packed)[0], batch_first=True, total_length=ids.shape[1])
    if not pool:
        return net["drop"](out)
    mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths.to(ids.device)[:, None]
    return net["drop"](out.masked_fill(~mask[..., None], float("-inf")).max(1).values)


def _forward(net, batch, pair: bool, token: bool):
    import torch

    if token:
        return net["head"](_encode(net, *batch[0], pool=False))
    u = _encode(net, *batch[0], pool=True)
    if not pair:
        return net["head"](u)
    v = _encode(net, *batch[1], pool=True)
    return net["head"](torch.cat([u, v, (u - v).abs(), u * v], dim=-1))


def bilstm_baseline(task_type: str, train: Sequence[dict], dev: Sequence[dict], test: Sequence[dict],
                    seed: int = 0, epochs: int = 10, device: str = "cpu", batch_size: int = 32,
                    lr: float = 2e-3, patience: int = 3, max_len: int = 128, threads: int = 1) -> list | None:
    """Predictions on `test` of a BiLSTM trained on `train`, the epoch chosen by early stopping on `dev`.

    At most `epochs` passes over `train` in batches of `batch_size` (Adam, learning rate `lr`, gradient
    norm clipped at 5); training stops after `patience` epochs without a better dev score (accuracy,
    Pearson or token accuracy) and the best epoch's weights predict. An empty `dev` trains all epochs.
    Texts are cut to `max_len` words; tagged sentences are never cut. Regression targets are
    standardised with the train mean and std for training and mapped back. Torch runs on `threads`
    intra-op threads (restored afterwards): the (32 x 100) @ (100 x 512) products of this model gain
    nothing from more, and on a shared 2-core machine two threads spin-waiting for a busy core made
    2 epochs of 400 sentences take 24 s instead of 0.7 s. Returns predictions in the
    metrics' format, None for qa. The same `seed` gives the same predictions (the global torch RNG is
    left as it was).
    """
    _check_task(task_type)
    if task_type == "qa":
        warn(_NO_QA)
        return None
    _check_splits(task_type, train, test)
    if int(epochs) < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    import torch

    token = task_type == "token_classification"
    pair = _is_pair(task_type, train)
    tr = _columns(task_type, train, "train", pair)
    dv = _columns(task_type, dev, "dev", pair) if dev else None
    te = _columns(task_type, test, "test", pair)

    def words(column):
        if column is None:
            return None
        if token:
            return [[w.lower() for w in s] or ["<unk>"] for s in column]
        return [_lstm_tokens(t)[:max_len] for t in column]

    tr_words = [words(tr[0]), words(tr[1])]
    vocab = _Vocab(tr_words[0] + (tr_words[1] or []))
    encode = lambda col: None if col is None else [vocab.ids(s) for s in words(col)]  # noqa: E731
    splits = {"train": (encode(tr[0]), encode(tr[1])), "test": (encode(te[0]), encode(te[1]))}
    if dv is not None:
        splits["dev"] = (encode(dv[0]), encode(dv[1]))
    else:
        warn(f"{task_type} baseline has no dev split; training all {epochs} epochs without early stopping")

    if task_type == "regression":
        y = np.asarray(tr[2], dtype=np.float64)
        mu, sigma = float(y.mean()), float(y.std()) or 1.0
        targets = torch.tensor((y - mu) / sigma, dtype=torch.float32)
        n_out = 1
    elif token:
        tags = sorted({t for s in tr[2] for t in s})
        tag_id = {t: k for k, t in enumerate(tags)}
        tag_rows = [torch.tensor([tag_id[t] for t in s]) for s in tr[2]]
        n_out = len(tags)
    else:
        labels = sorted(set(tr[2]))
        label_id = {lab: k for k, lab in enumerate(labels)}
        targets = torch.tensor([label_id[lab] for lab in tr[2]])
        n_out = len(labels)
    if task_type != "regression" and n_out < 2:
        raise DataError(f"{task_type} train split has a single label; nothing to learn")

    def batch_of(split: str, rows: np.ndarray, rng=None):
        first, second = splits[split]
        b = [_batch_ids([first[i] for i in rows], vocab, rng)]
        if pair:
            b.append(_batch_ids([second[i] for i in rows], vocab, rng))
        return [(ids.to(device), lengths) for ids, lengths in b]  # pack_padded_sequence wants CPU lengths

    def predict(split: str):
        net.eval()
        n = len(splits[split][0])
        out = []
        with torch.inference_mode():
            for a in range(0, n, 256):
                rows = np.arange(a, min(n, a + 256))
                logits = _forward(net, batch_of(split, rows), pair, token).cpu()
                if task_type == "regression":
                    out += [float(v) * sigma + mu for v in logits[:, 0]]
                elif token:
                    best = logits.argmax(-1)
                    out += [[tags[k] for k in best[j, :len(splits[split][0][i])].tolist()]
                            for j, i in enumerate(rows)]
                else:
                    out += [labels[k] for k in logits.argmax(-1).tolist()]
        return out

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rng = np.random.default_rng(seed)
            net = _build(len(vocab), n_out, pair).to(device)
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            n_train = len(splits["train"][0])
            best_state, best_score, bad_epochs = None, -np.inf, 0
            for _ in range(int(epochs)):
                net.train()
                order = rng.permutation(n_train)
                for a in range(0, n_train, batch_size):
                    rows = order[a:a + batch_size]
                    out = _forward(net, batch_of("train", rows, rng), pair, token)
                    if task_type == "regression":
                        loss = torch.nn.functional.mse_loss(out[:, 0], targets[rows].to(device))
                    elif token:
                        gold = torch.full(out.shape[:2], -100, dtype=torch.long)
                        for j, i in enumerate(rows):
                            gold[j, :len(tag_rows[i])] = tag_rows[i]
                        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), gold.flatten().to(device),
                                                                 ignore_index=-100)
                    else:
                        loss = torch.nn.functional.cross_entropy(out, targets[rows].to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
                    opt.step()
                if dv is None:
                    continue
                score = compute(_SELECT[task_type], dv[2], predict("dev"))
                if score > best_score:
                    best_state, best_score, bad_epochs = copy.deepcopy(net.state_dict()), score, 0
                else:
                    bad_epochs += 1
                    if bad_epochs >= patience:
                        break
            if best_state is not None:
                net.load_state_dict(best_state)
            return predict("test")
    finally:
        torch.set_num_threads(previous_threads)


# ---------------------------------------------------------------- learning curves


def learning_curve_sizes(n_train: int, sizes: Sequence[int] = (100, 500, 1000)) -> list:
    """The train sizes of a learning curve: the given sizes below `n_train`, ascending, then "all".
    learning_curve_sizes(800) -> [100, 500, "all"]."""
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1]
    if bad:
        raise ConfigError(f"learning-curve sizes must be positive integers, got {bad}")
    return sorted({int(s) for s in sizes if s < n_train}) + ["all"]



"""`kompakt explain`: which words made a text classifier decide, shown in text order (after TransSHAP).

TransSHAP (Kokalj et al. 2021) explains a BERT classifier with SHAP over *words* rather than sub-word tokens
and shows the words in sentence order, coloured by their contribution. This module does the same with two
methods and fixes what made the original slow: it padded perturbed texts without attention masks and ran one
forward pass per perturbation. Here the perturbations of a text are length-bucketed into batches with masks
(`kompakt.infer.runtime.Predictor`: at most 8,192 padded tokens on a GPU, 1,024 on CPU, per pass) under
`torch.inference_mode`, so SHAP's 256 evaluations of a short text take a handful of forward passes.

Words: `split_words` cuts a text into words with character offsets: runs of letters/digits (`\\w+`) and single
punctuation marks, or, for Chinese (over half the non-space characters are Han), jieba's segmentation. Each
word is one feature; its sub-word tokens come from the fast tokenizer's offset mapping. Words that share a
token (a tokenizer that does not split at punctuation) are merged into one feature, so every token belongs to
exactly one word.

What the numbers mean, in one unit for both methods: the *probability of the target class* (softmax; the
value itself for a regression head). A word's attribution is its share of

    p(target | text) - p(target | every word replaced by [MASK])

so the attributions of a text sum (exactly for SHAP, up to IG's convergence delta) to that difference.
Positive means the word pushes towards the target class (red), negative against it (blue). The target is
the predicted class unless `--target` names another.

- SHAP: `shap.explainers.Partition` (Owen values) over the words with a masker that replaces every sub-token
  of a hidden word by [MASK] (so the length and positions stay put; tokenizers without [MASK] drop the word's
  tokens instead). The coalition tree follows text order: each span of words is split into two adjacent
  halves, each at least a third of the span, the split point drawn from `seed`. `budget` is the number of
  model evaluations (perturbed texts) per text, rounded down to an even number and never exceeded; a
  perturbation already evaluated for this text is not run again.
- Integrated gradients: captum's `LayerIntegratedGradients` on the input (word) embeddings, from the baseline
  (the same all-[MASK] text, special tokens kept) to the text in `ig_steps` Gauss-Legendre steps, batched over
  texts and steps; sub-token attributions (summed over the embedding dimension) are summed into words. The
  convergence delta is `sum(attributions) - (p(text) - p(baseline))`, in probability; while some text's
  |delta| is over 5% of its difference, the steps double (at most 64x `ig_steps`), and the steps used are kept.
- Stability, per text: Spearman's rank correlation of the SHAP and IG word attributions (both methods run),
  and of SHAP with `seed` against SHAP with `seed + 1` (another coalition tree and tie-breaking, the same
  budget). A low figure says the ranking depends on the method, the tree or too small a budget. None when
  a text has fewer than 3 words or one side is constant.

Outputs in `--out DIR`, each written to a temporary name and renamed (a kill leaves no half file that looks
whole); explanations.json is written last:

    explanations.html   one self-contained page: per text, every word coloured (intensity by |value| scaled
                        per text and method, the value in a tooltip), the predicted class and probability,
                        and an inline SVG bar chart of the attributions in text order
    text-<n>.png        per text (n from 1): the coloured words on top, the bar chart below
    explanations.json   per text: words with character offsets, prediction, target, attributions per
                        method, stability, evaluations used, seconds; and their means over texts

From Python: `explain_texts(folder_or_predictor, texts, methods=("shap", "ig"), budget=256, ...)` returns one
dict per text, `write_report(results, out_dir)` writes the three outputs.
"""

from __future__ import annotations

import html
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kompakt.errors import ConfigError, DataError
from kompakt.log import info, warn

METHODS = ("shap", "ig")
METHOD_NAMES = {"shap": "SHAP (Partition)", "ig": "Integrated gradients"}
# Integrated gradients: steps double (up to 64x --ig-steps) until |delta| <= 5% of the probability difference.
IG_TOLERANCE = 0.05
IG_MAX_FACTOR = 64
# Words: a run of letters/digits/underscore, or one other non-space character (punctuation, symbols).
WORD_RE = re.compile(r"\w+|[^\w\s]")
# Han ideographs (the unified block, extension A, compatibility ideographs, extension B and beyond).
HAN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
# Colours: red towards the target class, blue against (Tailwind red-600 / blue-600), as RGB 0-255.
RED, BLUE = (220, 38, 38), (37, 99, 235)
# Strongest background opacity; 0.85 keeps black text readable on the most intense word.
MAX_ALPHA = 0.85


# ---------------------------------------------------------------------------------------------- words

def is_chinese(text: str) -> bool:
    """True when over half of the text's non-space characters are Han ideographs."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(1 for c in chars if HAN_RE.match(c)) * 2 > len(chars)


def split_words(text: str) -> list[tuple[int, int]]:
    """Words of `text` as (start, end) character offsets (end exclusive), in order, never overlapping.

    Chinese text (see `is_chinese`) is cut by jieba (its default dictionary with the HMM for unknown words),
    each jieba word one feature; any other text into runs of `\\w` and single punctuation marks. Whitespace
    belongs to no word, so the text is the words joined by the whitespace between their offsets."""
    if is_chinese(text):
        import jieba

        jieba.setLogLevel(60)  # silence "Building prefix dict..." on stderr
        return [(s, e) for w, s, e in jieba.tokenize(text) if w.strip()]
    return [m.span() for m in WORD_RE.finditer(text)]


@dataclass
class Prepared:
    """One text as explainer features: words (character spans) and the token ids with each token's word."""

    text: str
    spans: list[tuple[int, int]]
    ids: np.ndarray            # (L,) int64 token ids, special tokens included
    word_tokens: np.ndarray    # (M, L) bool: token t belongs to word m; special tokens to none

    @property
    def num_words(self) -> int:
        return len(self.spans)


def prepare(tokenizer, text: str, max_length: int) -> Prepared:
    """Tokenise `text` and map each token to its word (see `split_words`); words sharing a token are merged.

    A token lying in no word (a whitespace piece) goes to the next word, or the last one at the end. A text
    over `max_length` tokens raises DataError: SHAP over a truncated text would explain another text."""
    import bisect

    spans = split_words(text)
    if not spans:
        raise DataError("a text has no words (only whitespace); give non-empty texts")
    enc = tokenizer(text, add_special_tokens=True, truncation=False, return_offsets_mapping=True,
                    return_special_tokens_mask=True, return_attention_mask=False, return_token_type_ids=False,
                    verbose=False)
    ids, offsets, special = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
    if len(ids) > max_length:
        raise DataError(f"the text {text[:40]!r}... has {len(ids)} tokens, over the model's limit of {max_length}; "
                        "split it into shorter texts")
    starts = [s for s, _ in spans]
    ends = [e for _, e in spans]
    owner: list[tuple[int, int] | None] = []   # per token: the first and last word it overlaps
    joined = [False] * len(spans)               # joined[i]: word i and i+1 share a token
    for (s, e), sp in zip(offsets, special):
        if sp:
            owner.append(None)
            continue
        first = bisect.bisect_right(ends, s)       # first word ending after the token starts
        last = bisect.bisect_left(starts, e) - 1   # last word starting before the token ends
        if first > last:                           # in a gap between words
            first = last = min(first, len(spans) - 1)
        for i in range(first, last):
            joined[i] = True
        owner.append((first, last))
    # Merge joined runs of words into one feature each; old word index -> new feature index.
    feature_of, merged = [], []
    for i, (s, e) in enumerate(spans):
        if i > 0 and joined[i - 1]:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
        feature_of.append(len(merged) - 1)
    word_tokens = np.zeros((len(merged), len(ids)), dtype=bool)
    for t, o in enumerate(owner):
        if o is not None:
            word_tokens[feature_of[o[0]], t] = True
    return Prepared(text, merged, np.asarray(ids, dtype=np.int64), word_tokens)


# ------------------------------------------------------------------------------------------ the model

def load_classifier(folder: str | Path, *, device: str = "auto", max_length: int | None = None,
                    threads: int | None = None):
    """The folder's stock *ForSequenceClassification in torch (fp32 on CPU, bf16 autocast for SHAP on CUDA),
    as a `kompakt.infer.runtime.Predictor`; DataError for a folder without a sequence-classification head."""
    from kompakt.infer.runtime import folder_task, load_predictor

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such model folder")
    head = folder_task(folder)
    if head != "classify":
        have = "a token-classification head" if head == "tokens" else "no task head"
        raise DataError(f"{folder}: explain needs a fine-tuned sequence-classification folder (this one has {have}); "
                        "give the output of `kompakt finetune` on a classification task")
    return load_predictor(folder, "classify", runtime="torch", device=device, max_length=max_length,
                          threads=threads)


def resolve_target(predictor, target: str | None) -> int | None:
    """The class index `--target` names (a label, or an index when no label has that name); None: predicted."""
    if predictor.regression:
        if target is not None:
            raise ConfigError("--target: this model is a regression head with no classes; drop --target")
        return 0
    if target is None:
        return None
    if target in predictor.labels:
        return predictor.labels.index(target)
    if target.isdigit() and int(target) < len(predictor.labels):
        return int(target)
    raise ConfigError(f"--target {target!r} is not a class of this model; its classes are "
                      f"{', '.join(predictor.labels)}")


class _Scorer:
    """Model outputs in the explanation unit (class probabilities, or the regression value) for token-id rows,
    length-bucketed into padded batches with attention masks; counts rows and forward passes."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.num_rows = 0
        self.num_forward = 0

    def __call__(self, rows: list[np.ndarray]) -> np.ndarray:
        out = None
        for group in self.predictor.batches([len(r) for r in rows]):
            logits = self.predictor.forward([rows[g] for g in group])
            self.num_forward += 1
            if self.predictor.regression:
                vals = logits[:, :1]
            else:
                e = np.exp(logits - logits.max(axis=-1, keepdims=True))
                vals = e / e.sum(axis=-1, keepdims=True)
            if out is None:
                out = np.empty((len(rows), vals.shape[1]), dtype=np.float64)
            out[group] = vals
        self.num_rows += len(rows)
        return out


# ------------------------------------------------------------------------------------------------ SHAP

def order_tree(num_words: int, seed: int) -> np.ndarray:
    """A hierarchical clustering of words 0..M-1 that follows text order, in scipy's linkage format
    ((M-1, 4): left, right, distance, size; children before parents; the last row is the root).

    Each span of n >= 2 adjacent words splits into a left part of k words, k drawn (from `seed`) among
    ceil(n/3)..floor(2n/3), so both parts are adjacent and at least a third of the span. The distance is the
    span's word count: positive, as shap's Partition explainer needs for a node it may split."""
    rng = random.Random(seed)
    rows: list[list[float]] = []

    def build(lo: int, hi: int) -> int:
        n = hi - lo
        if n == 1:
            return lo
        k = rng.randint(max(1, math.ceil(n / 3)), max(1, min(n - 1, (2 * n) // 3)))
        left, right = build(lo, lo + k), build(lo + k, hi)
        rows.append([left, right, float(n), float(n)])
        return num_words + len(rows) - 1

    build(0, num_words)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _word_masker(num_words: int, clustering: np.ndarray):
    """A shap masker over one text's words: the masked input it hands the model function is the keep-mask
    itself ((1, M) bool, True = the word is shown); `_shap_text` turns keep-masks into token ids."""
    import shap

    class WordMasker(shap.maskers.Masker):
        immutable_outputs = True  # each call returns a new array, so shap need not deep-copy it

        def __init__(self):
            self.shape = (1, num_words)
            self.clustering = clustering

        def __call__(self, mask, x):
            return (np.asarray(mask, dtype=bool).reshape(1, -1),)

    return WordMasker()


def _shap_text(prep: Prepared, scorer: _Scorer, target: int, budget: int, seed: int, mask_id: int | None,
               cache: dict[bytes, float]) -> dict:
    """Owen values of the words of one text for the target class (probability), at most `budget` evaluations.

    `cache` maps a keep-mask's bytes to its model output; it is shared by the runs of one text (both seeds),
    so a perturbation is run once."""
    import shap

    num_words = prep.num_words
    counts = {"evaluations": 0}

    def model(keep: np.ndarray) -> np.ndarray:
        keep = np.asarray(keep, dtype=bool).reshape(-1, num_words)
        counts["evaluations"] += len(keep)
        keys = [row.tobytes() for row in keep]
        todo = {}
        for i, k in enumerate(keys):
            if k not in cache and k not in todo:
                todo[k] = i
        if todo:
            idx = list(todo.values())
            hidden = (~keep[idx]).astype(np.uint8) @ prep.word_tokens.astype(np.uint8) > 0  # (n, L) tokens hidden
            if mask_id is not None:
                rows = np.repeat(prep.ids[None, :], len(idx), axis=0)
                rows[hidden] = mask_id
                rows = list(rows)
            else:
                rows = [prep.ids[~h] for h in hidden]
            vals = scorer(rows)[:, target]
            for k, v in zip(todo, vals):
                cache[k] = float(v)
        return np.array([cache[k] for k in keys], dtype=np.float64)

    t0 = time.perf_counter()
    if num_words == 1:
        # One player: its Shapley value is the whole difference, from the two evaluations shap would make.
        full, empty = model(np.array([[True], [False]]))
        values, base = np.array([full - empty]), float(empty)
    else:
        masker = _word_masker(num_words, order_tree(num_words, seed))
        explainer = shap.explainers.Partition(model, masker)
        # shap breaks ties in its priority queue with numpy's global RNG: seed it, and leave it as it was.
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            # An even budget: owen() adds two masks per node, so an odd one could be passed by one. A batch as
            # large as the budget lets each round of the tree walk go to the model as one call.
            even = max(2, budget - budget % 2)
            exp = explainer(np.zeros((1, num_words)), max_evals=even, batch_size=even, silent=True)
        finally:
            np.random.set_state(state)
        values, base = np.asarray(exp.values[0], dtype=np.float64), float(np.asarray(exp.base_values).ravel()[0])
    return {"values": values, "base_value": base, "evaluations": counts["evaluations"],
            "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------- integrated gradients

def _integrated_gradients(predictor, preps: list[Prepared], targets: list[int], steps: int,
                          baseline_id: int) -> list[dict]:
    """Word attributions (probability of the target) by captum's LayerIntegratedGradients on the input
    embeddings, texts batched by length; one dict (values, delta, seconds) per text."""
    import torch
    from captum.attr import LayerIntegratedGradients

    model = predictor.model
    regression = predictor.regression

    def forward(input_ids, attention_mask):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return logits[:, :1] if regression else logits.softmax(-1)

    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    out: list[dict | None] = [None] * len(preps)
    for group in predictor.batches([len(p.ids) for p in preps]):
        t0 = time.perf_counter()
        width = max(len(preps[g].ids) for g in group)
        ids = np.full((len(group), width), predictor.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        base = ids.copy()
        for r, g in enumerate(group):
            p = preps[g]
            ids[r, :len(p.ids)] = p.ids
            mask[r, :len(p.ids)] = 1
            # The baseline hides every word's tokens and keeps [CLS]/[SEP]: the same text SHAP's empty
            # coalition scores, so both methods split the same probability difference.
            in_word = p.word_tokens.any(axis=0)
            base[r, :len(p.ids)] = np.where(in_word, baseline_id, p.ids)
        # Rows per forward/backward pass: every text of the group at least (captum's minimum), else as many
        # steps as fit the predictor's padded-token budget.
        dev = predictor.device
        feeds = (torch.from_numpy(ids).to(dev), torch.from_numpy(base).to(dev), torch.from_numpy(mask).to(dev))
        with torch.inference_mode():
            gap = (forward(feeds[0], feeds[2]) - forward(feeds[1], feeds[2])).float().cpu().numpy()
        gap = np.abs(gap[np.arange(len(group)), [0 if regression else targets[g] for g in group]])
        n = steps
        while True:
            tok, delta = _ig_pass(lig, feeds, [targets[g] for g in group], n, predictor.batch_tokens // width)
            # A sharply trained classifier's probability can jump within a few percent of the path, where a
            # fixed grid misses it (a 2x32 toy model: delta -0.98 of 0.99 at 32 steps, 0.02 at 512). Double the
            # steps until every text's delta is within IG_TOLERANCE of what it splits, up to IG_MAX_FACTOR.
            worst = float(np.max(np.abs(delta) / np.maximum(gap, 1e-3)))
            if worst <= IG_TOLERANCE or n >= steps * IG_MAX_FACTOR:
                break
            n *= 2
        seconds = (time.perf_counter() - t0) / len(group)   # the batch's time shared among its texts
        for r, g in enumerate(group):
            p = preps[g]
            out[g] = {"values": p.word_tokens.astype(np.float64) @ tok[r, :len(p.ids)].astype(np.float64),
                      "delta": float(delta[r]), "steps": n, "seconds": seconds}
    return out  # type: ignore[return-value]


def _ig_pass(lig, feeds, targets: list[int], steps: int, rows_budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token attributions (n, width), summed over the embedding, and convergence deltas (n,)."""
    import torch

    ids, base, mask = feeds
    n = len(targets)
    # Rows per forward/backward pass: every text of the group at least (captum's minimum), else as many
    # steps as fit the predictor's padded-token budget.
    rows = max(n, min(n * steps, rows_budget // n * n))
    with torch.enable_grad():
        attr, delta = lig.attribute(ids, baselines=base, target=targets, additional_forward_args=(mask,),
                                    n_steps=steps, internal_batch_size=rows, return_convergence_delta=True)
    return attr.sum(-1).detach().float().cpu().numpy(), delta.detach().float().cpu().numpy()


# ------------------------------------------------------------------------------------------- stability

def rank_correlation(a, b) -> float | None:
    """Spearman's rho of two attribution vectors; None under 3 words or when either side is constant."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    rho = float(spearmanr(a, b).statistic)
    return None if math.isnan(rho) else rho


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# --------------------------------------------------------------------------------------------- explain

def explain_texts(model, texts: list[str], *, methods=METHODS, budget: int = 256, ig_steps: int = 32,
                  target: str | None = None, seed: int = 0, device: str = "auto", stability: bool = True,
                  max_length: int | None = None, threads: int | None = None) -> list[dict]:
    """Explain each text's prediction: one dict per text, in the input order (see the module docstring).

    `model` is a model folder or a Predictor from `load_classifier`. `budget`: SHAP model evaluations per
    text (the seed + 1 stability run spends as many again); `ig_steps`: integrated-gradient steps. Keys per
    text: n (from 1), text, segmentation, words [{text, start, end}], labels, probabilities, predicted
    {label, probability} (or {value}), target, attributions {method: [one value per word]}, shap {...},
    ig {...}, stability {shap_vs_ig, shap_seed_vs_seed}, seconds."""
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"methods {unknown or '(none)'}: choose from {', '.join(METHODS)}")
    if budget < 4:
        raise ConfigError(f"--budget {budget}: SHAP needs at least 4 model evaluations per text")
    if ig_steps < 2:
        raise ConfigError(f"--ig-steps {ig_steps}: integrated gradients need at least 2 steps")
    if not texts:
        raise DataError("no texts: give texts after the model folder or --input FILE")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"text {i + 1} is empty; every text needs at least one word")
    predictor = model if hasattr(model, "forward") and hasattr(model, "batches") else \
        load_classifier(model, device=device, max_length=max_length, threads=threads)
    if "ig" in methods and getattr(predictor, "lattice", False):
        # captum would differentiate the character embeddings of a row without its lattice words (the model's
        # forward here takes input_ids only), explaining another model than the one that predicts.
        if methods == ("ig",):
            raise ConfigError("integrated gradients do not support Lattice-BERT yet; use --method shap")
        info("explain: integrated gradients skipped, they do not support Lattice-BERT yet; SHAP only")
        methods = tuple(m for m in methods if m != "ig")
    fixed_target = resolve_target(predictor, target)
    tok = predictor.tokenizer
    mask_id = tok.mask_token_id
    baseline_id = mask_id if mask_id is not None else predictor.pad_id
    labels = ["value"] if predictor.regression else list(predictor.labels)

    preps = []
    for i, t in enumerate(texts):
        try:
            preps.append(prepare(tok, t, predictor.max_length))
        except DataError as err:
            raise DataError(f"text {i + 1}: {err}") from None
    scorer = _Scorer(predictor)
    full = scorer([p.ids for p in preps])   # (N, C): the prediction on each whole text
    targets = [int(full[i].argmax()) if fixed_target is None else fixed_target for i in range(len(texts))]

    results = []
    for i, (text, p) in enumerate(zip(texts, preps)):
        probs = full[i]
        res = {
            "n": i + 1, "text": text, "segmentation": "jieba" if is_chinese(text) else "words",
            "words": [{"text": text[s:e], "start": s, "end": e} for s, e in p.spans],
            "labels": labels,
            "probabilities": [float(x) for x in probs],
            "predicted": ({"value": float(probs[0])} if predictor.regression else
                          {"label": labels[int(probs.argmax())], "probability": float(probs.max())}),
            "target": labels[targets[i]],
            "space": "value of the regression head" if predictor.regression else
                     f"probability of class {labels[targets[i]]!r}",
            "attributions": {}, "stability": {}, "seconds": 0.0,
        }
        results.append(res)

    if "shap" in methods:
        for i, p in enumerate(preps):
            cache: dict[bytes, float] = {np.ones(p.num_words, dtype=bool).tobytes(): float(full[i, targets[i]])}
            before_rows, before_fwd = scorer.num_rows, scorer.num_forward
            main = _shap_text(p, scorer, targets[i], budget, seed, mask_id, cache)
            entry = {"budget": budget, "evaluations": main["evaluations"], "base_value": main["base_value"],
                     "seed": seed, "masking": "mask" if mask_id is not None else "remove",
                     "seconds": main["seconds"]}
            results[i]["attributions"]["shap"] = [float(v) for v in main["values"]]
            if stability:
                other = _shap_text(p, scorer, targets[i], budget, seed + 1, mask_id, cache)
                entry["stability_evaluations"] = other["evaluations"]
                entry["stability_seconds"] = other["seconds"]
                results[i]["stability"]["shap_seed_vs_seed"] = rank_correlation(main["values"], other["values"])
            entry["model_rows"] = scorer.num_rows - before_rows
            entry["forward_passes"] = scorer.num_forward - before_fwd
            results[i]["shap"] = entry
            results[i]["seconds"] += main["seconds"] + entry.get("stability_seconds", 0.0)
            info(f"explain: text {i + 1}/{len(preps)} ({p.num_words} words): SHAP {entry['evaluations']} evaluations "
                 f"in {entry['forward_passes']} forward passes, {main['seconds']:.2f} s")

    if "ig" in methods:
        t0 = time.perf_counter()
        for i, r in enumerate(_integrated_gradients(predictor, preps, targets, ig_steps, baseline_id)):
            results[i]["attributions"]["ig"] = [float(v) for v in r["values"]]
            results[i]["ig"] = {"steps": r["steps"], "delta": r["delta"], "seconds": r["seconds"]}
            results[i]["seconds"] += r["seconds"]
        used = sorted({results[i]["ig"]["steps"] for i in range(len(preps))})
        info(f"explain: integrated gradients ({'/'.join(map(str, used))} steps) on {len(preps)} texts in "
             f"{time.perf_counter() - t0:.2f} s")

    for res in results:
        att = res["attributions"]
        if "shap" in att and "ig" in att:
            res["stability"]["shap_vs_ig"] = rank_correlation(att["shap"], att["ig"])
    return results


# ---------------------------------------------------------------------------------------------- report

def _write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temporary name in the same folder, fsync and rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _colour(value: float, scale: float) -> tuple[tuple[int, int, int], float]:
    """(RGB, opacity 0..MAX_ALPHA) of one attribution: red for positive, blue for negative, by |value|/scale."""
    alpha = MAX_ALPHA * min(1.0, abs(value) / scale) if scale > 0 else 0.0
    return (RED if value >= 0 else BLUE), alpha


def _scale(values) -> float:
    return max((abs(v) for v in values), default=0.0)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _html_words(res: dict, values: list[float]) -> str:
    """The text with every word as a coloured span (tooltip: the value); the gaps between words as they are."""
    text, scale, parts, pos = res["text"], _scale(values), [], 0
    for w, v in zip(res["words"], values):
        parts.append(html.escape(text[pos:w["start"]]))
        (r, g, b), a = _colour(v, scale)
        parts.append(f'<span class="w" style="background:rgba({r},{g},{b},{a:.3f})" '
                     f'title="{html.escape(w["text"])}: {v:+.4f}">{html.escape(w["text"])}</span>')
        pos = w["end"]
    parts.append(html.escape(text[pos:]))
    return "".join(parts)


def _svg_bars(res: dict, methods: list[str]) -> str:
    """An inline SVG bar chart of the word attributions in text order: one bar per word and method
    (SHAP solid, IG hatched-light), red up for the target class, blue down against, one scale per text."""
    words, att = res["words"], res["attributions"]
    scale = max((_scale(att[m]) for m in methods), default=0.0) or 1.0
    slot = 10 * len(methods) + 8            # pixels per word
    width, half, label_h = max(320, 40 + slot * len(words)), 60, 90
    height = 2 * half + label_h + 20
    out = [f'<svg class="bars" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="word attributions in text order">',
           f'<line x1="30" y1="{half + 10}" x2="{width}" y2="{half + 10}" stroke="#888" stroke-width="1"/>',
           f'<text x="2" y="18" font-size="10">+{scale:.2g}</text>',
           f'<text x="2" y="{2 * half + 8}" font-size="10">-{scale:.2g}</text>']
    for i, w in enumerate(words):
        x0 = 34 + i * slot
        for k, m in enumerate(methods):
            v = att[m][i]
            h = abs(v) / scale * half
            y = half + 10 - h if v >= 0 else half + 10
            r, g, b = RED if v >= 0 else BLUE
            opacity = 0.9 if k == 0 else 0.45
            out.append(f'<rect x="{x0 + 10 * k}" y="{y:.1f}" width="9" height="{max(h, 0.5):.1f}" '
                       f'fill="rgb({r},{g},{b})" fill-opacity="{opacity}"><title>{html.escape(w["text"])} '
                       f'({METHOD_NAMES[m]}): {v:+.4f}</title></rect>')
        lx, ly = x0 + 5 * len(methods), 2 * half + 16
        label = w["text"] if len(w["text"]) <= 14 else w["text"][:13] + "…"
        out.append(f'<text x="{lx}" y="{ly}" font-size="11" text-anchor="end" '
                   f'transform="rotate(-60 {lx} {ly})">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2937; margin: 2em auto;
       max-width: 72em; padding: 0 1em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-top: 1px solid #ddd; padding-top: 1em; }
h3 { font-size: 0.95em; margin: 0.8em 0 0.2em; color: #4b5563; }
.text { white-space: pre-wrap; font-size: 1.1em; line-height: 1.9; }
span.w { border-radius: 3px; padding: 1px 2px; cursor: help; }
.meta, .stab, .legend { color: #4b5563; font-size: 0.9em; }
.chart { overflow-x: auto; }
code { background: #f3f4f6; padding: 0 3px; }
"""


def _html(results: list[dict], header: dict) -> str:
    """The whole self-contained report page (inline CSS and SVG, every text escaped)."""
    first = results[0] if results else {}
    space = "the regression value" if first.get("labels") == ["value"] else "the probability of the target class"
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>kompakt explain</title>", f"<style>{CSS}</style></head><body>",
             "<h1>Word attributions</h1>",
             f'<p class="legend">Model <code>{html.escape(str(header.get("model", "")))}</code>. Each word is '
             f"coloured by its contribution to {space}: <span class=\"w\" style=\"background:rgba(220,38,38,0.6)\">"
             "red</span> towards the target class, <span class=\"w\" style=\"background:rgba(37,99,235,0.6)\">"
             "blue</span> against it, the intensity by |value| scaled per text and method; hover a word for its "
             "value. Values are shares of p(target | text) - p(target | every word masked).</p>"]
    means = header.get("stability_mean") or {}
    if means:
        parts.append(f'<p class="legend">Mean Spearman rank correlation over texts: SHAP vs IG '
                     f'{_fmt(means.get("shap_vs_ig"))}, SHAP seed vs seed + 1 {_fmt(means.get("shap_seed_vs_seed"))}.'
                     "</p>")
    for res in results:
        methods = [m for m in METHODS if m in res["attributions"]]
        pred = res["predicted"]
        said = (f"value <b>{pred['value']:.4f}</b>" if "value" in pred else
                f"predicted <b>{html.escape(pred['label'])}</b> (p = {pred['probability']:.3f}); attributions "
                f"towards <b>{html.escape(res['target'])}</b>")
        parts.append(f'<section id="text-{res["n"]}"><h2>Text {res["n"]}</h2><p class="meta">{said}; '
                     f'{len(res["words"])} words ({res["segmentation"]})</p>')
        for m in methods:
            if m == "shap":
                note = f'{res["shap"]["evaluations"]} model evaluations, budget {res["shap"]["budget"]}'
            else:
                note = f'{res["ig"]["steps"]} steps, convergence delta {res["ig"]["delta"]:+.2g}'
            parts.append(f'<div class="method" data-method="{m}"><h3>{METHOD_NAMES[m]} ({note})</h3>'
                         f'<p class="text">{_html_words(res, res["attributions"][m])}</p></div>')
        parts.append(f'<div class="chart"><h3>Attributions in text order'
                     f'{" (solid: SHAP, light: IG)" if len(methods) == 2 else ""}</h3>'
                     f'{_svg_bars(res, methods)}</div>')
        st = res["stability"]
        if st:
            bits = []
            if "shap_vs_ig" in st:
                bits.append(f"SHAP vs IG {_fmt(st['shap_vs_ig'])}")
            if "shap_seed_vs_seed" in st:
                bits.append(f"SHAP seed vs seed + 1 {_fmt(st['shap_seed_vs_seed'])}")
            parts.append(f'<p class="stab">Spearman rank correlation: {"; ".join(bits)}</p>')
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _cjk_font() -> str | None:
    """The name of an installed font with Han glyphs, for matplotlib (DejaVu Sans has none); None if none."""
    from matplotlib import font_manager

    for f in font_manager.fontManager.ttflist:
        if any(k in f.name for k in ("CJK", "WenQuanYi", "Han Sans", "Heiti", "SimHei", "Droid Sans Fallback",
                                     "Source Han", "AR PL")):
            return f.name
    return None


def _png(res: dict) -> bytes:
    """One text as a PNG: per method, the words in text order coloured by their value (wrapped to the page
    width), and below a bar chart of all methods' attributions in text order. Agg backend, no pyplot state."""
    import io
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    methods = [m for m in METHODS if m in res["attributions"]]
    words = [w["text"] for w in res["words"]]
    family = _cjk_font() if res["segmentation"] == "jieba" or any(HAN_RE.search(w) for w in words) else None
    prop = FontProperties(family=family, size=12) if family else FontProperties(size=12)
    dpi, width_in = 100, min(28.0, max(9.0, 0.32 * len(words) * max(1, len(methods)) + 2))
    width_px, margin, line_h, head_h = width_in * dpi, 20, 30, 24
    # Measure each word (and a space) in pixels with a renderer of the final dpi, then wrap into lines.
    probe = Figure(figsize=(width_in, 2), dpi=dpi)
    renderer = FigureCanvasAgg(probe).get_renderer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Glyph missing" when no font has the script
        sizes = [renderer.get_text_width_height_descent(w, prop, ismath=False)[0] + 6 for w in words]
        space = renderer.get_text_width_height_descent("a a", prop, ismath=False)[0] - \
            renderer.get_text_width_height_descent("aa", prop, ismath=False)[0] + 2
    layout, x, line = [], margin, 0
    for s in sizes:
        if x + s > width_px - margin and x > margin:
            x, line = margin, line + 1
        layout.append((x, line))
        x += s + space
    text_h = (line + 1) * line_h + head_h
    bars_h = 260
    height_px = len(methods) * text_h + bars_h + 30
    fig = Figure(figsize=(width_in, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    pred = res["predicted"]
    title = (f"text {res['n']}: value {pred['value']:.4f}" if "value" in pred else
             f"text {res['n']}: predicted {pred['label']} (p = {pred['probability']:.3f}), "
             f"explaining {res['target']}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.text(margin / width_px, 1 - 4 / height_px, title, va="top", ha="left", fontsize=11, fontproperties=None)
        for k, m in enumerate(methods):
            vals = res["attributions"][m]
            scale = _scale(vals)
            top = 30 + k * text_h
            fig.text(margin / width_px, 1 - top / height_px, METHOD_NAMES[m], va="top", ha="left", fontsize=9,
                     color="#4b5563")
            for w, v, (wx, wl) in zip(words, vals, layout):
                (r, g, b), a = _colour(v, scale)
                fig.text(wx / width_px, 1 - (top + head_h + wl * line_h) / height_px, w, va="top", ha="left",
                         fontproperties=prop,
                         bbox=dict(boxstyle="round,pad=0.2", facecolor=(r / 255, g / 255, b / 255, a),
                                   edgecolor="none"))
        ax = fig.add_axes((60 / width_px, 110 / height_px, 1 - 80 / width_px, (bars_h - 120) / height_px))
        xs = np.arange(len(words))
        bw = 0.8 / len(methods)
        for k, m in enumerate(methods):
            vals = np.asarray(res["attributions"][m])
            colours = [tuple(c / 255 for c in (RED if v >= 0 else BLUE)) for v in vals]
            ax.bar(xs + (k - (len(methods) - 1) / 2) * bw, vals, width=bw, color=colours,
                   alpha=0.9 if k == 0 else 0.45, label=METHOD_NAMES[m])
        ax.axhline(0, color="#888", linewidth=0.8)
        ax.set_xticks(xs)
        ax.set_xticklabels([w if len(w) <= 14 else w[:13] + "…" for w in words], rotation=60, ha="right",
                           fontproperties=FontProperties(family=family, size=9) if family else None)
        ax.set_xlim(-0.6, len(words) - 0.4)
        ax.set_ylabel("attribution")
        if len(methods) > 1:
            ax.legend(fontsize=8, loc="upper right")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def write_report(results: list[dict], out_dir: str | Path, header: dict | None = None) -> Path:
    """Write text-<n>.png, explanations.html and (last) explanations.json into `out_dir` (created); each file
    to a temporary name, then renamed. `header` (model, settings) goes into the JSON's top level."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; give --out a folder")
    out.mkdir(parents=True, exist_ok=True)
    header = dict(header or {})
    header["stability_mean"] = {
        key: _mean(r["stability"].get(key) for r in results)
        for key in ("shap_vs_ig", "shap_seed_vs_seed") if any(key in r["stability"] for r in results)}
    han = [r["n"] for r in results if HAN_RE.search(r["text"])]
    if han and _cjk_font() is None:
        # matplotlib ships no font with Han glyphs; the HTML page uses the browser's fonts and is unaffected.
        header["png_note"] = ("no installed font has Han glyphs, so the PNGs of texts "
                              f"{', '.join(map(str, han))} show boxes for them; install one (Debian: "
                              "fonts-noto-cjk) or read explanations.html")
        warn(f"explain: {header['png_note']}")
    for res in results:
        res["png"] = f"text-{res['n']}.png"
        _write_atomic(out / res["png"], _png(res))
    _write_atomic(out / "explanations.html", _html(results, header).encode("utf-8"))
    doc = {**header, "texts": results}
    _write_atomic(out / "explanations.json",
                  (json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))
    return out


# ------------------------------------------------------------------------------------------------- CLI

def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Texts of a file: JSONL/Parquet/datasets rows' `text_field` (kompakt.readers), any other file one text
    per non-blank line (UTF-8, .gz allowed)."""
    import gzip

    from kompakt.config import DataConfig
    from kompakt.readers import DecodeCounter, read_documents

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file; give --input a text file (one text per line) or a JSONL file")
    name = p.name.lower()
    if p.is_dir() or name.endswith((".jsonl", ".jsonl.gz", ".parquet")):
        cfg = DataConfig(inputs=[str(p)], text_field=text_field, txt_document="line")
        return [t for _, t in read_documents(p, cfg, DecodeCounter()) if t.strip()]
    raw = (gzip.open if name.endswith(".gz") else open)(p, "rb").read()
    texts = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{p}:{lineno}: invalid UTF-8 ({err.reason} at byte {err.start}); fix the file") from None
        if text.strip():
            texts.append(text)
    return texts


def main(args) -> int:
    """The `kompakt explain` command (options in kompakt/cli.py); prints the output folder."""
    import importlib.metadata

    texts = list(args.texts or [])
    if args.input:
        texts += read_texts(args.input, args.text_field)
    if not texts:
        raise DataError("no texts: give texts after the model folder or --input FILE")
    if args.task not in (None, "classify"):
        raise ConfigError(f"--task {args.task}: explain explains a classifier; drop --task or use classify")
    if args.runtime not in ("auto", "torch"):
        raise ConfigError(f"--runtime {args.runtime}: explain runs the torch model (integrated gradients need "
                          "gradients); drop --runtime")
    methods = METHODS if args.method == "both" else (args.method,)
    predictor = load_classifier(args.model, device=args.device, max_length=args.max_length, threads=args.threads)
    t0 = time.perf_counter()
    results = explain_texts(predictor, texts, methods=methods, budget=args.budget, ig_steps=args.ig_steps,
                            target=args.target, seed=args.seed)
    versions = {}
    for pkg in ("torch", "transformers", "shap", "captum", "jieba"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    header = {"model": str(Path(args.model).resolve()), "methods": list(methods), "budget": args.budget,
              "ig_steps": args.ig_steps, "seed": args.seed, "device": str(predictor.device),
              "units": "attributions are shares of the target class's probability (softmax; the value for a "
                       "regression head) between the text and the text with every word masked",
              "seconds": time.perf_counter() - t0, "versions": versions}
    out = write_report(results, args.out, header)
    info(f"explain: {len(results)} texts in {header['seconds']:.1f} s; {out / 'explanations.html'}")
    print(out)
    return 0

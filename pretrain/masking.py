"""Example layout and masking: one raw example in, one masked sequence out.

Every random choice for sample `index` comes from `example_rng(seed, index)`, so the masked
sequence is a pure function of (seed, index, example, config): any batch of any rank can be
rebuilt exactly, whatever the number of ranks or the resume point.

Steps for one example (`mask_example`):
1. layout: `[CLS] x [SEP]`, or for ALBERT SOP `[CLS] A [SEP] B [SEP]` with A and B consecutive
   text cut at a sentence boundary and swapped with probability `sop_swap_prob` (label 1);
2. choose the predicted tokens: exactly `mask_rate` of the real tokens in expectation (stochastic
   rounding of rate x tokens), in units of tokens, whole words, ALBERT n-grams or SpanBERT spans;
   units never cross the A/B boundary;
3. replace them by the 80/10/10 rule ([MASK] / random non-special token / unchanged).

Positions below are "real" indices (into the example's tokens without specials) until
`_layout_positions` maps them to sequence positions (with [CLS] and [SEP]).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from kompakt.errors import KompaktError
from kompakt.objective_config import ObjectiveConfig

# Re-exported: the masking code's input and the generator of each example.
from kompakt.packed import Example, example_rng  # noqa: F401
from kompakt.tokenizer import SPECIAL_TOKENS, SpecialIds  # noqa: F401


@dataclass
class MaskedExample:
    """One masked sequence with specials; positions are indices into `input_ids`."""

    input_ids: np.ndarray       # (L,) int64, masking applied
    token_type_ids: np.ndarray  # (L,) int64, 0 for [CLS] A [SEP], 1 for B [SEP]
    mlm_positions: np.ndarray   # (m,) int64, sorted
    mlm_labels: np.ndarray      # (m,) int64, original ids
    spans: np.ndarray           # (s, 2) int64 [start, end) of each masked unit (token/word/n-gram/span)
    sop_label: int = -1         # 0 in order, 1 swapped, -1 without SOP
    sbo_left: np.ndarray | None = None   # (m,) position just left of the masked token's span
    sbo_right: np.ndarray | None = None  # (m,) position just right of it
    sbo_rel: np.ndarray | None = None    # (m,) 0-based offset of the token inside its span
    span_truncated: np.ndarray | None = None  # (s,) bool: span shortened to fit the mask budget


def num_to_mask(num_tokens: int, rate: float, rng: np.random.Generator) -> int:
    """rate x num_tokens, rounded stochastically so the expected count is exactly rate x num_tokens.

    Plain rounding would mask 0 of 3 tokens at 15% and bias short examples low.
    """
    target = rate * num_tokens
    whole = int(target)
    return whole + int(rng.random() < target - whole)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def _sop_split(ex: Example, rng: np.random.Generator) -> int:
    """Where A ends: a sentence boundary if the example has several sentences, else a word start."""
    n = len(ex.tokens)
    assert n >= 2, "SOP needs two real tokens per example"
    if len(ex.sent_starts):
        return int(rng.choice(ex.sent_starts))
    words = np.flatnonzero(ex.word_starts[1:]) + 1
    return int(rng.choice(words)) if len(words) else int(rng.integers(1, n))


# ---------------------------------------------------------------------------------------------
# Choosing predicted positions. Units are whole words (or tokens) as [start, end) real indices.
# ---------------------------------------------------------------------------------------------


def _units(word_starts: np.ndarray, seg_starts: list[int], n: int, whole_words: bool) -> np.ndarray:
    """(u + 1,) unit boundaries; a unit never straddles a segment start or the example start."""
    if not whole_words:
        return np.arange(n + 1, dtype=np.int64)
    starts = np.asarray(word_starts, dtype=bool).copy()
    starts[0] = True
    starts[seg_starts] = True
    return np.append(np.flatnonzero(starts), n).astype(np.int64)


def _pick_units(bounds: np.ndarray, budget: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Whole-word (or token) masking: units in random order, skipping any that would overshoot."""
    lengths = np.diff(bounds)
    chosen, count = [], 0
    for u in rng.permutation(len(lengths)).tolist():
        if count == budget:
            break
        if count + lengths[u] <= budget:
            chosen.append((u, u + 1))
            count += int(lengths[u])
    return chosen


def _pick_ngrams(bounds: np.ndarray, seg_of_unit: np.ndarray, budget: int, max_n: int,
                 rng: np.random.Generator) -> list[tuple[int, int]]:
    """ALBERT n-gram masking: starts in random order, n ~ 1/n, skip overlaps, shorten to the budget."""
    num_units = len(bounds) - 1
    p = 1.0 / np.arange(1, max_n + 1)
    lengths = rng.choice(np.arange(1, max_n + 1), size=num_units, p=p / p.sum()).tolist()
    taken = bytearray(num_units)
    chosen, count = [], 0
    for k, u in enumerate(rng.permutation(num_units).tolist()):
        if count == budget:
            break
        n = lengths[k]
        # Stay inside the unit's segment and the example.
        while n > 1 and (u + n > num_units or seg_of_unit[u + n - 1] != seg_of_unit[u]):
            n -= 1
        while n > 0 and (any(taken[u:u + n]) or count + int(bounds[u + n] - bounds[u]) > budget):
            n -= 1
        if n == 0:
            continue
        taken[u:u + n] = b"\x01" * n
        chosen.append((u, u + n))
        count += int(bounds[u + n] - bounds[u])
    return chosen


def span_length_pmf(p: float, max_len: int) -> np.ndarray:
    """SpanBERT's span lengths 1..max_len: Geometric(p) truncated and renormalised (mean 3.8 at 0.2, 10)."""
    lengths = np.arange(1, max_len + 1)
    w = p * (1.0 - p) ** (lengths - 1)
    return w / w.sum()


@functools.lru_cache(maxsize=8)
def _span_pmf(p: float, max_len: int) -> np.ndarray:
    return span_length_pmf(p, max_len)


def _pick_spans(bounds: np.ndarray, seg_of_unit: np.ndarray, budget: int, pmf: np.ndarray,
                rng: np.random.Generator) -> tuple[list[tuple[int, int]], list[bool]]:
    """SpanBERT span masking: draw a length, place it uniformly among the free starts.

    A span keeps one unmasked unit between itself and any other span, so its boundary tokens
    (the SBO inputs) are never masked and spans never merge. The last span is shortened to fit
    the budget (flagged in the second list). Draws are capped so a dense tiny example ends.
    """
    num_units = len(bounds) - 1
    blocked = np.zeros(num_units + 2, dtype=np.int64)  # padded by one unit on either side
    chosen, truncated, count = [], [], 0
    # All length draws at once by inverting the cdf (rng.choice per draw costs ~15 µs each).
    num_draws = 4 * budget + 8
    draws = np.minimum(np.searchsorted(np.cumsum(pmf), rng.random(num_draws), side="right"), len(pmf) - 1) + 1
    for n in draws.tolist():
        if count >= budget:
            break
        if n > num_units:
            continue
        # Start u is free if units u-1 .. u+n are unblocked (indices shifted by the padding).
        c = np.concatenate(([0], np.cumsum(blocked)))
        window = c[np.arange(num_units - n + 1) + n + 2] - c[np.arange(num_units - n + 1)]
        same_seg = seg_of_unit[: num_units - n + 1] == seg_of_unit[n - 1:]
        free = np.flatnonzero((window == 0) & same_seg)
        if len(free) == 0:
            continue
        u = int(free[rng.integers(len(free))])
        end = u + n
        while end > u and count + int(bounds[end] - bounds[u]) > budget:
            end -= 1
        if end == u:
            continue
        blocked[u + 1:end + 1] = 1
        chosen.append((u, end))
        truncated.append(end - u < n)
        count += int(bounds[end] - bounds[u])
    return chosen, truncated


# ---------------------------------------------------------------------------------------------
# The example
# ---------------------------------------------------------------------------------------------


def mask_example(ex: Example, cfg: ObjectiveConfig, specials: SpecialIds, seed: int) -> MaskedExample:
    """Lay out and mask one example; deterministic in (seed, ex.index)."""
    if cfg.masking == "msp":
        raise KompaktError("pretrain.objective.masking=msp is collated by pretrain/lattice.py; "
                           "call collate_examples, not mask_example")
    rng = example_rng(seed, ex.index)
    tokens = np.asarray(ex.tokens, dtype=np.int64)
    word_starts = np.asarray(ex.word_starts)
    n = len(tokens)
    assert 0 < n <= cfg.max_seq_len - cfg.num_specials, "example longer than max_seq_len"

    # 1. Layout. `order` lists real indices in sequence order; seg_starts are real indices.
    sop_label, split = -1, n
    if cfg.sop:
        split = _sop_split(ex, rng)
        sop_label = int(rng.random() < cfg.sop_swap_prob)
    if sop_label == 1:  # B A: rotate so that "real index" runs in sequence order
        tokens = np.concatenate((tokens[split:], tokens[:split]))
        word_starts = np.concatenate((word_starts[split:], word_starts[:split]))
        split = n - split
    seg_starts = [0, split] if split < n else [0]

    # 2. Predicted units.
    budget = num_to_mask(n, cfg.mask_rate, rng)
    bounds = _units(word_starts, seg_starts, n, whole_words=cfg.masking != "token")
    seg_of_unit = (bounds[:-1] >= split).astype(np.int64)
    truncated: list[bool] = []
    if cfg.masking in ("token", "whole_word"):
        picked = _pick_units(bounds, budget, rng)
    elif cfg.masking == "ngram":
        picked = _pick_ngrams(bounds, seg_of_unit, budget, cfg.max_ngram, rng)
    else:
        picked, truncated = _pick_spans(bounds, seg_of_unit, budget, _span_pmf(cfg.span_p, cfg.max_span_words), rng)
    if not truncated:
        truncated = [False] * len(picked)
    ordered = sorted(zip(picked, truncated))
    picked = [p for p, _ in ordered]
    truncated = [t for _, t in ordered]
    real_spans = np.array([(bounds[a], bounds[b]) for a, b in picked], dtype=np.int64).reshape(-1, 2)

    # Sequence positions: [CLS] takes 0, the middle [SEP] shifts segment B by one more.
    seq = np.arange(n, dtype=np.int64) + 1 + (np.arange(n) >= split)
    sep_mid = [specials.sep] if split < n else []
    input_ids = np.concatenate(([specials.cls], tokens[:split], sep_mid, tokens[split:], [specials.sep]))
    input_ids = input_ids.astype(np.int64)
    token_type_ids = np.zeros(len(input_ids), dtype=np.int64)
    if split < n:
        token_type_ids[split + 2:] = 1
    spans = np.stack((seq[real_spans[:, 0]], seq[real_spans[:, 1] - 1] + 1), axis=1) if len(picked) \
        else np.zeros((0, 2), dtype=np.int64)
    lengths = spans[:, 1] - spans[:, 0]
    positions = np.concatenate([np.arange(a, b) for a, b in spans]) if len(picked) else np.zeros(0, np.int64)
    labels = input_ids[positions].copy()

    # 3. 80/10/10 per predicted token.
    u = rng.random(len(positions))
    to_mask = u < cfg.mask_token_prob
    to_random = (u >= cfg.mask_token_prob) & (u < cfg.mask_token_prob + cfg.random_token_prob)
    input_ids[positions[to_mask]] = specials.mask
    input_ids[positions[to_random]] = rng.choice(specials.replacement_ids, size=int(to_random.sum()))

    out = MaskedExample(input_ids=input_ids, token_type_ids=token_type_ids, mlm_positions=positions,
                        mlm_labels=labels, spans=spans, sop_label=sop_label)
    if cfg.masking == "span":
        out.sbo_left = np.repeat(spans[:, 0] - 1, lengths)
        out.sbo_right = np.repeat(spans[:, 1], lengths)
        out.sbo_rel = positions - np.repeat(spans[:, 0], lengths)
        out.span_truncated = np.asarray(truncated, dtype=bool)
    return out


# ---------------------------------------------------------------------------------------------
# Start-of-training log
# ---------------------------------------------------------------------------------------------


def describe_sample(example, tokenizer) -> str:
    """One decoded, masked sequence as text: predicted tokens read `[shown→original]`.

    `example` is a `MaskedExample` or a packed batch dict (its first sequence is shown);
    `tokenizer` is a `tokenizers.Tokenizer` or a Hugging Face tokenizer. A [MASK]ed token shows as
    `[[MASK]→ord]`, a random replacement as `[xyz→ord]`, a kept one as `[ord→ord]`.
    """
    if isinstance(example, MaskedExample):
        ids, positions, labels = example.input_ids, example.mlm_positions, example.mlm_labels
        types, sop = example.token_type_ids, example.sop_label
    else:
        end = int(np.asarray(example["cu_seqlens"])[1])
        ids = np.asarray(example["input_ids"])[:end]
        keep = np.asarray(example["mlm_positions"]) < end
        positions = np.asarray(example["mlm_positions"])[keep]
        labels = np.asarray(example["mlm_labels"])[keep]
        types = np.asarray(example["token_type_ids"])[:end] if "token_type_ids" in example else np.zeros_like(ids)
        sop = int(np.asarray(example["sop_labels"])[0]) if "sop_labels" in example else -1
    to_token = getattr(tokenizer, "id_to_token", None) or tokenizer.convert_ids_to_tokens
    words = [str(to_token(int(i))) for i in ids]
    for p, label in zip(np.asarray(positions).tolist(), np.asarray(labels).tolist()):
        words[p] = f"[{words[p]}→{to_token(int(label))}]"
    head = f"{len(ids)} tokens, {len(positions)} predicted ({len(positions) / max(1, len(ids)):.0%})"
    if sop >= 0:
        head += f", segment B starts at {int(np.argmax(np.asarray(types)))}, sop_label={sop}"
    return head + "\n" + " ".join(words)

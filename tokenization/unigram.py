"""Deterministic scores for a trained Unigram vocabulary: a few EM steps in a fixed order.

`tokenizers`' UnigramTrainer sums each piece's expected count over the training words in hash-map
order, and that order comes from a per-process random seed, so two trainings on the same corpus
give log-probabilities that differ by about 4e-11 (the demo corpus, 2,048 pieces) and pieces of
(nearly) equal score in a different order; the characters it adds at the end get scores of
min_score + k * 1e-4 with k in hash order too (differences up to 0.002). The pieces it keeps were
the same in all 8 trials on the demo corpus; only the scores moved. Rounding them cannot fix that:
with 32k pieces and noise of 1e-10, a rounding grid of 1e-6 puts several pieces on the other side
of a grid line in every training. So the scores are estimated again here from the word counts, in
sorted-word order, with numpy's sequential sums:

1. count the pre-tokenised words of the training texts (the trainer's own normaliser and
   pre-tokenizer, so the words are the trainer's words);
2. start from the trainer's scores rounded to 0.1 nats, far coarser than the noise (the chance that
   noise of 1e-10 moves one of 32k scores across a 0.1 grid line is about 6e-5), so the start is
   the same in every run while already close to the answer;
3. run `NUM_EM_STEPS` steps of the trainer's own EM (forward-backward over each word's lattice,
   then the Bayesian M-step `digamma(count) - digamma(total)`) on the fixed vocabulary;
4. round to 1e-6 nats and order the pieces by (score desc, piece). In one process and on one
   machine the result is exact anyway; the rounding is for machines whose numpy picks other SIMD
   code for exp and log: a last-bit difference (about 1e-14 nats after the EM steps) crosses a
   1e-6 grid line with a chance of about 2e-8 a piece, 6e-4 for 32k pieces, where keeping every
   digit would change the bytes every time.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Callable, Iterable

import numpy as np
from tokenizers import Tokenizer

# EM steps on the final vocabulary; the trainer itself runs 2 per pruning round. On the demo corpus
# (1,500 documents, 2,048 pieces), from a start rounded to 0.1 nats, 4 steps leave the median score
# 1e-5 nats (the largest 0.03) from where 32 steps end; held-out words are segmented as with the
# trainer's own scores 99.2% of the time, into 0.1% more tokens.
NUM_EM_STEPS = 4
# Rounding of the start (nats): much coarser than the trainer's noise, see the module docstring.
START_GRID = 0.1
# Distinct words the EM steps run over, most frequent first. The demo corpus's 96k words give 19
# lattice edges a word and peak at 1.8 kB a word, so 1M words need about 2 GB and half a minute to
# build; a piece seen only in rarer words gets the lowest score (see MIN_EXPECTED).
MAX_WORDS = 1_000_000
# Decimals kept in the final scores.
SCORE_DECIMALS = 6
# A piece's expected count is floored at the trainer's own pruning threshold (0.5 occurrences)
# before the digamma, so a piece the final vocabulary never uses keeps a finite, lowest score.
MIN_EXPECTED = 0.5


def _digamma(x: np.ndarray) -> np.ndarray:
    """The digamma function, the same recurrence and series as `tokenizers`' Unigram trainer."""
    x = np.asarray(x, dtype=np.float64).copy()
    result = np.zeros_like(x)
    small = x < 7.0
    while small.any():
        result[small] -= 1.0 / x[small]
        x[small] += 1.0
        small = x < 7.0
    x -= 0.5
    xx = 1.0 / x
    xx2 = xx * xx
    xx4 = xx2 * xx2
    return result + np.log(x) + xx2 / 24.0 - 7.0 / 960.0 * xx4 + 31.0 / 8064.0 * xx4 * xx2 - 127.0 / 30720.0 * xx4 * xx4


def word_counts(tok: Tokenizer, batches: Iterable[list[str]]) -> Counter:
    """Counts of the pre-tokenised words of the texts, as the trainer sees them."""
    counts: Counter = Counter()
    norm, pre = tok.normalizer, tok.pre_tokenizer
    for texts in batches:
        for text in texts:
            text = norm.normalize_str(text) if norm is not None else text
            counts.update(w for w, _ in pre.pre_tokenize_str(text))
    return counts


class _Lattices:
    """Every training word's lattice over a fixed vocabulary, as flat edge arrays.

    Word w has nodes base[w] .. base[w] + len(w); an edge from node a to node b is the piece w[a:b].
    Edges are kept in two orders: by end position (forward pass) and by start position (backward).
    """

    def __init__(self, words: list[str], counts: np.ndarray, vocab: dict[str, int], max_piece_chars: int):
        # array('q'), not lists: 8 bytes a value instead of about 36 (1M words give about 19M edges).
        src, dst, pid = array("q"), array("q"), array("q")
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.base = np.cumsum(lengths + 1) - (lengths + 1)
        for word, base in zip(words, self.base.tolist()):
            n = len(word)
            for a in range(n):
                for b in range(a + 1, min(n, a + max_piece_chars) + 1):
                    i = vocab.get(word[a:b])
                    if i is not None:
                        src.append(base + a)
                        dst.append(base + b)
                        pid.append(i)
        self.num_nodes = int((lengths + 1).sum())
        self.end = self.base + lengths
        self.counts = counts
        self.src, self.dst, self.pid = (np.frombuffer(x, dtype=np.int64) for x in (src, dst, pid))
        self.wid = np.searchsorted(self.base, self.src, side="right") - 1
        pos_start = self.src - self.base[self.wid]
        pos_end = self.dst - self.base[self.wid]
        # Stable sorts: a fixed order of summation in every run.
        self.fwd = self._groups(np.lexsort((self.dst, pos_end)), pos_end, self.dst)
        self.bwd = self._groups(np.lexsort((self.src, pos_start))[::-1].copy(), pos_start, self.src)

    @staticmethod
    def _groups(order: np.ndarray, pos: np.ndarray, node: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per position, in order: (edge indices sorted by node, segment starts, the segments' nodes)."""
        groups = []
        pos_sorted = pos[order]
        cuts = np.flatnonzero(np.diff(pos_sorted)) + 1
        for edges in np.split(order, cuts):
            if len(edges) == 0:
                continue
            nodes = node[edges]
            if len(nodes) > 1 and nodes[0] > nodes[-1]:
                edges, nodes = edges[::-1], nodes[::-1]
            starts = np.concatenate([[0], np.flatnonzero(np.diff(nodes)) + 1])
            groups.append((edges, starts, nodes[starts]))
        return groups

    @staticmethod
    def _logsumexp_into(out: np.ndarray, vals: np.ndarray, starts: np.ndarray, nodes: np.ndarray) -> None:
        m = np.maximum.reduceat(vals, starts)
        out[nodes] = m + np.log(np.add.reduceat(np.exp(vals - np.repeat(m, np.diff(np.append(starts, len(vals))))), starts))

    def expected_counts(self, scores: np.ndarray) -> np.ndarray:
        """Expected occurrences of every piece over the words (counts included): one E-step."""
        edge_score = scores[self.pid]
        alpha = np.full(self.num_nodes, -np.inf)
        alpha[self.base] = 0.0
        for edges, starts, nodes in self.fwd:
            self._logsumexp_into(alpha, alpha[self.src[edges]] + edge_score[edges], starts, nodes)
        beta = np.full(self.num_nodes, -np.inf)
        beta[self.end] = 0.0
        for edges, starts, nodes in self.bwd:
            self._logsumexp_into(beta, beta[self.dst[edges]] + edge_score[edges], starts, nodes)
        log_z = alpha[self.end]
        assert np.isfinite(log_z).all(), "a training word has a character outside the vocabulary"
        post = np.exp(alpha[self.src] + edge_score + beta[self.dst] - log_z[self.wid]) * self.counts[self.wid]
        return np.bincount(self.pid, weights=post, minlength=len(scores))


def rescore(pieces: list[tuple[str, float]], counts: Counter, max_piece_chars: int) -> list[tuple[str, float]]:
    """Scores of a fixed set of pieces re-estimated by EM in a fixed order; sorted (score desc, piece)."""
    pieces = sorted(pieces)
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    # The most frequent words, ties by spelling; sorted so the sums run in the same order everywhere.
    words = sorted(sorted(counts, key=lambda w: (-counts[w], w))[:MAX_WORDS])
    lat = _Lattices(words, np.asarray([counts[w] for w in words], dtype=np.float64), vocab, max_piece_chars)
    scores = np.round(np.asarray([s for _, s in pieces], dtype=np.float64) / START_GRID) * START_GRID
    for _ in range(NUM_EM_STEPS):
        expected = lat.expected_counts(scores)
        scores = _digamma(np.maximum(expected, MIN_EXPECTED)) - _digamma(np.asarray(expected.sum()))
    scores = np.round(scores, SCORE_DECIMALS)
    ranked = sorted(zip((p for p, _ in pieces), scores.tolist()), key=lambda ps: (-ps[1], ps[0]))
    return [(p, float(s)) for p, s in ranked]


def canonical_unigram(tok: Tokenizer, num_specials: int, texts: Callable[[], Iterable[list[str]]],
                      max_piece_chars: int) -> Tokenizer:
    """The trained Unigram tokenizer with deterministic scores and piece order (specials kept first)."""
    import json

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    specials, pieces = vocab[:num_specials], [(p, s) for p, s in vocab[num_specials:]]
    assert all(s == 0.0 for _, s in specials), "special tokens are not first in the Unigram vocabulary"
    data["model"]["vocab"] = [list(x) for x in specials] + [list(x) for x in
                                                           rescore(pieces, word_counts(tok, texts()), max_piece_chars)]
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))

"""Planted exact and near duplicates among real demo documents are found; distinct ones survive."""

import random

import numpy as np

from kompakt.config import DedupConfig, load_recipe
from kompakt.data_prep.dedup import NearDedup, shingles, signatures, text_digest

NUM_PLANTED = 50


def _dedup(texts, cfg):
    sigs = signatures(texts, cfg)
    near, seen, removed = NearDedup(cfg), set(), set()
    for i, text in enumerate(texts):
        digest = text_digest(text)
        if digest in seen or near.seen(i, sigs[i]):
            removed.add(i)
        else:
            seen.add(digest)
    return removed


def test_planted_duplicates_recall_and_false_removals(demo_docs, repo):
    cfg = load_recipe(repo / "recipes" / "demo-nb.yaml").data.dedup
    rng = random.Random(0)
    base = demo_docs[:4000]
    base_removed = _dedup(base, cfg)
    distinct = [d for i, d in enumerate(base) if i not in base_removed]
    sources = rng.sample([d for d in distinct if len(d.split()) >= 40], 2 * NUM_PLANTED)
    exact = sources[:NUM_PLANTED]
    near = []
    for doc in sources[NUM_PLANTED:]:  # a few words changed: two of 40 or more
        w = doc.split()
        for pos in rng.sample(range(len(w)), 2):
            w[pos] = rng.choice(["hus", "bil", "katt", "sol", "vann"])
        near.append(" ".join(w))
    texts = distinct + exact + near
    removed = _dedup(texts, cfg)
    n = len(distinct)
    exact_recall = sum(i in removed for i in range(n, n + NUM_PLANTED)) / NUM_PLANTED
    near_recall = sum(i in removed for i in range(n + NUM_PLANTED, len(texts))) / NUM_PLANTED
    false_rate = sum(i in removed for i in range(n)) / n
    assert exact_recall == 1.0
    assert near_recall >= 0.9, near_recall
    assert false_rate <= 0.01, false_rate


def test_threshold_is_verified_not_just_lsh_collision():
    cfg = DedupConfig(jaccard_threshold=0.9, shingle_size=1, num_perm=128)
    a = "en to tre fire fem seks sju åtte ni ti elleve tolv"
    b = "en to tre fire fem seks sju åtte ni ti elleve hundre"  # Jaccard 11/13 = 0.85 < 0.9
    sigs = signatures([a, b, a], cfg)
    near = NearDedup(cfg)
    assert not near.seen(0, sigs[0]) and not near.seen(1, sigs[1]) and near.seen(2, sigs[2])


def test_signatures_are_deterministic_and_shingles_ignore_case_and_punctuation():
    cfg = DedupConfig()
    s1 = signatures(["Hei, du! Dette er en test av noe."], cfg)
    s2 = signatures(["hei du dette er en test av noe"], cfg)
    assert s1.dtype == np.uint32 and np.array_equal(s1, s2)
    assert shingles("a b", 5) == [b"a b"]
    assert len(shingles("a b c d e f", 5)) == 2

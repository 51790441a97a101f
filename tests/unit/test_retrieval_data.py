"""Retrieval tasks: the shipped demo-nb-retrieval suite loads held-out, leak-free data; a local
MTEB/BEIR folder loads into the documented example form; every bad input and every contradictory
retrieval option stops with one line that names the file or the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kompakt.errors import ConfigError, DataError
from kompakt.eval.suite import SUITES_DIR, load_suite
from kompakt.finetune.tasks import RetrievalOptions, Task, load_task, suite_files, validate_suite

DATA = SUITES_DIR / "data" / "demo-nb"
TASKS = ("ordb-infonce", "ordb-hard", "ordb-quadruplet", "ordb-le")


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# The shipped suite
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    suite = load_suite("demo-nb-retrieval")
    return suite, load_task(suite.tasks[0], suite.folder)


def test_the_shipped_suite_has_four_recipes_over_the_same_files(demo):
    suite, _ = demo
    assert [t.name for t in suite.tasks] == list(TASKS)
    assert len({t.source for t in suite.tasks}) == 1 and len({t.train for t in suite.tasks}) == 1
    opts = {t.name: t.retrieval for t in suite.tasks}
    assert opts["ordb-infonce"] == RetrievalOptions()
    assert (opts["ordb-hard"].hard_negatives, opts["ordb-hard"].num_hard_negatives) == ("bm25", 1)
    assert (opts["ordb-quadruplet"].loss, opts["ordb-quadruplet"].hard_negatives) == ("quadruplet", "bm25")
    assert (opts["ordb-le"].hard_negatives, opts["ordb-le"].label_enhancement) == ("bm25", 0.3)
    for t in suite.tasks:
        assert (t.type, t.metric, t.all_metrics[1:]) == ("retrieval", "recall_at_10",
                                                         ["recall_at_1", "recall_at_100", "mrr_at_10", "ndcg_at_10"])
        assert (t.train.lr, t.train.batch_size, t.train.epochs, t.train.max_seq_len, t.train.patience) == \
            (1e-4, 32, 2, 64, 1)


def test_the_demo_task_loads_with_every_answer_in_the_corpus(demo):
    _, data = demo
    counts = data.counts()
    assert all(n > 0 for n in counts.values()) and counts["train"] > 5 * counts["test"], counts
    assert sum(counts.values()) == 2500 and len(data.corpus) == 3000
    assert data.labels == [] and data.label2id == {} and data.notes == []
    for split, examples in data.splits.items():
        for ex in examples:
            assert set(ex) == {"query_id", "query", "relevant"} and len(ex["query"].split()) >= 3
            assert ex["relevant"] and set(ex["relevant"]) <= set(data.corpus), (split, ex)
    # Only articles that the demo pretraining corpus cannot hold (scripts/build_demo_suites.py).
    assert min(int(d) for d in data.corpus) >= 45000


def test_no_query_and_no_headword_is_in_two_splits(demo):
    _, data = demo
    titles = {json.loads(line)["_id"]: json.loads(line)["title"].lower()
              for line in (DATA / "retrieval-corpus.jsonl").read_text(encoding="utf-8").splitlines()}
    qids = {s: {ex["query_id"] for ex in data.splits[s]} for s in data.splits}
    heads = {s: {titles[d] for ex in data.splits[s] for d in ex["relevant"]} for s in data.splits}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not qids[a] & qids[b], (a, b)
        assert not heads[a] & heads[b], (a, b, sorted(heads[a] & heads[b])[:5])


def test_suite_files_cover_corpus_and_queries_and_stay_small():
    files = {p.name for p in suite_files(load_suite("demo-nb-retrieval"))}
    assert files == {"demo-nb-retrieval.yaml", "retrieval-corpus.jsonl", "retrieval-queries.jsonl",
                     "retrieval-train.tsv", "retrieval-dev.tsv", "retrieval-test.tsv"}
    assert sum(p.stat().st_size for p in DATA.glob("retrieval-*")) < 2_000_000


# ---------------------------------------------------------------------------------------------
# A small MTEB folder
# ---------------------------------------------------------------------------------------------

CORPUS = [{"_id": "d1", "title": "sol", "text": "stjerna som jorda går rundt"},
          {"_id": 2, "title": "", "text": "nedbør som vann"},
          {"_id": "d3", "text": "frosset nedbør"},
          {"_id": "d4", "title": "vind", "text": "luft i bevegelse"}]
QUERIES = [{"_id": "q1", "text": "sola skinner"}, {"_id": 2, "text": "det regner"},
           {"_id": "q3", "text": "snøen laver ned"}, {"_id": "q4", "text": "det blåser"},
           {"_id": "q5", "text": "ingen svar"}]
TRAIN = [("q1", "d1", 1), ("q4", "d4", 1), ("q4", "d1", 0), ("q5", "d1", 0)]
TEST = [("q3", "d3", 2), ("2", "2", 1), ("q3", "2", 1)]


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _qrels(rows, suffix: str) -> str:
    if suffix == "tsv":
        return "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows)
    return _jsonl({"query-id": q, "corpus-id": d, "score": s} for q, d, s in rows)


def _mteb(tmp_path: Path, suffix: str = "tsv", corpus=None, queries=None, train=None, test=None, dev=None,
          **files: str | bytes) -> dict:
    """Write a tiny MTEB folder; `files` overrides any file's content by name (bytes or text)."""
    content = {"corpus.jsonl": _jsonl(CORPUS if corpus is None else corpus),
               "queries.jsonl": _jsonl(QUERIES if queries is None else queries),
               f"train.{suffix}": _qrels(TRAIN if train is None else train, suffix),
               f"test.{suffix}": _qrels(TEST if test is None else test, suffix)}
    if dev is not None:
        content[f"dev.{suffix}"] = _qrels(dev, suffix)
    content.update({k.replace("_", "."): v for k, v in files.items()})
    for name, data in content.items():
        (tmp_path / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    src = {"format": "mteb", "corpus": "corpus.jsonl", "queries": "queries.jsonl", "train": f"train.{suffix}",
           "test": f"test.{suffix}"}
    if dev is not None:
        src["dev"] = f"dev.{suffix}"
    return src


def _task(source: dict, **kw) -> Task:
    return Task.model_validate({"name": "r", "type": "retrieval", "metric": "recall_at_10", "source": source, **kw})


@pytest.mark.parametrize("suffix", ["tsv", "jsonl"])
def test_a_local_mteb_folder_loads_into_the_documented_form(tmp_path, suffix):
    dev = [("q1", "d1", 1)]
    data = load_task(_task(_mteb(tmp_path, suffix, train=TRAIN[1:], dev=dev)), tmp_path)
    assert data.corpus == {"d1": "sol. stjerna som jorda går rundt", "2": "nedbør som vann",
                           "d3": "frosset nedbør", "d4": "vind. luft i bevegelse"}
    assert data.splits["dev"] == [{"query_id": "q1", "query": "sola skinner", "relevant": {"d1": 1.0}}]
    # The score-0 judgement of q4 is dropped; q5 has only score 0 and is left out, with a note.
    assert data.splits["train"] == [{"query_id": "q4", "query": "det blåser", "relevant": {"d4": 1.0}}]
    # First-appearance order, graded scores kept, integer ids as strings.
    assert data.splits["test"] == [{"query_id": "q3", "query": "snøen laver ned", "relevant": {"d3": 2.0, "2": 1.0}},
                                   {"query_id": "2", "query": "det regner", "relevant": {"2": 1.0}}]
    assert data.labels == [] and data.origins["test"].endswith(f"test.{suffix}")
    assert data.notes == ["train: 1 of 2 judged queries have no judgement with score > 0 and were left out"]


def test_a_missing_dev_split_is_carved_from_train(tmp_path):
    train = [(f"q{i}", "d1", 1) for i in range(20)]
    queries = [{"_id": f"q{i}", "text": f"spørsmål {i}"} for i in range(30)]
    test = [("q25", "d3", 1)]
    data = load_task(_task(_mteb(tmp_path, queries=queries, train=train, test=test)), tmp_path)
    assert data.counts() == {"train": 18, "dev": 2, "test": 1}
    assert not {e["query_id"] for e in data.splits["train"]} & {e["query_id"] for e in data.splits["dev"]}
    assert "no dev split: 2 of 20 train queries carved off as dev" in data.notes[0]


QRELS_HEADER = "query-id\tcorpus-id\tscore\n"

# (case, files written over the good folder, the file the message names, what it says)
BAD = [
    ("missing corpus", {"corpus": None}, "corpus.jsonl", r"the corpus file .* does not exist; put the file there"),
    ("missing queries", {"queries": None}, "queries.jsonl", r"the queries file .* does not exist"),
    ("missing qrels", {"test_tsv": None}, "test.tsv", r"the test file .* does not exist; .*fix source\.test"),
    ("corpus row without _id", {"corpus_jsonl": _jsonl([{"text": "x"}])}, "corpus.jsonl line 1",
     r"has no '_id'"),
    ("corpus row without text", {"corpus_jsonl": _jsonl([{"_id": "d1", "title": "x"}])}, "corpus.jsonl line 1",
     r"has no 'text'"),
    ("queries row without text", {"queries_jsonl": _jsonl([{"_id": "q1"}])}, "queries.jsonl line 1",
     r"has no 'text'"),
    ("duplicate doc id", {"corpus_jsonl": _jsonl([*CORPUS, {"_id": "d1", "text": "igjen"}])}, "corpus.jsonl line 5",
     r"document id 'd1' occurs twice \(first on line 1\)"),
    ("duplicate query id", {"queries_jsonl": _jsonl([*QUERIES, {"_id": "2", "text": "igjen"}])},
     "queries.jsonl line 6", r"query id '2' occurs twice \(first on line 2\)"),
    ("empty document", {"corpus_jsonl": _jsonl([*CORPUS, {"_id": "d9", "text": "  "}])}, "corpus.jsonl line 5",
     r"document 'd9' has an empty text"),
    ("unknown query id", {"test_tsv": QRELS_HEADER + "q3\td3\t1\nq8\td3\t1\nq9\td1\t1\n"}, "test.tsv line 3",
     r"query id 'q8' is not in .*queries\.jsonl \(2 unknown query id\(s\) in test\.tsv: 'q8', 'q9'\)"),
    ("unknown doc id", {"train_tsv": QRELS_HEADER + "q1\td7\t1\n"}, "train.tsv line 2",
     r"document id 'd7' is not in .*corpus\.jsonl"),
    ("non-numeric score", {"train_tsv": QRELS_HEADER + "q1\td1\tyes\n"}, "train.tsv line 2",
     r"score 'yes' is not a number"),
    ("no BEIR header", {"train_tsv": "q1\td1\t1\n"}, "train.tsv line 1", r"is not the BEIR header"),
    ("query in two splits", {"test_tsv": QRELS_HEADER + "q3\td3\t1\nq1\td1\t1\n"}, "test.tsv line 3",
     r"query 'q1' is also judged in the train split .*leaks held-out data"),
    ("empty split", {"test_tsv": QRELS_HEADER + "q3\td3\t0\n"}, "test.tsv",
     r"the test split \(.*\) has no query with a judgement of score > 0"),
    ("empty file", {"test_tsv": "\n"}, "test.tsv", r"is empty"),
    ("binary corpus", {"corpus_jsonl": b"PAR1\x00\x00\x15\x04"}, "corpus.jsonl", r"is a binary file"),
    ("non-UTF-8 queries", {"queries_jsonl": '{"_id": "q1", "text": "bl\xe5"}\n'.encode("latin-1")},
     "queries.jsonl", r"is not valid UTF-8 \(byte 25, line 1\)"),
    ("qrels suffix", {"test_txt": "x"}, "test.txt", r"read by suffix, \.tsv \(BEIR\) or \.jsonl"),
]


@pytest.mark.parametrize("case,files,names,says", BAD, ids=[b[0] for b in BAD])
def test_bad_retrieval_data_stops_with_one_line_naming_the_file(tmp_path, case, files, names, says):
    src = _mteb(tmp_path, **{k: v for k, v in files.items() if v is not None and k not in ("corpus", "queries")})
    for key, value in files.items():
        if value is None:
            (tmp_path / (src.get(key) or key.replace("_", "."))).unlink()
    if "test_txt" in files:
        src["test"] = "test.txt"
    with pytest.raises(DataError, match=says) as e:
        load_task(_task(src), tmp_path)
    msg = _one_line(e)
    assert msg.startswith("task r: ") and names in msg, msg


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

SRC = {"format": "mteb", "corpus": "c.jsonl", "queries": "q.jsonl", "train": "tr.tsv", "test": "te.tsv"}


def _suite(**task) -> dict:
    base = {"name": "r", "type": "retrieval", "metric": "recall_at_10", "source": SRC}
    return {"name": "s", "description": "d", "tasks": [{**base, **task}]}


@pytest.mark.parametrize("task,says", [
    ({"type": "classification", "metric": "accuracy", "source": {"format": "jsonl", "train": "a", "test": "b"},
      "retrieval": {"loss": "infonce"}},
     r"tasks\.0 \(task r\): retrieval options are for a retrieval task, not a classification task; remove retrieval"),
    ({"retrieval": {"loss": "quadruplet"}},
     r"tasks\.0\.retrieval \(task r\): loss quadruplet .* needs hard negatives; set hard_negatives: bm25"),
    ({"retrieval": {"loss": "quadruplet", "hard_negatives": "bm25", "label_enhancement": 0.3}},
     r"tasks\.0\.retrieval \(task r\): label_enhancement softens the InfoNCE target; .*set loss: infonce"),
    ({"source": {"format": "jsonl", "train": "a", "test": "b"}},
     r"a retrieval task reads format mteb .*not jsonl; set source\.format: mteb"),
    ({"type": "classification", "metric": "accuracy"},
     r"format mteb holds retrieval data .*; use it with type retrieval"),
    ({"source": {**SRC, "queries": None}}, r"tasks\.0\.source \(task r\): format mteb needs queries"),
    ({"source": {"format": "jsonl", "train": "a", "test": "b", "corpus": "c.jsonl"}, "type": "classification",
      "metric": "accuracy"}, r"source\.corpus is only read with format mteb"),
    ({"metric": "accuracy"}, r"metric accuracy is not valid for a retrieval task; use one of recall_at_1, "
                             r"recall_at_10, recall_at_100, mrr_at_10, ndcg_at_10"),
    ({"columns": {"text": "query"}}, r"columns\.text is not a role of a retrieval task; .*remove columns"),
    ({"labels": ["a"]}, r"a retrieval task has no label set; remove labels"),
    ({"retrieval": {"top_k": 0}}, r"tasks\.0\.retrieval\.top_k \(task r\): Input should be greater than or equal to 1"),
    ({"retrieval": {"hard_negative": "bm25"}}, r"unknown key tasks\.0\.retrieval\.hard_negative .*did you mean "
                                               r"tasks\.0\.retrieval\.hard_negatives\?"),
])
def test_schema_mistakes_fail_at_suite_validation(task, says):
    raw = _suite(**task)
    if raw["tasks"][0]["source"].get("queries", "") is None:
        del raw["tasks"][0]["source"]["queries"]
    with pytest.raises(ConfigError, match=says) as e:
        validate_suite(raw, "s.yaml")
    assert _one_line(e).startswith("s.yaml: ")


def test_retrieval_options_default_when_left_out():
    task = validate_suite(_suite(), "s.yaml").tasks[0]
    assert task.retrieval == RetrievalOptions()
    o = task.retrieval
    assert (o.pooling, o.normalize, o.loss, o.temperature, o.hard_negatives, o.num_hard_negatives, o.mine_depth,
            o.margin, o.margin_easy, o.label_enhancement, o.le_alpha, o.le_temperature, o.max_doc_len, o.index,
            o.top_k) == ("mean", True, "infonce", 0.05, "none", 1, 30, 0.2, 0.1, 0.0, 0.5, 0.1, 256, "auto", 100)
    other = validate_suite({"name": "s", "tasks": [{"name": "c", "type": "classification", "metric": "accuracy",
                                                    "source": {"format": "jsonl", "train": "a", "test": "b"}}]})
    assert other.tasks[0].retrieval is None

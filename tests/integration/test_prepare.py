"""`kompakt prepare` end to end through the real CLI: formats, determinism, bad input, skip on re-run."""

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kompakt.cli import main
from kompakt.runs import is_complete

NUM_DOCS = 1500  # two worker chunks, so num_proc=2 really splits the work


def _prepare(repo, run_dir, *overrides):
    return main(["prepare", str(repo / "recipes" / "demo-nb.yaml"), f"run_dir={run_dir}", *overrides])


def _stage(run_dir, prefix="prepare-"):
    dirs = [d for d in run_dir.iterdir() if d.name.startswith(prefix)]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _corpus_bytes(stage_dir):
    return {p.name: p.read_bytes() for p in sorted((stage_dir / "corpus").glob("*.parquet"))}


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, demo_docs):
    """Demo documents with planted duplicates, spread over a .txt.gz, a .jsonl and a .parquet file."""
    rng = random.Random(1)
    docs = demo_docs[:NUM_DOCS]
    near = []
    for doc in rng.sample([d for d in docs if len(d.split()) >= 40], 10):  # one word changed
        w = doc.split()
        w[rng.randrange(len(w))] = "hus"
        near.append(" ".join(w))
    docs = docs + rng.sample(docs, 20) + near
    rng.shuffle(docs)
    d = tmp_path_factory.mktemp("inputs")
    third = len(docs) // 3
    (d / "a.txt.gz").write_bytes(gzip.compress("\n\n".join(docs[:third]).encode()))
    (d / "b.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs[third : 2 * third]),
        encoding="utf-8",
    )
    pq.write_table(pa.table({"text": docs[2 * third :]}), d / "c.parquet")
    return d


def test_output_independent_of_num_proc_and_num_shards(repo, tmp_path, mixed_inputs):
    inputs = f"data.inputs=[{mixed_inputs}/a.txt.gz,{mixed_inputs}/b.jsonl,{mixed_inputs}/c.parquet]"
    outputs = {}
    for num_proc, num_shards in ((1, 1), (2, 1), (1, 2)):
        run_dir = tmp_path / f"p{num_proc}s{num_shards}"
        assert (
            _prepare(
                repo,
                run_dir,
                inputs,
                f"data.num_proc={num_proc}",
                f"data.num_shards={num_shards}",
                "data.docs_per_shard=500",
            )
            == 0
        )
        stage = _stage(run_dir)
        assert is_complete(stage)
        assert len(list(run_dir.glob("prepare_part-*"))) == num_shards
        stats = json.loads((stage / "stats.json").read_text())
        outputs[(num_proc, num_shards)] = (_corpus_bytes(stage), stats)
    ref_bytes, ref_stats = outputs[(1, 1)]
    steps = {s["step"]: s for s in ref_stats["steps"]}
    assert ref_stats["documents_in"] == NUM_DOCS + 30
    assert steps["exact_dedup"]["documents_removed"] >= 20 and steps["near_dedup"]["documents_removed"] >= 8
    assert len(ref_bytes) == -(-ref_stats["documents_out"] // 500) >= 3
    for key, (corpus, stats) in outputs.items():
        # num_shards changes which files feed which part; the merge restores the recipe's file order.
        assert stats == ref_stats, key
        assert corpus == ref_bytes, key
    table = pq.read_table(pa.BufferReader(ref_bytes["part-00000.parquet"]))
    assert table.column_names[:4] == ["id", "text", "sentences", "lang"]
    row = table.slice(0, 1).to_pylist()[0]
    assert row["lang"] in ("nb", "nn") and row["sentences"] and row["id"].startswith(str(mixed_inputs))


def test_demo_recipe_keeps_most_documents_and_rerun_is_skipped(repo, tmp_path, demo_docs, capsys):
    corpus = tmp_path / "demo-slice.txt.gz"  # the demo recipe on a 2,000-document slice keeps this test fast
    corpus.write_bytes(gzip.compress("\n\n".join(demo_docs[:2000]).encode()))
    run_dir = tmp_path / "runs"
    assert _prepare(repo, run_dir, f"data.inputs=[{corpus}]") == 0
    stage = _stage(run_dir)
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["documents_in"] == 2000 and stats["documents_out"] >= 0.9 * 2000
    assert set(stats["languages"]) <= {"nb", "nn"} and stats["skipped_undecodable_lines"] == 0
    assert [s["step"] for s in stats["steps"]][-2:] == ["exact_dedup", "near_dedup"]
    manifest = (stage / "manifest.json").read_text()
    capsys.readouterr()
    assert _prepare(repo, run_dir, f"data.inputs=[{corpus}]") == 0
    assert "complete, skipped" in capsys.readouterr().err
    assert (stage / "manifest.json").read_text() == manifest


@pytest.mark.slow
def test_full_demo_corpus(repo, tmp_path):
    assert _prepare(repo, tmp_path) == 0
    stats = json.loads((_stage(tmp_path) / "stats.json").read_text())
    assert stats["documents_in"] > 18_000 and stats["documents_out"] >= 0.9 * stats["documents_in"]


def _bad_inputs(tmp_path):
    good = "Regjeringen har bestemt at skolene skal holde stengt resten av uken på grunn av uværet.\n"
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes(
        good.encode() + b"\nBl\xe5b\xe6rsyltet\xf8y er godt p\xe5 br\xf8d.\n"
    )
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "english.txt").write_text("The schools will stay closed for the rest of the week.\n\n" * 3)
    (tmp_path / "fields.jsonl").write_text(json.dumps({"tekst": good, "kilde": "nrk"}) + "\n")
    pq.write_table(pa.table({"body": [good]}), tmp_path / "cols.parquet")
    return {
        "bin.txt": "bin.txt: contains NUL bytes",
        "latin1.txt": "latin1.txt:3: invalid UTF-8",
        "empty.txt": "empty.txt: contains no documents",
        "english.txt": "all 3 documents were removed (language -3)",
        "fields.jsonl": "fields.jsonl:1: no field 'text' (fields seen: kilde, tekst)",
        "cols.parquet": "cols.parquet: no column 'text' (columns: body)",
        "missing.txt": "missing.txt does not exist",
    }


@pytest.mark.parametrize(
    "name",
    ["bin.txt", "latin1.txt", "empty.txt", "english.txt", "fields.jsonl", "cols.parquet", "missing.txt"],
)
def test_bad_input_is_one_error_line_and_no_complete_output(repo, tmp_path, capsys, name):
    expected = _bad_inputs(tmp_path)[name]
    run_dir = tmp_path / "runs"
    rc = _prepare(repo, run_dir, f"data.inputs=[{tmp_path / name}]", "data.num_proc=1")
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert expected in errors[0], errors[0]
    stages = list(run_dir.glob("prepare-*")) if run_dir.exists() else []
    assert not any(is_complete(d) for d in stages)
    if name != "english.txt":  # the file itself is bad: not even its part looks complete
        assert not run_dir.exists() or not any(is_complete(d) for d in run_dir.iterdir())
    assert not run_dir.exists() or not [d for d in run_dir.iterdir() if ".tmp-" in d.name]


def test_invalid_utf8_skip_is_counted(repo, tmp_path):
    _bad_inputs(tmp_path)
    assert (
        _prepare(
            repo,
            tmp_path / "runs",
            f"data.inputs=[{tmp_path / 'latin1.txt'}]",
            "data.num_proc=1",
            "data.on_decode_error=skip",
        )
        == 0
    )
    stats = json.loads((_stage(tmp_path / "runs") / "stats.json").read_text())
    assert stats["skipped_undecodable_lines"] == 1 and stats["documents_in"] == 1

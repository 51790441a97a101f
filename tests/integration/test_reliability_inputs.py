"""A folder input (`datasets.Dataset.save_to_disk`, a documented format) runs through `kompakt prepare`."""

import json
import shutil

import pyarrow.parquet as pq

from kompakt.cli import main
from kompakt.runs import is_complete

NUM_DOCS = 300


def _prepare(repo, run_dir, inputs):
    return main(["prepare", str(repo / "recipes" / "demo-nb.yaml"), f"run_dir={run_dir}",
                 f"data.inputs=[{inputs}]", "data.num_proc=1"])


def _stages(run_dir, prefix):
    return sorted(d for d in run_dir.iterdir() if d.name.startswith(prefix))


def test_datasets_folder_is_prepared_and_its_hash_follows_its_content(repo, tmp_path, demo_docs, capsys):
    import datasets

    folder = tmp_path / "corpus_ds"
    docs = demo_docs[:NUM_DOCS]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(folder))
    assert folder.is_dir()

    run_dir = tmp_path / "run"
    assert _prepare(repo, run_dir, folder) == 0, capsys.readouterr().err[-2000:]
    [stage] = _stages(run_dir, "prepare-")
    assert is_complete(stage)
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["documents_in"] == NUM_DOCS and stats["documents_out"] >= 0.9 * NUM_DOCS
    shards = sorted((stage / "corpus").glob("*.parquet"))
    texts = [t for p in shards for t in pq.read_table(p)["text"].to_pylist()]
    assert len(texts) == stats["documents_out"]

    # The same folder again: skipped. A changed folder (one more document): a new part and stage.
    assert _prepare(repo, run_dir, folder) == 0
    assert "complete, skipped" in capsys.readouterr().err
    shutil.rmtree(folder)
    datasets.Dataset.from_dict({"text": docs + [demo_docs[NUM_DOCS]]}).save_to_disk(str(folder))
    assert _prepare(repo, run_dir, folder) == 0
    assert len(_stages(run_dir, "prepare-")) == 2 and len(_stages(run_dir, "prepare_part-")) == 2


def test_folder_that_is_not_a_datasets_folder_is_one_error_line(repo, tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("Dette er en setning om noe som helst.\n", encoding="utf-8")
    assert _prepare(repo, tmp_path / "run", folder) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {folder}: a folder but not a datasets folder"), err
    # Nothing half-written: not even a hidden temporary folder.
    assert not (tmp_path / "run").exists() or list((tmp_path / "run").iterdir()) == []

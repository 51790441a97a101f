"""Run directories: hashing, atomic completion, skip and force."""

import json

import pytest

from kompakt.runs import is_complete, open_stage, stage_dir


def test_hash_changes_with_config_and_inputs(tmp_path):
    a = stage_dir(tmp_path, "s", {"x": 1}, {"in": "h1"})
    assert a == stage_dir(tmp_path, "s", {"x": 1}, {"in": "h1"})
    assert a != stage_dir(tmp_path, "s", {"x": 2}, {"in": "h1"})
    assert a != stage_dir(tmp_path, "s", {"x": 1}, {"in": "h2"})


def test_complete_stage_has_manifest(tmp_path):
    with open_stage(tmp_path, "s", {"x": 1}, {}) as run:
        (run.work_dir / "out.txt").write_text("hi")
        run.counts["n"] = 3
    d = stage_dir(tmp_path, "s", {"x": 1}, {})
    m = json.loads((d / "manifest.json").read_text())
    assert m["complete"] is True and m["counts"]["n"] == 3 and "torch" in m["versions"]
    assert json.loads((d / "config.json").read_text()) == {"x": 1}


def test_failed_stage_leaves_nothing_complete(tmp_path):
    with pytest.raises(RuntimeError):
        with open_stage(tmp_path, "s", {"x": 1}, {}) as run:
            (run.work_dir / "half.txt").write_text("half")
            raise RuntimeError("boom")
    d = stage_dir(tmp_path, "s", {"x": 1}, {})
    assert not d.exists() and not is_complete(d)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_on_success(tmp_path):
    with open_stage(tmp_path, "s", {}, {}) as run:
        (run.work_dir / "v").write_text("1")
    d = stage_dir(tmp_path, "s", {}, {})
    with pytest.raises(RuntimeError):
        with open_stage(tmp_path, "s", {}, {}) as run:
            raise RuntimeError("boom")
    assert (d / "v").read_text() == "1" and is_complete(d)
    with open_stage(tmp_path, "s", {}, {}) as run:
        (run.work_dir / "v").write_text("2")
    assert (d / "v").read_text() == "2" and is_complete(d)

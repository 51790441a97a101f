"""`kompakt infer` end to end, as a user runs it: real processes, real Parquet, kills at bad moments.

The model is the conftest's tiny classifier (right on every toy text), so a wrong row order, a lost row or a
padding mistake shows up as a wrong label or a probability that differs from one text predicted alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import toy_sentiment

KOMPAKT = [sys.executable, "-m", "kompakt.cli"]


def _kompakt(*args, check=True, timeout=300, env=None):
    out = subprocess.run([*KOMPAKT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if check and out.returncode != 0:
        raise AssertionError(f"kompakt {' '.join(map(str, args))} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


def _corpus(folder: Path, num_files: int = 3, rows: int = 120) -> tuple[list[Path], dict[str, str]]:
    """JSONL files of toy texts with ids, plus the hostile rows: empty, far too long, and (in a .txt) bad UTF-8."""
    folder.mkdir(parents=True, exist_ok=True)
    gold, paths = {}, []
    data = toy_sentiment(num_files * rows, seed=7)
    for f in range(num_files):
        p = folder / f"part{f}.jsonl"
        with open(p, "w", encoding="utf-8") as fh:
            for i, (text, label) in enumerate(data[f * rows:(f + 1) * rows]):
                gold[f"f{f}-{i}"] = label
                fh.write(json.dumps({"id": f"f{f}-{i}", "text": text}) + "\n")
            fh.write(json.dumps({"id": f"f{f}-empty", "text": "   "}) + "\n")
            fh.write(json.dumps({"id": f"f{f}-long", "text": "huset " * 300}) + "\n")
        paths.append(p)
    txt = folder / "extra.txt"
    txt.write_bytes(b"vi ser fantastisk huset\nbad \xff\xfe bytes here\nelendig maten i byen\n")
    gold.update({f"{txt}:1": "positive", f"{txt}:3": "negative"})
    return paths + [txt], gold


def _read(out: Path) -> dict[str, dict]:
    rows = {}
    for f in sorted((out / "shards").glob("part-*.parquet")):
        for r in pq.read_table(f).to_pylist():
            assert r["id"] not in rows, f"row {r['id']} written twice"
            rows[r["id"]] = r
    return rows


def _rejected(out: Path) -> dict[str, str]:
    rej = {}
    for f in sorted((out / "rejected").glob("part-*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            rej[r["id"]] = r["reason"]
    return rej


def test_classifier_outputs_rejects_and_exact_probabilities(tiny_classifier, tmp_path):
    from kompakt.infer.runtime import load_predictor

    inputs, gold = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    res = _kompakt("infer", tiny_classifier, *inputs, "--out", out, "--id-field", "id", "--threads", "1")
    assert res.stdout.strip() == str(out)
    rows = _read(out)
    assert set(rows) == set(gold), "every good row exactly once"
    assert all(rows[i]["label"] == gold[i] for i in gold)
    rej = _rejected(out)
    assert {k for k in rej if k.endswith("-empty")} == {f"f{f}-empty" for f in range(3)}
    assert all("empty" in rej[f"f{f}-empty"] and "tokens, over the limit" in rej[f"f{f}-long"] for f in range(3))
    bad_utf8 = [k for k in rej if k.endswith("extra.txt:2")]
    assert bad_utf8 and "invalid UTF-8" in rej[bad_utf8[0]]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["rows"] == len(gold) and manifest["rejected"] == 7
    # Length-bucketed, padded batches give what each text gives alone (no padding leaks into the result).
    pred = load_predictor(tiny_classifier, threads=1)
    some = [i for i in gold if i.startswith("f1-")][:20]
    texts = {json.loads(l)["id"]: json.loads(l)["text"] for l in inputs[1].read_text().splitlines()}
    for i in some:
        alone = pred.predict([texts[i]])[0]
        np.testing.assert_allclose(rows[i]["probs"], alone["probs"], atol=1e-5)


def test_killed_run_resumes_without_losing_or_repeating_a_row(tiny_classifier, tmp_path):
    inputs, gold = _corpus(tmp_path / "in", num_files=6, rows=200)
    ref = tmp_path / "ref"
    _kompakt("infer", tiny_classifier, *inputs, "--out", ref, "--id-field", "id", "--threads", "1",
             "--rows-per-chunk", "64")
    out = tmp_path / "out"
    cmd = [*KOMPAKT, "infer", str(tiny_classifier), *map(str, inputs), "--out", str(out), "--id-field", "id",
           "--threads", "1", "--rows-per-chunk", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # Kill while a shard is being written: the first done shard exists and the next one is in flight.
    while time.monotonic() < deadline and not (out / "shards" / "part-00001.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in (out / "shards").glob("part-*.json"))
    assert done_before and len(done_before) < len(inputs), "the kill came mid-run"
    # Nothing half-written looks complete: every Parquet has its done record, the manifest is not complete.
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    for pq_file in (out / "shards").glob("part-*.parquet"):
        assert pq_file.with_suffix(".json").exists(), f"{pq_file.name} visible without its done record"
    # A damaged done shard (truncated Parquet) is detected and redone, not trusted.
    first = out / "shards" / "part-00000.parquet"
    first.write_bytes(first.read_bytes()[:100])
    res = _kompakt("infer", tiny_classifier, *inputs, "--out", out, "--id-field", "id", "--threads", "1",
                   "--rows-per-chunk", "64")
    assert "damaged" in res.stderr
    assert not list((out / "shards").glob(".part-*")), "temporary files of the killed run are cleaned up"
    a, b = _read(ref), _read(out)
    assert set(a) == set(b) == set(gold)
    assert all(a[i]["probs"] == b[i]["probs"] for i in a), "the resumed run writes the same bytes"
    assert _rejected(ref) == _rejected(out)


def test_workers_and_array_shards_give_identical_outputs(tiny_classifier, tmp_path):
    inputs, gold = _corpus(tmp_path / "in", num_files=4, rows=60)
    one, many, array = tmp_path / "one", tmp_path / "many", tmp_path / "array"
    common = ["--id-field", "id", "--threads", "1"]
    _kompakt("infer", tiny_classifier, *inputs, "--out", one, *common)
    _kompakt("infer", tiny_classifier, *inputs, "--out", many, "--workers", "2", *common)
    for i in range(2):  # what the Slurm array's tasks run, then its finishing task
        _kompakt("infer", tiny_classifier, *inputs, "--out", array, "--shard", f"{i}/2", *common)
        if i == 0:
            assert not json.loads((array / "manifest.json").read_text())["complete"]
    _kompakt("infer", tiny_classifier, *inputs, "--out", array, *common)
    # Ray Data on a local Ray instance (map_batches, one model actor per worker), isolated from any cluster.
    ray_out = tmp_path / "ray"
    _kompakt("infer", tiny_classifier, *inputs, "--out", ray_out, "--ray", "--workers", "2", *common,
             env={"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})
    for other in (many, array, ray_out):
        for f in sorted((one / "shards").glob("part-*.parquet")):
            assert pq.read_table(f).equals(pq.read_table(other / "shards" / f.name)), f"{other.name}/{f.name}"
        assert json.loads((other / "manifest.json").read_text())["complete"]


def test_embeddings_and_token_spans(tiny_bert, tiny_tagger, tmp_path):
    inputs, gold = _corpus(tmp_path / "in", num_files=1, rows=40)
    emb = tmp_path / "emb"
    _kompakt("infer", tiny_bert, inputs[0], "--out", emb, "--id-field", "id", "--normalize", "--float16")
    t = pq.read_table(emb / "shards" / "part-00000.parquet")
    assert str(t.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[32]"
    vecs = np.asarray(t.column("embedding").to_pylist(), dtype=np.float32)
    assert vecs.shape == (40, 32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)
    tags = tmp_path / "tags"
    _kompakt("infer", tiny_tagger, inputs[0], "--out", tags, "--id-field", "id")
    texts = {json.loads(l)["id"]: json.loads(l)["text"] for l in inputs[0].read_text().splitlines()}
    rows = _read(tags)
    assert len(rows) == 40
    num_spans = 0
    for i, r in rows.items():
        for s in r["spans"]:
            num_spans += 1
            assert 0 <= s["start"] < s["end"] <= len(texts[i]) and s["label"] in ("PER", "LOC")
            assert texts[i][s["start"]:s["end"]].strip() == texts[i][s["start"]:s["end"]], "spans cover whole words"
    assert num_spans > 0, "a random tagger tags something"


def test_bad_input_is_one_line_and_exit_2(tiny_bert, tiny_classifier, tmp_path):
    inputs, _ = _corpus(tmp_path / "in", num_files=1, rows=5)
    res = _kompakt("infer", tiny_bert, inputs[0], "--out", tmp_path / "o1", "--task", "classify", check=False)
    assert res.returncode == 2 and "no task head" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = _kompakt("infer", tiny_classifier, inputs[0], "--out", tmp_path / "o2", "--text-field", "body", check=False)
    assert res.returncode == 2 and "no field 'body'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o2" / "shards" / "part-00000.json").exists()
    res = _kompakt("infer", tiny_classifier, tmp_path / "missing.jsonl", "--out", tmp_path / "o3", check=False)
    assert res.returncode == 2 and "no such input" in res.stderr
    _kompakt("infer", tiny_classifier, inputs[0], "--out", tmp_path / "o4", "--id-field", "id")
    res = _kompakt("infer", tiny_classifier, inputs[0], "--out", tmp_path / "o4", "--id-field", "id", "--truncate",
                   check=False)
    assert res.returncode == 2 and "other settings (truncate)" in res.stderr


def test_slurm_dry_run_renders_an_array_and_a_finishing_job(tiny_classifier, tmp_path):
    inputs, _ = _corpus(tmp_path / "in", num_files=2, rows=5)
    res = _kompakt("infer", tiny_classifier, *inputs, "--out", tmp_path / "out", "--slurm", "4", "--dry-run")
    assert "#SBATCH --array=0-3" in res.stdout
    assert '--shard "$part/4"' in res.stdout
    assert "#SBATCH --dependency=afterany:<infer-shards>" in res.stdout
    assert str(inputs[1].resolve()) in res.stdout


@pytest.mark.slow
def test_onnx_runtime_agrees_with_torch(tiny_classifier, tmp_path):
    import shutil

    folder = tmp_path / "cls"
    shutil.copytree(tiny_classifier, folder)
    inputs, gold = _corpus(tmp_path / "in", num_files=1, rows=80)
    _kompakt("infer", folder, "--export-onnx")
    assert (folder / "model_int8.onnx").is_file() and (folder / "onnx.json").is_file()
    outs = {}
    for runtime in ("torch", "onnx", "onnx-int8"):
        outs[runtime] = _read(tmp_path / runtime) if _kompakt(
            "infer", folder, inputs[0], "--out", tmp_path / runtime, "--id-field", "id", "--runtime", runtime) else None
    manifest = json.loads((tmp_path / "onnx-int8" / "manifest.json").read_text())
    assert manifest["settings"]["runtime"] == "onnx-int8"
    ids = sorted(outs["torch"])
    assert len(ids) == 80 and set(outs["onnx"]) == set(outs["onnx-int8"]) == set(ids)
    for i in ids:
        np.testing.assert_allclose(outs["onnx"][i]["probs"], outs["torch"][i]["probs"], atol=1e-4)
    agree = np.mean([outs["onnx-int8"][i]["label"] == gold[i] for i in ids])
    assert agree >= 0.95

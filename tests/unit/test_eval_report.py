"""The report: a markdown row per model, ≈ for differences that are not significant, self-contained HTML,
800 x 500 px PNGs."""

import json
import struct

import numpy as np
import pytest

from kompakt.errors import DataError
from kompakt.eval.report import write_report
from kompakt.eval.stats import bootstrap_interval, paired_bootstrap, retention

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a valid PNG has right after the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def _preds(gold, accuracy, n_seeds, rng):
    flip = {"a": "b", "b": "a"}
    return [[g if rng.random() < accuracy else flip[g] for g in gold] for _ in range(n_seeds)]


@pytest.fixture(scope="module")
def results():
    """One task with a teacher, a close student (not significantly worse), a clearly worse student and
    a baseline, built with the real statistics; a second task with no speed figures."""
    rng = np.random.default_rng(0)
    gold = list(rng.choice(["a", "b"], 300))
    preds = {"teacher": _preds(gold, 0.90, 3, rng), "student-6L": _preds(gold, 0.895, 3, rng),
             "student-2L": _preds(gold, 0.70, 3, rng)}
    models = {}
    size = {"teacher": 110e6, "student-6L": 67e6, "student-2L": 14e6}
    latency = {"teacher": 24.0, "student-6L": 12.5, "student-2L": 3.1}
    for k, (name, p) in enumerate(preds.items()):
        interval = bootstrap_interval(gold, p, "accuracy", n_boot=300)
        models[name] = {
            "role": "teacher" if name == "teacher" else "student", "scores": interval["scores"],
            "interval": interval, "params": size[name], "params_no_embeddings": 0.8 * size[name],
            "disk_bytes": 4 * size[name], "latency_ms": latency[name], "throughput": 1000 / latency[name],
            "peak_memory_mb": size[name] / 2e5,
            "learning_curve": {100: {"mean": 0.6 + 0.01 * k, "low": 0.55, "high": 0.66},
                               "1000": {"mean": 0.8, "low": 0.76, "high": 0.84},
                               "all": {k: interval[k] for k in ("mean", "low", "high")}},
        }
        if name != "teacher":
            models[name]["retention"] = retention(gold, preds["teacher"], p, "accuracy", n_boot=300)
    pairs = [{"a": name, "b": "teacher",
              **paired_bootstrap(gold, preds[name], preds["teacher"], "accuracy", n_boot=300)}
             for name in ("student-6L", "student-2L")]
    tfidf = bootstrap_interval(gold, _preds(gold, 0.75, 1, rng), "accuracy", n_boot=300)
    return {
        "suite": "demo-nb", "device": "test CPU, 2 threads", "versions": {"torch": "2.13.0"},
        "git_commit": "abc1234",
        "tasks": {
            "sentiment": {"type": "classification", "metric": "accuracy", "num_train": 5000, "num_test": 300,
                          "majority": 0.52, "models": models, "pairs": pairs},
            "ner <nb>": {"type": "token_classification", "metric": "span_f1",
                         "models": {"teacher": {"role": "teacher", "scores": [0.81, 0.83]}}},
        },
        "baselines": {"sentiment": {"tfidf": {
            "scores": tfidf["scores"], "interval": tfidf,
            "learning_curve": {"100": {"mean": 0.7, "low": 0.65, "high": 0.75},
                               "all": {"mean": 0.75, "low": 0.7, "high": 0.8}}}}},
    }


def test_report_files_and_plot_sizes(results, tmp_path):
    paths = write_report(results, tmp_path / "report")
    plots = {"pareto:sentiment", "params:sentiment", "learning_curve:sentiment"}
    assert {"markdown", "html", "json"} | plots <= set(paths)
    assert "pareto:ner <nb>" not in paths  # no latencies, no Pareto plot
    pngs = [p for k, p in paths.items() if ":" in k]
    assert pngs and all(png_size(p) == (800, 500) for p in pngs)
    assert all(p.exists() for p in paths.values())
    assert not list((tmp_path / "report").glob("*.tmp"))
    assert json.loads(paths["json"].read_text())["tasks"]["sentiment"]["metric"] == "accuracy"


def test_markdown_rows_and_significance(results, tmp_path):
    md = write_report(results, tmp_path).get("markdown").read_text()
    section = md.split("## sentiment")[1].split("## ")[0]
    table = [line for line in section.split("Paired differences")[0].splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line for line in table[1:]}
    assert list(rows) == ["teacher", "student-6L", "student-2L", "tfidf"]  # one row per model, baseline last
    t = results["tasks"]["sentiment"]["models"]["teacher"]["interval"]
    assert (f"{100 * t['mean']:.1f} ± {100 * t['std']:.1f} [{100 * t['low']:.1f}, {100 * t['high']:.1f}]"
            in rows["teacher"])
    r = results["tasks"]["sentiment"]["models"]["student-2L"]["retention"]
    assert f"{r['mean']:.1f} [{r['low']:.1f}, {r['high']:.1f}]" in rows["student-2L"]
    assert "100 (reference)" in rows["teacher"]
    pairs = {p["a"]: p for p in results["tasks"]["sentiment"]["pairs"]}
    assert not pairs["student-6L"]["significant"] and pairs["student-2L"]["significant"]
    assert "≈" in rows["student-6L"] and "≈" not in rows["student-2L"]
    assert "not significant" in md and "baseline" in rows["tfidf"]
    assert "![sentiment: score vs CPU latency](sentiment-pareto.png)" in md


def test_html_is_self_contained_and_escaped(results, tmp_path):
    paths = write_report(results, tmp_path)
    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "http" not in page and "<script" not in page
    assert '<img src="sentiment-pareto.png" width="800" height="500"' in page
    assert "ner &lt;nb&gt;" in page and "<nb>" not in page
    assert 'class="ns"' in page and "<sup>1</sup>" in page


def test_round_trip_through_json_and_bad_input(results, tmp_path):
    first = write_report(results, tmp_path / "a")
    again = write_report(json.loads(first["json"].read_text()), tmp_path / "b")  # string curve keys
    assert again["markdown"].read_text() == first["markdown"].read_text()
    assert again["learning_curve:sentiment"].read_bytes() == first["learning_curve:sentiment"].read_bytes()
    with pytest.raises(DataError, match="no 'tasks'"):
        write_report({"suite": "x"}, tmp_path / "c")
    with pytest.raises(DataError, match="neither 'scores' nor 'interval'"):
        write_report({"tasks": {"t": {"metric": "accuracy", "models": {"m": {"params": 1}}}}}, tmp_path / "d")


def test_figures_shared_across_tasks_and_baseline_notes(tmp_path):
    """The eval stage's shape: speed and size once per model at the top, baselines inside each task,
    a baseline that cannot run as a note, and the teacher known only by its name."""
    iv = {"mean": 0.8, "std": 0.01, "low": 0.75, "high": 0.85, "n_seeds": 2}
    results = {
        "suite": "s", "models": {"teacher": {"params": 2e7, "latency_ms": 9.0}, "small": {"params": 4e6,
                                                                                        "latency_ms": 2.0}},
        "tasks": {"qa": {"type": "qa", "metric": "squad_f1", "num_train": 900, "num_test": 100,
                         "models": {"teacher": {"scores": [0.79, 0.81], "interval": iv},
                                    "small": {"scores": [0.7, 0.72], "interval": {**iv, "mean": 0.71},
                                              "retention": {"mean": 88.8, "low": 85.0, "high": 92.0}}},
                         "baselines": {"tfidf": {"note": "tfidf does not support qa"}}}},
    }
    paths = write_report(results, tmp_path)
    md = paths["markdown"].read_text()
    assert "## qa (qa, squad_f1, 900 train, 100 test)" in md
    assert "| teacher | teacher | 80.0 ± 1.0 [75.0, 85.0] | 2 | 100 (reference) | - | 20.0M |" in md
    assert "| small | student | 71.0 ± 1.0 [75.0, 85.0] | 2 | 88.8 [85.0, 92.0] | - | 4.0M |" in md
    assert "- tfidf: tfidf does not support qa" in md
    assert png_size(paths["pareto:qa"]) == (800, 500) and "learning_curve:qa" not in paths

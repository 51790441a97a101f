"""`pretokenize_throughput` on the demo recipe (slow: it runs data_prep on the whole demo corpus once)."""

import pytest

from kompakt.bench import run


@pytest.mark.slow
def test_pretokenize_throughput_quick(repo, monkeypatch):
    monkeypatch.chdir(repo)
    result = run("data", recipe="recipes/demo-nb.yaml", quick=True)
    assert result["num_docs"] > 1000 and result["num_tokens"] > result["num_docs"]
    assert result["ours_mb_per_s"] > 0 and result["baseline_mb_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours_mb_per_s"] / result["baseline_mb_per_s"])
    assert result["corpus"].startswith("data_prep output")  # the dispatcher ran data_prep for it


@pytest.mark.slow
def test_the_suite_records_every_benchmark_and_a_failure_without_stopping(repo, monkeypatch, tmp_path):
    import json

    from kompakt.bench import run_all

    monkeypatch.chdir(repo)
    out = run_all("recipes/demo-nb.yaml", quick=True, out=str(tmp_path / "bench.json"),
                  suite=(("nonexistent", "bert"), ("data", "bert")))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["ratios"]["data"] == out["benchmarks"]["data"]["ratio"] > 0
    assert saved["benchmarks"]["nonexistent"]["error"].startswith("ValueError: unknown benchmark")
    assert saved["device"] and saved["versions"]["torch"] and saved["date"].endswith("UTC")
    assert saved["ratio"] == pytest.approx(out["benchmarks"]["data"]["ratio"], rel=1e-3)

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

"""`kompakt bench mfu --quick` on a CUDA GPU: bf16 autocast, our flash varlen attention, the memory figures
and MFU within (0, 1); skipped without CUDA. The measurement itself is `kompakt bench mfu --json`."""

import pytest

pytestmark = pytest.mark.gpu


def test_quick_mfu_on_the_gpu(repo, monkeypatch):
    from kompakt.bench import run

    monkeypatch.chdir(repo)
    result = run("mfu", recipe="recipes/demo-nb.yaml", quick=True)
    assert result["device_type"] == "cuda" and result["precision"] == "bf16 autocast"
    assert result["attention"] in ("varlen", "flex") and result["peak_flops"] > 1e13
    for side in ("", "_padded", "_concat"):
        assert 0 < result[f"mfu{side}"] < 1
    assert set(result["memory_gib"]) == {"ours", "padded", "concat"}
    assert all(0 <= m["step"] <= m["peak"] and m["peak"] > 0 for m in result["memory_gib"].values())

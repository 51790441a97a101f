"""`kompakt bench mfu`: refused without a CUDA GPU (exit 2, one line; skipped in the suite), and on CPU with a
given peak, the tiny shape's MFU arithmetic and the JSON object's keys.

CUDA is hidden in every test, so they run the CPU path on a GPU machine too; the GPU measurement itself is
`kompakt bench mfu --json` on a GPU."""

import json

import pytest
import torch

from kompakt.bench import RATIO_OF, SUITE
from kompakt.cli import BENCHES, build_parser, main

REASON = "needs a CUDA GPU: MFU is against a GPU's peak bf16 FLOP/s"


@pytest.fixture
def no_cuda(monkeypatch, repo):
    monkeypatch.chdir(repo)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_mfu_is_registered_and_in_the_suite():
    assert "mfu" in BENCHES and ("mfu", "bert") in SUITE and "mfu" in RATIO_OF
    args = build_parser().parse_args(["bench", "mfu", "--json", "--peak-flops", "989e12"])
    assert args.what == "mfu" and args.json and args.peak_flops == 989e12


def test_mfu_without_a_gpu_ends_with_one_line_and_exit_2(no_cuda, capsys):
    assert main(["bench", "mfu", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and REASON in lines[0]


def test_the_suite_records_mfu_without_a_gpu_as_skipped(no_cuda, tmp_path, capsys):
    from kompakt.bench import run_all

    out = run_all("recipes/demo-nb.yaml", quick=True, out=str(tmp_path / "bench.json"), suite=(("mfu", "bert"),))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert REASON in saved["benchmarks"]["mfu"]["skipped"] and "error" not in saved["benchmarks"]["mfu"]
    assert saved["ratios"]["mfu"] is None and saved["ratio"] is None and out["benchmarks"] == saved["benchmarks"]
    assert "skipped" in capsys.readouterr().err  # the table's ratio column


@pytest.mark.slow
def test_quick_mfu_on_cpu_with_a_given_peak(no_cuda, capsys):
    """The tiny shape on CPU against a stated peak of 1 TFLOP/s: the arithmetic, not a measurement."""
    peak = 1e12
    assert main(["bench", "mfu", "--quick", "--peak-flops", str(peak), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] and result["versions"]["torch"] and result["device_type"] == "cpu"
    assert result["peak_flops"] == peak and result["memory_gib"] is None  # no GPU memory to report
    assert result["model"]["vocab_size"] % 64 == 0 and result["optimizer"] == "adamw"
    fpt = result["flops_per_token"]
    assert fpt > 0
    tps = {"": result["tokens_per_s"], "_padded": result["tokens_per_s_padded"],
           "_concat": result["tokens_per_s_concat"]}
    for side, rate in tps.items():  # one FLOP count for every feed, so MFU ratios are tokens/s ratios
        assert rate > 0
        assert result[f"mfu{side}"] == pytest.approx(fpt * rate / peak)
    strongest = max(tps["_padded"], tps["_concat"])
    assert result["baseline"] == ("concat" if tps["_concat"] >= tps["_padded"] else "padded")
    assert result["ratio"] == pytest.approx(tps[""] / strongest)
    assert result["ratio"] == pytest.approx(result["mfu"] / max(result["mfu_padded"], result["mfu_concat"]))
    assert result["ratio_padded"] == pytest.approx(tps[""] / tps["_padded"])
    assert result["ratio_concat"] == pytest.approx(tps[""] / tps["_concat"])

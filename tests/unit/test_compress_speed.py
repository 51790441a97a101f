"""compress/speed.py and compress/bench_infer.py: runners in four runtimes, latency and throughput figures,
the thread count put back, and the benchmark's documented keys on two tiny models (quick mode)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kompakt.errors import ConfigError, DataError
from test_compress_quantize import build_tiny_bert, minilm_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny"), mlm=False)


@pytest.fixture(scope="module")
def batches(tiny, demo_docs):
    from kompakt.compress.batches import text_batches

    return text_batches(tiny, demo_docs[:64], max_len=128, batch_size=32)


@pytest.mark.parametrize("runtime", ["torch-fp32", "torch-int8", "ort-fp32", "ort-int8"])
def test_runner_latency_and_throughput(tiny, batches, runtime, tmp_path):
    from kompakt.compress.speed import latency_ms, make_runner, throughput

    runner = make_runner(tiny, runtime, onnx_dir=tmp_path)
    out = runner(batches[0])
    assert out.shape == (*batches[0]["input_ids"].shape, 64) and out.dtype == np.float32
    before_torch, before_runner = torch.get_num_threads(), runner.threads
    ms = latency_ms(runner, seq_len=128, threads=1, repeats=3, warmup=1)
    assert 0 < ms < 10_000
    assert torch.get_num_threads() == before_torch and runner.threads == before_runner
    seqs = throughput(runner, batches, threads=1)
    assert seqs > 0 and torch.get_num_threads() == before_torch


def test_runners_agree_and_reuse_the_exported_graph(tiny, batches, tmp_path):
    import shutil

    from kompakt.compress.speed import make_runner

    ref = make_runner(tiny, "torch-fp32")(batches[1])
    ort32 = make_runner(tiny, "ort-fp32", onnx_dir=tmp_path)
    mtime = (tmp_path / "model.onnx").stat().st_mtime_ns
    ort8 = make_runner(tiny, "ort-int8", onnx_dir=tmp_path)
    assert (tmp_path / "model.onnx").stat().st_mtime_ns == mtime  # int8 quantized the same export
    real = batches[1]["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(ort32(batches[1])[real], ref[real], atol=1e-4, rtol=1e-4)
    assert np.abs(ort8(batches[1])[real] - ref[real]).max() < 0.2
    # A folder holding model.onnx (a quantize(backend="onnx") output) is read as it is, with no new export.
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder / "config.json")
    shutil.copy(tmp_path / "model.onnx", folder / "model.onnx")
    assert make_runner(folder, "ort-fp32").path == folder / "model.onnx"
    # int8 from that folder quantizes its graph (it has no weights to export from) into a temporary folder.
    from_folder = make_runner(folder, "ort-int8")
    assert from_folder.path.name == "model_int8.onnx" and not (folder / "model_int8.onnx").exists()
    np.testing.assert_allclose(from_folder(batches[1]), ort8(batches[1]), atol=1e-5)


def test_ort_latency_uses_the_thread_count_asked_for(tiny, tmp_path):
    from kompakt.compress.speed import latency_ms, make_runner

    runner = make_runner(tiny, "ort-fp32", onnx_dir=tmp_path)
    runner.set_threads(2)
    latency_ms(runner, threads=1, repeats=2, warmup=0)
    assert set(runner._sessions) >= {1} and runner.threads == 2


def test_bad_runtime_and_empty_batches(tiny):
    from kompakt.compress.speed import make_runner, throughput

    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'; valid: torch-fp32, torch-int8"):
        make_runner(tiny, "tensorrt")
    with pytest.raises(DataError, match="at least one batch"):
        throughput(lambda b: None, [])
    with pytest.raises(DataError, match="no config.json"):
        make_runner(tiny / "nowhere", "torch-fp32")


def test_vnni_detection_reads_cpuinfo_flags():
    from kompakt.compress.speed import cpu_flags, cpu_name, has_vnni

    flags = cpu_flags()
    assert has_vnni() == bool({"avx512_vnni", "avx_vnni"} & flags)
    assert cpu_name()


def test_infer_benchmark_quick_on_two_tiny_models(tiny, demo_docs, tmp_path):
    from kompakt.compress.bench_infer import infer_benchmark

    student = build_tiny_bert(tmp_path / "student", layers=1, hidden=32, mlm=False)
    result = infer_benchmark({"teacher": tiny, "student": student}, demo_docs[:40], quick=True)
    assert {"rows", "ratio", "vnni", "cpu", "int8_over_fp32", "best", "goals", "baseline"} <= set(result)
    assert len(result["rows"]) == 8
    keys = {"model", "runtime", "layers", "hidden", "params", "latency_ms", "latency_ms_2threads", "throughput",
            "speedup"}
    for row in result["rows"]:
        assert keys <= set(row)
        assert row["latency_ms"] > 0 and row["latency_ms_2threads"] > 0 and row["throughput"] > 0
    by = {(r["model"], r["runtime"]): r for r in result["rows"]}
    assert by["teacher", "torch-fp32"]["speedup"] == pytest.approx(1.0)
    assert (by["teacher", "torch-fp32"]["layers"], by["student", "ort-int8"]["hidden"]) == (2, 32)
    assert result["ratio"] == max(r["speedup"] for r in result["rows"])
    assert set(result["int8_over_fp32"]["student"]) == {"torch", "ort"}
    assert result["goals"]["student_over_teacher_fp32"]["target"] == 9.4
    json.dumps(result)  # the CLI prints it with --json


def test_synthetic_models_are_stock_bert_folders_and_kept(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    from kompakt.compress import bench_infer

    # The real shapes (12x768, 4x312) write 500 MB; the folder logic is the same for small ones.
    monkeypatch.setattr(bench_infer, "SYNTHETIC", {
        "teacher-2x64": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256),
        "student-1x32": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=128)})
    paths = bench_infer.synthetic_models(tmp_path)
    assert list(paths) == ["teacher-2x64", "student-1x32"]
    cfg = AutoConfig.from_pretrained(str(paths["teacher-2x64"]))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (2, 64, 30522)
    assert AutoTokenizer.from_pretrained(str(paths["student-1x32"])).vocab_size == 30522
    mtime = (paths["teacher-2x64"] / "model.safetensors").stat().st_mtime_ns
    weights = (paths["teacher-2x64"] / "model.safetensors").read_bytes()
    again = bench_infer.synthetic_models(tmp_path)
    assert (again["teacher-2x64"] / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # Seeded: a fresh folder gets the same bytes.
    fresh = bench_infer.synthetic_models(tmp_path / "b")["teacher-2x64"]
    assert (fresh / "model.safetensors").read_bytes() == weights
    assert minilm_path().is_dir()

"""Inference speed of one encoder in one runtime: latency at batch 1 and throughput on real batches.

Model cards, `quantize()` and `kompakt bench infer` all measure through this module, so a figure in a
card and a figure in a benchmark mean the same thing:

- `latency_ms`: batch 1, `seq_len` tokens (128 by default; random ids from the vocabulary, attention
  mask all ones), median wall time of one forward over `repeats` calls after `warmup` calls, with the
  thread count pinned to `threads` (torch intra-op threads and ONNX Runtime intra-op threads) and
  restored afterwards.
- `throughput`: sequences per second over length-bucketed, padded batches of real text (usually batch
  32 from `kompakt.compress.batches.text_batches`), one pass over all batches per repeat, median rate.

A runner is `runner(batch) -> (B, L, H) float32 numpy last_hidden_state`, made by `make_runner(model_dir,
runtime)` for runtime in `RUNTIMES`. Every runner computes the encoder only (AutoModel), the part whose
speed differs between runtimes; heads cost one matmul per token or per sequence on top.

Figures on a shared 2-core machine move by 10-40% from one minute to the next, so comparisons
(`compare_throughput`, the benchmark) interleave the runners round by round rather than measuring one
runner to the end and then the next.
"""

from __future__ import annotations

import inspect
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from kompakt.errors import ConfigError, DataError
from kompakt.onnx_export import INPUT_NAMES, random_batch  # noqa: F401 - random_batch re-exported
from kompakt.speed import cpu_name  # noqa: F401  (re-exported: quantize and the benchmark use it)

RUNTIMES = ("torch-fp32", "torch-int8", "ort-fp32", "ort-int8")
# The file names quantize(backend="onnx") writes; make_runner reuses them when a folder holds them.
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model_int8.onnx"


def cpu_flags() -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni() -> bool:
    """Whether the CPU has VNNI (`avx512_vnni` or `avx_vnni`): one instruction for the int8 dot product
    that int8 GEMMs need; without it x86 int8 kernels take three (vpmaddubsw, vpmaddwd, vpaddd) and
    gain much less over fp32 FMA."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class TorchRunner:
    """A PyTorch encoder (fp32 or dynamically quantized int8) as a runner; forwards run in inference_mode."""

    def __init__(self, model: torch.nn.Module, runtime: str, vocab_size: int):
        self.model = model.eval()
        self.runtime = runtime
        self.vocab_size = vocab_size
        # Only the inputs the model's forward takes (DistilBERT-like models have no token_type_ids).
        params = inspect.signature(model.forward).parameters
        self.input_names = [n for n in INPUT_NAMES if n in params]

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def set_threads(self, n: int) -> None:
        torch.set_num_threads(n)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(**{k: batch[k] for k in self.input_names if k in batch})
        return out.last_hidden_state.numpy()


class OrtRunner:
    """An ONNX Runtime session on the CPU as a runner; one session per thread count, built on first use.

    Sessions run with graph_optimization_level ORT_ENABLE_ALL (layout and fusion passes for this CPU),
    intra-op threads as set, inter-op threads 1 (one graph, no parallel branches worth a second pool).
    """

    def __init__(self, onnx_path: Path, runtime: str, vocab_size: int, threads: int | None = None):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ConfigError(f"runtime {runtime!r} needs ONNX Runtime: pip install onnxruntime") from None
        self.path = Path(onnx_path)
        self.runtime = runtime
        self.vocab_size = vocab_size
        self._threads = threads or torch.get_num_threads()
        self._sessions: dict[int, object] = {}
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def threads(self) -> int:
        return self._threads

    def set_threads(self, n: int) -> None:
        self._threads = n

    @property
    def session(self):
        if self._threads not in self._sessions:
            self._sessions[self._threads] = ort_session(self.path, self._threads)
        return self._sessions[self._threads]

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> np.ndarray:
        feed = {k: _numpy(batch[k]) for k in self.input_names}
        return self.session.run(None, feed)[0]


def ort_session(onnx_path: Path, threads: int):
    """A CPU InferenceSession of `onnx_path` with `threads` intra-op threads and every graph optimisation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # warnings about unused initializers say nothing a user can act on
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def _numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def make_runner(model_dir: str | Path, runtime: str, *, onnx_dir: str | Path | None = None):
    """A runner for the encoder of the HF folder `model_dir` in `runtime` (one of `RUNTIMES`).

    torch-fp32 is the stock `AutoModel` with sdpa attention; torch-int8 the same model after
    `torch.ao.quantization.quantize_dynamic` of every nn.Linear (kompakt.compress.quantize.dynamic_int8).
    The ORT runtimes read `model.onnx` / `model_int8.onnx` from `model_dir` (a quantize(backend="onnx")
    output) or from `onnx_dir`; when neither holds them, the model is exported (and quantized) into
    `onnx_dir`, or into a temporary folder that lives as long as the runner when `onnx_dir` is None.
    """
    from kompakt.compress import quantize as q

    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: no config.json; give a Hugging Face model folder")
    if runtime.startswith("torch"):
        model = q.load_encoder(model_dir)
        vocab = model.config.vocab_size
        if runtime == "torch-int8":
            model = q.dynamic_int8(model)
        return TorchRunner(model, runtime, vocab)

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    name = ONNX_FP32 if runtime == "ort-fp32" else ONNX_INT8
    folders = [Path(d) for d in (model_dir, onnx_dir) if d is not None]
    for d in folders:
        if (d / name).is_file():
            return OrtRunner(d / name, runtime, vocab)
    tmp = None
    if onnx_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kompakt-onnx-")
        onnx_dir = tmp.name
    onnx_dir = Path(onnx_dir)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    fp32 = next((d / ONNX_FP32 for d in folders if (d / ONNX_FP32).is_file()), None)
    if fp32 is None:
        fp32 = onnx_dir / ONNX_FP32
        q.export_onnx(model_dir, fp32)
    if runtime == "ort-int8":
        q.ort_int8(fp32, onnx_dir / ONNX_INT8)
    runner = OrtRunner(onnx_dir / name if runtime == "ort-int8" else fp32, runtime, vocab)
    runner._tmp = tmp  # the temporary folder goes when the runner goes
    return runner


class _Threads:
    """Pin torch's and the runner's intra-op thread counts for a block, then put both back."""

    def __init__(self, runner, threads: int | None):
        self.runner, self.threads = runner, threads

    def __enter__(self):
        self.torch_prev = torch.get_num_threads()
        self.runner_prev = getattr(self.runner, "threads", None)
        if self.threads is not None:
            torch.set_num_threads(self.threads)
            if hasattr(self.runner, "set_threads"):
                self.runner.set_threads(self.threads)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.torch_prev)
        if self.runner_prev is not None and hasattr(self.runner, "set_threads"):
            self.runner.set_threads(self.runner_prev)


def latency_samples(runner: Callable, *, seq_len: int = 128, threads: int = 1, repeats: int = 20,
                    warmup: int = 3, seed: int = 0) -> list[float]:
    """Wall times in ms of `repeats` batch-1 forwards of `seq_len` tokens at `threads` threads (after `warmup`)."""
    if repeats < 1:
        raise ConfigError(f"latency repeats must be at least 1, got {repeats}")
    batch = random_batch(getattr(runner, "vocab_size", 30522), batch_size=1, seq_len=seq_len, seed=seed)
    times = []
    with _Threads(runner, threads), torch.inference_mode():
        for _ in range(warmup):
            runner(batch)
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner(batch)
            times.append((time.perf_counter() - t0) * 1000.0)
    return times


def latency_ms(runner: Callable, seq_len: int = 128, threads: int = 1, repeats: int = 20, *, warmup: int = 3,
               seed: int = 0) -> float:
    """Median latency in ms of one batch-1 forward of `seq_len` tokens at `threads` threads.

    12x768 BERT at 1 thread on a 2-core AVX2 EPYC takes about 400 ms here, a 4x312 student about 25 ms;
    `repeats=5, warmup=1` is enough for a test, the benchmark uses 10 per round over several rounds.
    """
    return statistics.median(latency_samples(runner, seq_len=seq_len, threads=threads, repeats=repeats,
                                             warmup=warmup, seed=seed))


def _one_pass(runner: Callable, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    t0 = time.perf_counter()
    for b in batches:
        runner(b)
    return time.perf_counter() - t0


def throughput(runner: Callable, batches: Sequence[Mapping[str, torch.Tensor]], *, threads: int | None = None,
               repeats: int = 1, warmup: int = 1) -> float:
    """Sequences per second over `batches` (median over `repeats` passes; `warmup` batches run first).

    Pass length-bucketed batches of real text (`text_batches(..., batch_size=32)`): the figure then
    includes the padding a careful user cannot avoid and none that bucketing removes. `threads` None
    keeps the current thread count.
    """
    if not batches:
        raise DataError("throughput needs at least one batch of text")
    num_seqs = sum(int(b["input_ids"].shape[0]) for b in batches)
    with _Threads(runner, threads), torch.inference_mode():
        for b in batches[:warmup]:
            runner(b)
        rates = [num_seqs / _one_pass(runner, batches) for _ in range(max(1, repeats))]
    return statistics.median(rates)


def compare_throughput(runners: Mapping[str, Callable], batches: Sequence[Mapping[str, torch.Tensor]], *,
                       threads: int | None = None, repeats: int = 3) -> dict[str, float]:
    """Sequences/s of each runner over the same batches, measured in `repeats` interleaved rounds.

    Interleaving (fp32 pass, int8 pass, fp32 pass, ...) keeps a load change on a shared machine from
    landing on one runner only; each figure is the median of its rounds.
    """
    if not batches:
        raise DataError("throughput needs at least one batch of text")
    num_seqs = sum(int(b["input_ids"].shape[0]) for b in batches)
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for name, r in runners.items():  # one warm-up batch each: first calls allocate and pack weights
        with _Threads(r, threads), torch.inference_mode():
            r(batches[0])
    for _ in range(max(1, repeats)):
        for name, r in runners.items():
            with _Threads(r, threads), torch.inference_mode():
                rates[name].append(num_seqs / _one_pass(r, batches))
    return {k: statistics.median(v) for k, v in rates.items()}

"""`kompakt bench batch` (rows/s of `kompakt infer` against `transformers.pipeline(..., batch_size=32)`) and
`kompakt bench serve` (`serve_throughput`: the HTTP server with and without dynamic batching).

Models: TinyBERT's two shapes as stock `BertForSequenceClassification` folders with seeded random weights
(speed does not depend on the values): teacher-12x768 (BERT-base) and student-4x312 (TinyBERT-4), with
all-MiniLM-L6-v2's 30,522-entry tokenizer. Texts: the recipe's corpus paragraphs, every side cut to the same
128 tokens. Both sides run in this process on the same texts and threads; model loading is outside the clock.

- baseline: `pipeline("text-classification", model=folder, batch_size=32, truncation=True, max_length=128)`
  with top_k=None (all class probabilities, as ours writes) in fp32 PyTorch on the same device: what a careful
  user writes. It batches the texts in the order given, padding each batch to its longest text.
- ours: `kompakt infer`'s own shard writer (read, tokenise a chunk ahead, length-bucketed batches,
  `inference_mode`, Parquet with a done record) over a JSONL of the same texts, in each runtime: torch fp32
  (the same model as the baseline), ONNX Runtime fp32 and int8 of the exported task model.

Each side runs `repeats` times, interleaved, and its best rate is kept (the least disturbed by other work on a
shared machine). `ratio` is ours in the fastest runtime over the pipeline on the same model (the student);
the per-runtime ratios and the student-int8-over-teacher-pipeline figure are reported beside it. CPU
tokenisation throughput (texts/s, MB/s of UTF-8) is measured on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from kompakt.log import info, table
from kompakt.speed import TINYBERT_SHAPES, minilm_tokenizer_dir

MAX_LENGTH = 128
PIPELINE_BATCH = 32


def classifier_models(root: Path, onnx: bool = True) -> dict[str, Path]:
    """The two shapes as classifier folders under root (kept when complete); the student also with its ONNX
    fp32 and int8 graphs (kompakt.onnx_export.export_task_onnx)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, shape in TINYBERT_SHAPES.items():
        final = root / name
        out[name] = final
        if not (final / "model.safetensors").is_file():
            torch.manual_seed(0)
            cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=2,
                             id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}, **shape)
            tmp = root / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            BertForSequenceClassification(cfg).eval().save_pretrained(tmp)
            AutoTokenizer.from_pretrained(str(minilm_tokenizer_dir("bench batch and serve"))).save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        if onnx and name.startswith("student") and not (final / "onnx.json").is_file():
            from kompakt.onnx_export import export_task_onnx

            export_task_onnx(final, head="classify")
    return out


def _pipeline_rate(folder: Path, texts: list[str]) -> float:
    import torch
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(folder), device=0 if torch.cuda.is_available() else -1,
                    top_k=None)
    pipe(texts[:PIPELINE_BATCH], batch_size=PIPELINE_BATCH, truncation=True, max_length=MAX_LENGTH)  # warm-up
    t0 = time.perf_counter()
    out = pipe(texts, batch_size=PIPELINE_BATCH, truncation=True, max_length=MAX_LENGTH)
    dt = time.perf_counter() - t0
    assert len(out) == len(texts)
    return len(texts) / dt


def _ours_rate(folder: Path, runtime: str, corpus: Path, work: Path) -> float:
    from kompakt.infer import batch
    from kompakt.infer.runtime import load_predictor

    args = argparse.Namespace(model=str(folder), task=None, runtime=runtime, device="auto", pooling="mean",
                              normalize=False, float16=False, max_length=MAX_LENGTH, truncate=True,
                              batch_tokens=None, rows_per_chunk=4096, text_field="text", id_field="id",
                              txt_document="line", threads=None)
    pred = load_predictor(folder, runtime=runtime, max_length=MAX_LENGTH)
    pred.predict(["varm opp"] * 8)  # warm-up, as the pipeline gets one
    out = work / f"out-{runtime}"
    shutil.rmtree(out, ignore_errors=True)
    batch.open_output(out, batch.settings_of(args, pred, [corpus]))
    num_rows = sum(1 for _ in open(corpus, encoding="utf-8"))
    t0 = time.perf_counter()
    rec = batch.run_shard(0, corpus, out, pred, args, batch.Progress(corpus.stat().st_size, f" [bench {runtime}]"))
    dt = time.perf_counter() - t0
    assert rec["rows"] + rec["rejected"] == num_rows
    return num_rows / dt


def _tokenize_rate(folder: Path, texts: list[str]) -> dict:
    from kompakt.infer.runtime import load_predictor

    pred = load_predictor(folder, runtime="torch")
    t0 = time.perf_counter()
    pred.encode(texts)
    dt = time.perf_counter() - t0
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"texts_per_s": round(len(texts) / dt, 1), "mb_per_s": round(nbytes / dt / 1e6, 2)}


def batch_throughput(texts: list[str], root: Path, quick: bool = False) -> dict:
    """The benchmark of the module docstring on `texts`; models are kept under root between runs."""
    import torch

    models = classifier_models(root / "models")
    repeats = 1 if quick else 2
    n = {"teacher-12x768": 64 if quick else 384, "student-4x312": 256 if quick else 2048}
    runtimes = ["torch"] if torch.cuda.is_available() else ["torch", "onnx", "onnx-int8"]
    rates: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=root) as work_s:
        work = Path(work_s)
        for name, folder in models.items():
            sub = (texts * (n[name] // max(len(texts), 1) + 1))[:n[name]]
            corpus = work / f"{name}.jsonl"
            with open(corpus, "w", encoding="utf-8") as f:
                for i, t in enumerate(sub):
                    f.write(json.dumps({"id": str(i), "text": t}, ensure_ascii=False) + "\n")
            sides = {"pipeline": lambda: _pipeline_rate(folder, sub)}
            for rt in (runtimes if name.startswith("student") else ["torch"]):
                sides[rt] = (lambda rt=rt: _ours_rate(folder, rt, corpus, work))
            best = {k: 0.0 for k in sides}
            for _ in range(repeats):
                for k, fn in sides.items():
                    best[k] = max(best[k], fn())
                    info(f"bench batch: {name} {k}: {best[k]:,.1f} rows/s (best so far)")
            rates[name] = best
        tok = _tokenize_rate(models["student-4x312"], texts[:4096])
    st, te = rates["student-4x312"], rates["teacher-12x768"]
    fastest = max((k for k in st if k != "pipeline"), key=lambda k: st[k])
    result = {
        "ratio": round(st[fastest] / st["pipeline"], 3), "ratio_runtime": fastest,
        "ratio_torch_fp32_same_model": round(st["torch"] / st["pipeline"], 3),
        "ratio_teacher_torch_fp32": round(te["torch"] / te["pipeline"], 3),
        **({"ratio_onnx_int8_same_model": round(st["onnx-int8"] / st["pipeline"], 3),
            "ratio_student_onnx_int8_over_teacher_pipeline": round(st["onnx-int8"] / te["pipeline"], 3)}
           if "onnx-int8" in st else {}),
        "rows_per_s": {m: {k: round(v, 1) for k, v in r.items()} for m, r in rates.items()},
        "tokenization": tok, "max_length": MAX_LENGTH, "pipeline_batch_size": PIPELINE_BATCH,
        "num_texts": n, "repeats": repeats, "torch_threads": torch.get_num_threads(),
    }
    rows = []
    for m, r in rates.items():
        for k, v in r.items():
            rows.append((m, "transformers.pipeline batch 32" if k == "pipeline" else f"kompakt infer {k}",
                         round(v, 1), round(v / r["pipeline"], 2)))
    table("bench batch: rows/s, same texts, same device", ["model", "runner", "rows/s", "over pipeline"], rows)
    info(f"bench batch: tokenisation {tok['texts_per_s']:,.0f} texts/s ({tok['mb_per_s']} MB/s)")
    return result


# ------------------------------------------------------------------------------------------------ serve

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of asking."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`kompakt serve FOLDER ARGS...` as a child process on a free port of 127.0.0.1, ready when constructed
    (its /ready answered 200) or an AssertionError with the server's last stderr; `stop()` ends it."""

    def __init__(self, folder: Path, *args, env: dict | None = None, ready_timeout_s: float = 180.0):
        import subprocess
        import sys

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "kompakt.cli", "serve", str(folder), "--port",
                                      str(self.port), *map(str, args)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"kompakt serve exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"kompakt serve did not become ready within {ready_timeout_s:g} s")

    def stats(self) -> dict:
        import httpx

        return httpx.get(self.url + "/stats", timeout=30).json()

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _post(reader, writer, path: str, body: bytes) -> int:
    """One HTTP/1.1 keep-alive POST on an open connection; the status code (the body is read and dropped)."""
    writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(h.split(b":", 1)[1]) for h in lines if h.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def _drive(url: str, texts: list[str], clients: int, num_requests: int) -> dict:
    """`num_requests` single-text POST /predict requests from `clients` concurrent keep-alive connections;
    rate and latency. The client is a few lines of asyncio streams rather than httpx: on a 2-core machine
    httpx's own CPU per request (about 1-2 ms) capped every server near 100 requests/s at 64 clients."""
    import asyncio

    host, port = url.rsplit("/", 1)[-1].split(":")
    bodies = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts]
    latencies: list[float] = []
    failures = next_i = 0
    limit = min(num_requests, 2 * clients)  # the warm-up round: connections opened, allocator settled
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(clients)]

    async def worker(reader, writer):
        nonlocal next_i, failures
        while next_i < limit:
            i = next_i
            next_i += 1
            t = time.perf_counter()
            status = await _post(reader, writer, "/predict", bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - t)
            failures += status != 200

    try:
        await asyncio.gather(*(worker(r, w) for r, w in conns))
        next_i, latencies, failures, limit = 0, [], 0, num_requests
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(r, w) for r, w in conns))
        dt = time.perf_counter() - t0
    finally:
        for _, w in conns:
            w.close()
    lat = sorted(latencies)
    return {"requests_per_s": num_requests / dt, "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "failed": failures,
            "requests": num_requests}


CONCURRENCY = (1, 8, 64)


def serve_throughput(texts: list[str], root: Path, quick: bool = False) -> dict:
    """`kompakt bench serve`: requests/s and p50/p99 latency of `kompakt serve` (dynamic batching, up to 64
    texts per pass, 5 ms window) against the same server with `--no-batching` (one request per forward pass),
    at 1, 8 and 64 concurrent clients sending one text each (the recipe's paragraphs, cut to 128 tokens).

    Models: the teacher (12x768) in torch fp32 and the student (4x312) in its fastest runtime (`--runtime auto`:
    ONNX Runtime int8 on CPU, torch bf16 on a GPU). Servers run as child processes on 127.0.0.1 with the
    load generator (httpx, asyncio) in this process, one server at a time; on a 2-core machine the client
    takes a share of the same cores, alike for both sides. `ratio`: batched over unbatched requests/s for the
    student at 64 clients.
    """
    import asyncio

    import httpx

    models = classifier_models(root / "models")
    runtimes = {"teacher-12x768": "torch", "student-4x312": "auto"}
    budget = {"teacher-12x768": 24 if quick else 96, "student-4x312": 96 if quick else 512}
    results: dict[str, dict] = {}
    rows = []
    for name, folder in models.items():
        results[name] = {}
        for mode, extra in (("batched", []), ("one-per-pass", ["--no-batching"])):
            srv = ServeProcess(folder, "--runtime", runtimes[name], "--max-length", MAX_LENGTH, *extra)
            try:
                runtime = httpx.get(srv.url + "/ready", timeout=10).json()["runtime"]
                per = {}
                for c in CONCURRENCY:
                    n = max(budget[name], 4 * c) if c > 1 else max(8, budget[name] // 4)
                    per[c] = asyncio.run(_drive(srv.url, texts, c, n))
                    info(f"bench serve: {name} {mode} ({runtime}) at {c} clients: "
                         f"{per[c]['requests_per_s']:,.1f} req/s, p50 {per[c]['p50_ms']:.1f} ms, "
                         f"p99 {per[c]['p99_ms']:.1f} ms")
                stats = srv.stats()
            finally:
                srv.stop()
            results[name][mode] = {"runtime": runtime, "mean_batch": stats["mean_batch"],
                                   "max_batch_seen": stats["max_batch_seen"],
                                   **{str(c): {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}
                                      for c, r in per.items()}}
            for c, r in per.items():
                rows.append((name, mode, runtime, c, round(r["requests_per_s"], 1), round(r["p50_ms"], 1),
                             round(r["p99_ms"], 1)))
    st = results["student-4x312"]
    ratios = {name: {str(c): round(r["batched"][str(c)]["requests_per_s"] / r["one-per-pass"][str(c)]["requests_per_s"], 3)
                     for c in CONCURRENCY} for name, r in results.items()}
    table("bench serve: single-text requests, kompakt serve vs one request per forward pass",
          ["model", "server", "runtime", "clients", "req/s", "p50 ms", "p99 ms"], rows)
    failed = sum(r[m][str(c)]["failed"] for r in results.values() for m in r for c in CONCURRENCY)
    return {"ratio": ratios["student-4x312"]["64"], "ratio_by_clients": ratios, "results": results,
            "student_runtime": st["batched"]["runtime"], "failed_requests": failed, "max_length": MAX_LENGTH,
            "concurrency": list(CONCURRENCY)}

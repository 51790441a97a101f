"""`kompakt serve MODEL`: an HTTP JSON API on FastAPI and uvicorn, with dynamic batching.

Endpoints:

- `POST /predict` with `{"texts": ["...", ...]}` (or `{"text": "..."}`) answers `{"results": [...]}`, one
  output per text as `kompakt.infer.runtime.Predictor.predict` gives it (embeddings as lists of floats).
- `GET /health`: 200 while the process serves HTTP (liveness). `GET /ready`: 200 once the model has answered a
  warm-up pass and the batching thread is alive, else 503 (readiness). `GET /stats`: counters, the batch-size
  histogram, latency percentiles and the process's resident memory.

Dynamic batching: one thread owns the model. It takes the first waiting request, then keeps taking requests
until `max_batch` texts are gathered or `max_wait_ms` has passed since the first arrived (5 ms on a GPU;
0 on CPU, where only the requests that queued while the model ran join), and runs them as one
`predict` call (cut into length-bucketed passes of up to 8,192 padded tokens on a GPU, 1,024 on CPU). Requests
wait for their answer on the event loop, so thousands of connections cost no threads. With `batching=False`
each request is its own forward pass: the baseline of `kompakt bench serve`.

Bad input is a 4xx with `{"error": "..."}` and never reaches the model: body not JSON or over the byte limit
(400/413), `texts` missing or not a list of strings (400/422), an empty text (422), more than `max_texts`
texts or a text over `max_chars` characters (413). Texts over the model's token limit are cut to it. A request
that waits longer than `timeout_s` gets 503, as does one arriving while `max_queue` texts already wait (load
shedding beats unbounded latency). With the environment variable `KOMPAKT_API_KEY` set, /predict and /stats
need `Authorization: Bearer <key>` (401 otherwise); /health and /ready stay open for probes.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import os
import queue
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kompakt.errors import ConfigError
from kompakt.log import info

API_KEY_ENV = "KOMPAKT_API_KEY"
LATENCY_WINDOW = 10_000  # latencies kept for the percentiles in /stats


@dataclass(frozen=True)
class Settings:
    """Limits and batching of one server (the `kompakt serve` options)."""

    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_texts: int = 64
    max_chars: int = 20_000
    timeout_s: float = 30.0
    batching: bool = True
    max_queue: int = 4096

    def __post_init__(self):
        for name in ("max_batch", "max_texts", "max_chars", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve: --{name.replace('_', '-')} must be at least 1")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ConfigError("serve: --max-wait-ms must be >= 0 and --timeout-s > 0")

    @property
    def max_body_bytes(self) -> int:
        # UTF-8 is at most 4 bytes a character; JSON escapes (\uXXXX) take 6 for some, so allow 6 plus framing.
        return self.max_texts * (self.max_chars * 6 + 16) + 1024


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_texts(body: bytes, settings: Settings) -> list[str]:
    """The texts of a /predict body, or BadRequest with the status and one line saying what is wrong."""
    if len(body) > settings.max_body_bytes:
        raise BadRequest(413, f"body of {len(body):,} bytes is over the limit of {settings.max_body_bytes:,}")
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest(400, 'body is not JSON; send {"texts": ["..."]}') from None
    if not isinstance(doc, dict) or ("texts" not in doc and "text" not in doc):
        raise BadRequest(400, 'body must be an object with "texts" (a list of strings) or "text" (a string)')
    texts = doc["texts"] if "texts" in doc else [doc["text"]]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest(422, '"texts" must be a list of strings')
    if not texts:
        raise BadRequest(422, '"texts" is empty')
    if len(texts) > settings.max_texts:
        raise BadRequest(413, f"{len(texts)} texts in one request, over the limit of {settings.max_texts}")
    for i, t in enumerate(texts):
        if not t.strip():
            raise BadRequest(422, f"text {i} is empty")
        if len(t) > settings.max_chars:
            raise BadRequest(413, f"text {i} has {len(t):,} characters, over the limit of {settings.max_chars:,}")
    return texts


def _jsonable(row: dict) -> dict:
    return {k: (v.astype(float).tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items()}


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc; 0.0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class Batcher:
    """The model's own thread: gathers waiting requests into batches (see the module docstring)."""

    def __init__(self, predictor, settings: Settings):
        self.predictor, self.settings = predictor, settings
        self.inbox: queue.Queue = queue.Queue()
        self.pending_texts = 0
        self._lock = threading.Lock()
        self.batch_sizes: collections.Counter = collections.Counter()
        self.num_requests = self.num_texts = self.num_passes = self.num_errors = 0
        self.ready = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kompakt-batcher", daemon=True)

    def start(self) -> None:
        self.predictor.predict(["warm-up"])  # the first pass allocates; do it before /ready says yes
        self.thread.start()
        self.ready.set()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)
        self.thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self.ready.is_set() and self.thread.is_alive()

    def submit(self, texts: list[str], loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        fut = loop.create_future()
        with self._lock:
            if self.pending_texts + len(texts) > self.settings.max_queue:
                raise BadRequest(503, f"overloaded: {self.pending_texts} texts waiting; retry shortly")
            self.pending_texts += len(texts)
        self.inbox.put((texts, fut, loop))
        return fut

    def _take(self) -> list[tuple] | None:
        first = self.inbox.get()
        if first is None:
            return None
        group, count = [first], len(first[0])
        if not self.settings.batching:
            return group
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while count < self.settings.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self.inbox.get(timeout=left) if left > 0 else self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stop.set()
                break
            if count + len(item[0]) > self.settings.max_batch:
                self.inbox.put(item)  # goes to the back: fine, the next batch starts within max_wait_ms
                break
            group.append(item)
            count += len(item[0])
        return group

    def _run(self) -> None:
        while not self._stop.is_set():
            group = self._take()
            if group is None:
                return
            texts = [t for item in group for t in item[0]]
            try:
                rows = [_jsonable(r) for r in self.predictor.predict(texts, truncate=True)]
                error = None
            except Exception as err:  # noqa: BLE001 - one bad batch answers 500 and the server goes on
                rows, error = None, err
            with self._lock:
                self.pending_texts -= len(texts)
                self.num_passes += 1
                self.num_texts += len(texts)
                self.num_requests += len(group)
                self.batch_sizes[len(texts)] += 1
                self.num_errors += error is not None
            start = 0
            for texts_i, fut, loop in group:
                part = rows[start:start + len(texts_i)] if rows is not None else error
                start += len(texts_i)
                loop.call_soon_threadsafe(_resolve, fut, part)


def _resolve(fut: asyncio.Future, value) -> None:
    if fut.done():  # the request timed out and went away
        return
    if isinstance(value, Exception):
        fut.set_exception(value)
    else:
        fut.set_result(value)


def build_app(predictor, settings: Settings, api_key: str | None = None):
    """The FastAPI app serving `predictor` with `settings`; its batching thread starts with the app."""
    batcher = Batcher(predictor, settings)
    latencies: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
    rejected: collections.Counter = collections.Counter()
    model_name = Path(predictor.folder).name

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.get_running_loop().run_in_executor(None, batcher.start)
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop)

    app = FastAPI(title=f"kompakt serve {model_name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        rejected[status] += 1
        return JSONResponse({"error": message}, status_code=status)

    def authorised(request: Request) -> bool:
        if not api_key:
            return True
        got = request.headers.get("authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), api_key.encode())

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if batcher.alive:
            return {"ready": True, "model": model_name, "task": predictor.task, "runtime": predictor.runtime}
        return JSONResponse({"ready": False}, status_code=503)

    @app.get("/stats")
    async def stats(request: Request):
        if not authorised(request):
            return error(401, f"missing or wrong API key (header 'Authorization: Bearer <{API_KEY_ENV}>')")
        lat = sorted(latencies)

        def pct(q):
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else None

        sizes = dict(sorted(batcher.batch_sizes.items()))
        return {"requests": batcher.num_requests, "texts": batcher.num_texts, "forward_passes": batcher.num_passes,
                "errors": batcher.num_errors, "rejected": {str(k): v for k, v in sorted(rejected.items())},
                "batch_sizes": {str(k): v for k, v in sizes.items()},
                "max_batch_seen": max(sizes) if sizes else 0,
                "mean_batch": round(batcher.num_texts / batcher.num_passes, 2) if batcher.num_passes else 0.0,
                "latency_ms": {"p50": pct(0.50), "p99": pct(0.99)}, "waiting_texts": batcher.pending_texts,
                "rss_mb": round(rss_mb(), 1), "batching": settings.batching}

    @app.post("/predict")
    async def predict(request: Request):
        t0 = time.perf_counter()
        if not authorised(request):
            return error(401, f"missing or wrong API key (header 'Authorization: Bearer <{API_KEY_ENV}>')")
        if not batcher.alive:
            return error(503, "the model is not ready")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            return error(413, f"body of {int(declared):,} bytes is over the limit of {settings.max_body_bytes:,}")
        try:
            texts = parse_texts(await request.body(), settings)
            fut = batcher.submit(texts, asyncio.get_running_loop())
        except BadRequest as bad:
            return error(bad.status, bad.message)
        try:
            rows = await asyncio.wait_for(fut, timeout=settings.timeout_s)
        except asyncio.TimeoutError:
            return error(503, f"no answer within {settings.timeout_s:g} s; the server is overloaded")
        except Exception as err:  # noqa: BLE001 - the model failed on this batch; say so, keep serving
            return error(500, f"the model failed on this batch: {type(err).__name__}: {str(err)[:200]}")
        latencies.append(time.perf_counter() - t0)
        return {"results": rows, "model": model_name, "task": predictor.task}

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or ConfigError (exit 2) when the port is taken or not allowed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        why = "is in use" if err.errno in (98, 48) else f"cannot be bound ({err.strerror})"
        raise ConfigError(f"serve: port {port} on {host} {why}; pick another with --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# On the 2-core Xeon (4x312 ONNX int8, single-text requests) a 5 ms window gave 349 req/s at 8 clients against
# 434 with none: a CPU pass costs the same per row at any batch size, so waiting only idles the model.
DEFAULT_WAIT_MS = {"cuda": 5.0, "cpu": 0.0}


def settings_of(args, device: str = "cpu") -> Settings:
    wait = args.max_wait_ms if args.max_wait_ms is not None else DEFAULT_WAIT_MS["cuda" if device == "cuda" else "cpu"]
    return Settings(max_batch=args.max_batch, max_wait_ms=wait, max_texts=args.max_texts,
                    max_chars=args.max_chars, timeout_s=args.timeout_s, batching=not args.no_batching)


def main(args) -> int:
    """The `kompakt serve` command (see kompakt/cli.py for its options)."""
    import uvicorn

    from kompakt.infer.batch import _predictor

    settings_of(args)  # option errors first
    sock = bind(args.host, args.port)  # a taken port fails at once, before minutes of model loading
    args.batch_tokens = None
    args.float16 = False
    predictor = _predictor(args)
    settings = settings_of(args, predictor.device.type)
    key = os.environ.get(API_KEY_ENV) or None
    app = build_app(predictor, settings, api_key=key)
    host, port = sock.getsockname()[:2]
    info(f"serve: {predictor.folder.name} ({predictor.task}, {predictor.runtime}) on http://{host}:{port} "
         f"(batching {'up to ' + str(settings.max_batch) + ' texts / ' + format(settings.max_wait_ms, 'g') + ' ms' if settings.batching else 'off'}"
         f"{', API key required' if key else ''})")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0

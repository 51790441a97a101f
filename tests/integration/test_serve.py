"""`kompakt serve` as a real process on 127.0.0.1, driven by real HTTP clients (httpx).

The model is the conftest's tiny classifier: every answer is checked against the same text predicted alone
in this process, so a batching mistake (rows of one batch handed to the wrong request, a padding error)
shows up as a wrong probability, not only as a lost request.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import toy_sentiment
from kompakt.infer.bench import ServeProcess as Server
from kompakt.infer.bench import free_port

KOMPAKT = [sys.executable, "-m", "kompakt.cli"]


@pytest.fixture(scope="module")
def folder(tiny_classifier, tmp_path_factory) -> Path:
    # A copy: the session fixture's folder must not gain files other tests would see.
    dst = tmp_path_factory.mktemp("serve") / "bert"
    shutil.copytree(tiny_classifier, dst)
    return dst


@pytest.fixture(scope="module")
def server(folder):
    srv = Server(folder, "--max-wait-ms", 20, "--max-texts", 8, "--max-chars", 500)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def expected(folder):
    from kompakt.infer.runtime import load_predictor

    pred = load_predictor(folder, runtime="torch")
    texts = [t for t, _ in toy_sentiment(48, seed=3)]
    return {t: pred.predict([t])[0] for t in texts}


async def _load(url: str, texts: list[str], num_clients: int, per_client: int) -> list[tuple[list[str], dict]]:
    limits = httpx.Limits(max_connections=num_clients, max_keepalive_connections=num_clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one(c: int):
            out = []
            for r in range(per_client):
                k = (c * per_client + r) % len(texts)
                batch = texts[k:k + 1 + (c + r) % 3]  # 1-3 texts per request
                resp = await client.post("/predict", json={"texts": batch})
                assert resp.status_code == 200, resp.text
                out.append((batch, resp.json()))
            return out

        done = await asyncio.gather(*(one(c) for c in range(num_clients)))
    return [x for part in done for x in part]


def _stats(server) -> dict:
    return httpx.get(server.url + "/stats", timeout=10).json()


def test_concurrent_clients_are_batched_and_all_answered_exactly(server, expected):
    texts = list(expected)
    before = _stats(server)
    t0 = time.monotonic()
    answers = asyncio.run(_load(server.url, texts, num_clients=48, per_client=5))
    assert time.monotonic() - t0 < 120
    assert len(answers) == 48 * 5
    for batch, doc in answers:
        assert len(doc["results"]) == len(batch)
        for text, got in zip(batch, doc["results"]):
            want = expected[text]
            assert got["label"] == want["label"]
            assert got["probs"] == pytest.approx(want["probs"], abs=1e-4)
    stats = _stats(server)
    assert stats["requests"] - before["requests"] == 48 * 5
    assert stats["errors"] == 0
    # Batching happened: with 48 clients in flight and a 20 ms window, forward passes carry several requests.
    assert stats["max_batch_seen"] > 3, stats
    assert (stats["texts"] - before["texts"]) / (stats["forward_passes"] - before["forward_passes"]) > 1.5, stats
    assert stats["latency_ms"]["p99"] is not None


def test_memory_is_stable_under_repeated_load(server, expected):
    texts = list(expected)
    asyncio.run(_load(server.url, texts, num_clients=32, per_client=4))  # allocator warm-up
    warm = _stats(server)["rss_mb"]
    for _ in range(3):
        asyncio.run(_load(server.url, texts, num_clients=32, per_client=4))
    after = _stats(server)["rss_mb"]
    assert warm > 0
    assert after - warm < 40, f"resident memory grew from {warm} to {after} MiB over 384 more requests"


@pytest.mark.parametrize("body, status, words", [
    (b"not json", 400, "not JSON"),
    (b'["a list"]', 400, '"texts"'),
    (b'{"texts": "one string"}', 422, "list of strings"),
    (b'{"texts": [1, 2]}', 422, "list of strings"),
    (b'{"texts": []}', 422, "empty"),
    (b'{"texts": ["fine", "   "]}', 422, "text 1 is empty"),
    (b'{"text": "' + b"x" * 501 + b'"}', 413, "over the limit of 500"),
    (b'{"texts": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}', 413, "9 texts"),
    (b"\xff\xfe\x00binary", 400, "not JSON"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_goes_on(server, expected, body, status, words):
    resp = httpx.post(server.url + "/predict", content=body, timeout=10)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]
    text = next(iter(expected))
    ok = httpx.post(server.url + "/predict", json={"text": text}, timeout=10)
    assert ok.status_code == 200 and ok.json()["results"][0]["label"] == expected[text]["label"]
    assert server.proc.poll() is None


def test_huge_body_is_refused_before_reading_it(server):
    resp = httpx.post(server.url + "/predict", content=b"x" * 5_000_000, timeout=30)
    assert resp.status_code == 413
    assert server.proc.poll() is None


def test_health_and_ready(server):
    assert httpx.get(server.url + "/health", timeout=5).json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready", timeout=5).json()
    assert ready["ready"] is True and ready["task"] == "classify" and ready["runtime"] == "torch"


def test_api_key_from_the_environment(folder, expected):
    srv = Server(folder, env={"KOMPAKT_API_KEY": "s3cret"})
    try:
        text = next(iter(expected))
        assert httpx.post(srv.url + "/predict", json={"text": text}, timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(srv.url + "/predict", json={"text": text}, headers=wrong, timeout=10).status_code == 401
        assert httpx.get(srv.url + "/stats", timeout=10).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        ok = httpx.post(srv.url + "/predict", json={"text": text}, headers=right, timeout=10)
        assert ok.status_code == 200 and ok.json()["results"][0]["label"] == expected[text]["label"]
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # probes need no key
    finally:
        srv.stop()


def test_no_batching_baseline_runs_one_request_per_pass(folder, expected):
    srv = Server(folder, "--no-batching")
    try:
        asyncio.run(_load(srv.url, list(expected), num_clients=16, per_client=3))
        stats = _stats(srv)
        assert stats["forward_passes"] == stats["requests"] == 48
    finally:
        srv.stop()


def test_port_in_use_and_wrong_folder_exit_2_with_one_line(server, tiny_bert):
    out = subprocess.run([*KOMPAKT, "serve", str(tiny_bert), "--port", str(server.port)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use" in lines[0], out.stderr
    out = subprocess.run([*KOMPAKT, "serve", str(tiny_bert), "--task", "classify", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "task 'classify' needs a fine-tuned" in lines[0], out.stderr

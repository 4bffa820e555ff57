"""`localcoder serve` as a real process (fake engine): startup log and readiness, the bind policy,
and a bounded load test (200 requests over 16 connections, a quarter cancelled midway)."""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_server_harness import fixture, free_port, wait_until

LOCALCODER = [sys.executable, "-m", "localcoder.cli"]


def start_serve(*flags: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([*LOCALCODER, "serve", "--engine", "fake", "--model", "fake", "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    assert wait_until(ready, timeout_s, 0.1)


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_serve_logs_model_engine_device_and_url_and_becomes_ready():
    proc, url = start_serve()
    try:
        wait_ready(url, proc)
        r = httpx.post(f"{url}/infill", json=fixture("llama_vim_infill"))
        assert r.json()["content"] == "return a + b\n".rstrip("\n")
    finally:
        err = stop(proc)
    assert "ready: model fake, engine fake, device cpu, FIM qwen, at " + url in err


def test_serve_refuses_a_public_bind_without_a_key():
    proc = subprocess.run([*LOCALCODER, "serve", "--engine", "fake", "--model", "fake", "--host", "0.0.0.0",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in proc.stderr


def test_serve_public_bind_with_key_file_requires_the_key(tmp_path):
    key = tmp_path / "key"
    key.write_text("k-123\n")
    proc, url = start_serve("--host", "0.0.0.0", "--api-key-file", str(key))
    try:
        wait_ready(url, proc)
        assert httpx.post(f"{url}/infill", json={"input_prefix": "a"}).status_code == 401
        ok = httpx.post(f"{url}/infill", json={"input_prefix": "a"}, headers={"Authorization": "Bearer k-123"})
        assert ok.status_code == 200
    finally:
        stop(proc)


def test_env_and_flags_follow_one_precedence(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("[server]\nmax_queue = 3\n[completion]\nmax_tokens = 5\n")
    proc, url = start_serve("--config", str(conf), "--max-tokens", "7", env={"LOCALCODER_MAX_TOKENS": "6"})
    try:
        wait_ready(url, proc)
        r = httpx.post(f"{url}/infill", json={"input_prefix": "a"}).json()
        assert r["tokens_predicted"] == 7  # flag > env > file
    finally:
        stop(proc)


async def _one(c: httpx.AsyncClient, i: int, cancel: bool) -> tuple[int | None, float]:
    body = {"prompt": f"# request {i}\ndef f{i}(a, b):\n    ", "suffix": "\n", "max_tokens": 32}
    t0 = time.monotonic()
    if i % 2:
        body["stream"] = True
    try:
        if cancel:
            await asyncio.wait_for(c.post("/v1/completions", json=body), timeout=random.uniform(0.005, 0.05))
            return 200, time.monotonic() - t0  # finished before we could cancel it
        r = await c.post("/v1/completions", json=body)
        return r.status_code, time.monotonic() - t0
    except asyncio.TimeoutError:
        return None, time.monotonic() - t0


async def _load(url: str, n: int, concurrency: int) -> list[tuple[int | None, float]]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def guarded(i: int):
            async with sem:
                return await _one(c, i, cancel=i % 4 == 0)

        return await asyncio.gather(*(guarded(i) for i in range(n)))


def test_bounded_load_with_cancellations_no_5xx_no_hang_memory_stable():
    random.seed(0)
    proc, url = start_serve("--max-queue", "32", env={"LOCALCODER_FAKE_DELAY_MS": "1",
                                                       "LOCALCODER_FAKE_COMPLETION": "return a + b  # sum\n"})
    try:
        wait_ready(url, proc)
        asyncio.run(_load(url, 50, 16))  # warm up allocators and caches
        before = rss_kib(proc.pid)
        t0 = time.monotonic()
        results = asyncio.run(_load(url, 200, 16))
        elapsed = time.monotonic() - t0
        after = rss_kib(proc.pid)
        statuses = [s for s, _ in results if s is not None]
        assert all(s == 200 for s in statuses), sorted(set(statuses))
        assert 140 <= len(statuses) < 200  # ~50 were cancelled by their clients
        assert max(t for _, t in results) < 30 and elapsed < 60  # nothing hung
        assert after - before < 20_000, (before, after)  # KiB
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        # /health answers 503 while the engine loads (wait_ready may poll it then): only the load counts
        assert not re.search(r'endpoint="/v1/completions",status="5', metrics), metrics
        assert "localcoder_queue_depth 0" in metrics
        assert 'localcoder_cancellations_total{reason="disconnect"}' in metrics
        assert wait_until(lambda: "localcoder_engine_busy 0" in httpx.get(f"{url}/metrics").text, 5)
    finally:
        stop(proc)


@pytest.mark.parametrize("flag", ["--port", "--max-queue"])
def test_bad_flag_values_fail_cleanly(flag):
    proc = subprocess.run([*LOCALCODER, "serve", "--engine", "fake", "--model", "fake", flag, "x"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "invalid int value" in proc.stderr

"""The engine client in-process: FIFO order, bounded queue, supersession by key, abort, background
prefill at the lowest priority, loading in the background; and the HTTP client's request body."""

from __future__ import annotations

import asyncio

import pytest

from localcoder.client import InProcessClient, complete, infill_body, result_from_infill
from localcoder.completion import Completer, InfillRequest
from localcoder.engines.base import Sampling
from localcoder.engines.fake import FakeEngine
from localcoder.errors import ModelNotFound, NotReady, QueueFull
from localcoder.fim.context import Budget
from localcoder.fim.formats import Snippet

LONG = "word " * 100


async def wait_for(cond, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.002)):
        if cond():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not reached")


def prefixes(engine: FakeEngine) -> list[str]:
    return [p.split("<|fim_prefix|>")[1].split("<|fim_suffix|>")[0] for p in engine.prompts]


async def test_runs_requests_in_order_and_bounds_the_queue():
    engine = FakeEngine(completion="ok\n", token_delay_s=0.02)
    client = InProcessClient(Completer(engine), max_queue=2)
    try:
        gens = [client.generate(InfillRequest("p0"))]
        await wait_for(engine.active.is_set)
        gens += [client.generate(InfillRequest(f"p{i}")) for i in (1, 2)]  # p0 runs, p1 and p2 wait
        assert client.depth == 2
        with pytest.raises(QueueFull) as err:
            client.generate(InfillRequest("more"))
        assert err.value.retry_after_s >= 1
        texts = []
        for gen in gens:
            async for delta in gen:
                if delta.result is not None:
                    texts.append(delta.result.text)
        assert texts == ["ok"] * 3
        assert prefixes(engine) == ["p0", "p1", "p2"]
    finally:
        await client.close()


async def test_a_newer_request_on_the_same_key_supersedes_the_running_one_within_a_token():
    engine = FakeEngine(completion=LONG, token_delay_s=0.01)
    client = InProcessClient(Completer(engine))
    try:
        first = asyncio.ensure_future(complete(client, InfillRequest("a", max_tokens=400), key="doc"))
        await wait_for(lambda: engine.tokens_generated_total >= 5)
        second = await complete(client, InfillRequest("b", max_tokens=3), key="doc")
        r1 = await first
        assert r1.stop_type == "cancelled" and second.text == "wor"
        assert engine.tokens_generated_total <= r1.timings.predicted_n + 1 + 3  # stopped within one token
        assert client.stats.superseded == 1 and client.stats.started == 2
    finally:
        await client.close()


async def test_waiting_requests_superseded_never_reach_the_engine_and_other_keys_are_untouched():
    engine = FakeEngine(completion="abc\n", token_delay_s=0.05)
    client = InProcessClient(Completer(engine))
    try:
        running = asyncio.ensure_future(complete(client, InfillRequest("run"), key="x"))
        await wait_for(engine.active.is_set)
        queued = asyncio.ensure_future(complete(client, InfillRequest("old"), key="y"))
        await asyncio.sleep(0.01)
        newer = asyncio.ensure_future(complete(client, InfillRequest("new"), key="y"))
        results = await asyncio.gather(running, queued, newer)
        assert [r.text for r in results] == ["abc", "", "abc"] and results[1].stop_type == "cancelled"
        assert prefixes(engine) == ["run", "new"] and client.stats.skipped == 1
    finally:
        await client.close()


async def test_abort_and_leaving_the_iterator_stop_the_engine():
    engine = FakeEngine(completion=LONG, token_delay_s=0.01)
    client = InProcessClient(Completer(engine))
    try:
        task = asyncio.ensure_future(complete(client, InfillRequest("a", max_tokens=400), key="k"))
        await wait_for(lambda: engine.tokens_generated_total >= 3)
        await client.abort("k")
        assert (await task).stop_type == "cancelled"
        await wait_for(lambda: not engine.active.is_set())
        gen = client.generate(InfillRequest("b", max_tokens=400))
        async for delta in gen:
            if engine.tokens_generated_total > 20:
                break
        await gen.aclose()
        await wait_for(lambda: not engine.active.is_set())
        settled = engine.tokens_generated_total
        await asyncio.sleep(0.05)
        assert engine.tokens_generated_total == settled < 60
        assert client.stats.aborted == 2
    finally:
        await client.close()


async def test_background_prefill_warms_the_cache_and_yields_to_any_real_request():
    engine = FakeEngine(completion="ok\n", token_delay_s=0.0)
    client = InProcessClient(Completer(engine))
    try:
        client.prefill(InfillRequest("def warm():\n    ", max_tokens=64), key="doc")
        await wait_for(lambda: client.stats.prefills == 1 and not client.busy and client.depth == 0)
        await wait_for(lambda: client._running is None)
        assert engine.tokens_generated_total == 0  # prefill only
        result = await complete(client, InfillRequest("def warm():\n    ", max_tokens=8), key="doc")
        # the whole prompt was cached (the last token is evaluated again for its logits)
        assert result.text == "ok" and result.tokens_evaluated <= 1 and result.tokens_cached >= 10
    finally:
        await client.close()


async def test_a_real_request_preempts_a_running_background_prefill():
    engine = FakeEngine(completion=LONG, token_delay_s=0.01)
    client = InProcessClient(Completer(engine))
    try:
        real = asyncio.ensure_future(complete(client, InfillRequest("busy", max_tokens=30)))
        await wait_for(engine.active.is_set)
        client.prefill(InfillRequest("warm me"), key="doc")  # waits: a real request runs
        await real
        # the prefill now runs (wait until the worker took it: a request sent before that would
        # simply go first); a slow prefill is preempted by the next real request
        await wait_for(lambda: (client._running is not None and client._running.background)
                       or client.stats.prefills >= 1)
        engine.token_delay_s = 0.0
        result = await complete(client, InfillRequest("next", max_tokens=2))
        assert result.text == "wo" and client.stats.prefills + client.stats.prefills_cancelled >= 1
        assert prefixes(engine)[-1] == "next"
    finally:
        await client.close()


async def test_a_jump_window_answer_is_posted_with_its_full_window_prefill_already_queued():
    """After a cursor jump the answer comes from the small window and the full one is prefilled in the
    background. That prefill is queued before the answer is posted, so anyone who has the answer also sees
    it in ``background`` (/health): the bench waits on it before timing another server on the same cores."""
    engine = FakeEngine(completion="ok\n", token_delay_s=0.0)
    engine.cached_prefix = lambda tokens, adapter=None: 0  # nothing cached anywhere: every request is a jump
    client = InProcessClient(Completer(engine, jump=Budget(8, 4, 0)))
    seen: list[tuple[bool, int]] = []
    finish = client._finish_locked

    def finishing(job, event):
        seen.append((job.background, client.background))
        finish(job, event)

    client._finish_locked = finishing
    try:
        result = await complete(client, InfillRequest(LONG, "tail " * 40, max_tokens=8), key="doc")
        assert result.timings.window == "jump" and result.prompt_tokens < 20
        assert seen[0] == (False, 1)  # the answer left with the full window's prefill queued
        generated = engine.tokens_generated_total
        await wait_for(lambda: client.stats.prefills == 1 and client.background == 0)
        assert engine.tokens_generated_total == generated  # the prefill generated nothing
    finally:
        await client.close()


async def test_loading_in_the_background_then_ready_or_failed():
    engine = FakeEngine(completion="ok\n")
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_factory() -> Completer:
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(5)
        return Completer(engine)

    client = InProcessClient(slow_factory)
    try:
        with pytest.raises(NotReady):
            client.generate(InfillRequest("x"))
        assert (await client.health())["status"] == "loading"
        gate.set()
        await client.wait_ready(5)
        assert (await complete(client, InfillRequest("x"))).text == "ok"
        health = await client.health()
        assert health["status"] == "ok" and health["engine"] == "fake" and health["queue_depth"] == 0
    finally:
        await client.close()

    def missing() -> Completer:
        raise ModelNotFound("no such model: nope")

    failed = InProcessClient(missing)
    with pytest.raises(ModelNotFound):
        await failed.wait_ready(5)
    with pytest.raises(ModelNotFound):
        failed.generate(InfillRequest("x"))
    assert (await failed.health())["status"] == "error"
    await failed.close()


def test_the_http_body_carries_everything_the_local_path_uses():
    req = InfillRequest("def f(", ")\n", snippets=[Snippet("b.py", "x = 1\n")], path="a.py", repo="proj",
                        language="python", mode="single", max_tokens=7, time_budget_ms=300, stop=["\n\n"],
                        sampling=Sampling(temperature=0.2, top_k=5, top_p=0.9, seed=3), indent=4,
                        budget=Budget(100, 20, 30))
    body = infill_body(req)
    assert body["input_prefix"] == "def f(" and body["input_suffix"] == ")\n" and body["stream"] is True
    assert body["input_extra"] == [{"filename": "b.py", "text": "x = 1\n"}]
    assert (body["path"], body["repo"], body["language"], body["mode"]) == ("a.py", "proj", "python", "single")
    assert (body["n_predict"], body["t_max_predict_ms"], body["stop"], body["n_indent"]) == (7, 300, ["\n\n"], 4)
    assert (body["temperature"], body["top_k"], body["top_p"], body["seed"]) == (0.2, 5, 0.9, 3)
    assert (body["prefix_tokens"], body["suffix_tokens"], body["extra_tokens"]) == (100, 20, 30)
    final = {"stop": True, "stop_reason": "line", "truncated": True,
             "timings": {"prompt_n": 5, "cache_n": 10, "predicted_n": 2, "prompt_ms": 1.5, "predicted_ms": 2.0}}
    r = result_from_infill(final, "ab", req)
    assert (r.text, r.stop_type, r.truncated, r.prompt_tokens, r.tokens_cached, r.tokens_evaluated) == \
        ("ab", "line", True, 15, 10, 5)

"""Cache slots, cancelled and prefill-only requests on the real llama.cpp engine (packaged 0.5B).

One engine with ``cache_slots = 3`` (the ModelConfig default) serves every test; the *cold* reference is
the session's one-slot engine asked with ``cache_prompt=False`` (the whole prompt evaluated). Every warm
output must be the cold greedy output (token for token; see ``assert_same_greedy`` for the one numeric
allowance), the timings must show what was reused, and after every request each slot's token record must
match what llama.cpp holds for that sequence (positions 0..len-1, nothing more; state size to match).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from localcoder.completion import Completer, InfillRequest
from localcoder.engines.base import CancelToken, GenerationRequest, Timings
from localcoder.engines.kvcache import common_prefix_len

pytestmark = pytest.mark.integration

SLOTS = 3
N_CTX = 1024
MAX_TOKENS = 8

# Four small files, each with its cursor inside a function (prefix above it, suffix below); their
# prompts share only the FIM header, so a request for one never goes to another's slot by similarity.
DOCS = {
    "a": ("import math\n\n\ndef circle_area(radius):\n    \"\"\"Area of a circle.\"\"\"\n    return ",
          "\n\n\ndef circle_perimeter(radius):\n    return 2 * math.pi * radius\n\n\nprint(circle_area(2.0))\n"),
    "b": ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
          "        self.items.append(item)\n\n    def pop(self):\n        ",
          "\n\n    def __len__(self):\n        return len(self.items)\n"),
    "c": ("#include <stdio.h>\n\nint sum(const int *xs, int n) {\n    int total = 0;\n    for (int i = 0; ",
          "\n    return total;\n}\n\nint main(void) {\n    int xs[] = {1, 2, 3};\n"
          "    printf(\"%d\\n\", sum(xs, 3));\n}\n"),
    "d": ("function greet(name) {\n  const message = ", "\n  console.log(message);\n}\n"),
}


class CancelAtPoll(CancelToken):
    """A cancel that fires by itself at the ``n``-th time the engine polls it (deterministic: the
    engine polls once before each prefill chunk and once before each token)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.polls = n, 0

    @property
    def cancelled(self) -> bool:
        self.polls += 1
        if self.polls >= self.n:
            self.cancel()
        return self._event.is_set()


@pytest.fixture(scope="module")
def engine(model_05b_path):
    from localcoder.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(model_05b_path, n_ctx=N_CTX, n_threads=min(2, os.cpu_count() or 2),
                         model_name="qwen2.5-coder-0.5b", cache_slots=SLOTS)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def completer(engine) -> Completer:
    return Completer(engine)


@pytest.fixture(scope="module")
def spm(engine) -> Completer:
    """The append-only layout (our ``spm``: the cursor's prefix comes last), as a layout adapter declares it."""
    return Completer(engine, order="spm", model_orders=("spm",))


@pytest.fixture(scope="module")
def prompts(completer):
    return {k: completer.prompt(InfillRequest(p, s))[0] for k, (p, s) in DOCS.items()}


def run(eng, prompt, *, max_tokens: int = MAX_TOKENS, **kw) -> tuple[list[int], Timings]:
    """Greedy generation of ``prompt`` (a ``healing.Prompt``, its heal included) until the FIM stop tokens."""
    stops = Completer(eng).format.stop_ids(eng.tokenizer)
    stream = eng.generate(GenerationRequest(tokens=list(prompt), max_tokens=max_tokens, stop_token_ids=stops,
                                            heal=getattr(prompt, "heal", None), **kw))
    out = list(stream)
    return out, stream.timings


class Cold:
    """Greedy outputs of cold evaluations (no KV reuse at all) on a separate one-slot engine, memoised."""

    def __init__(self, ref) -> None:
        self.ref, self._outs = ref, {}
        self.stops = Completer(ref).format.stop_ids(ref.tokenizer)

    def __call__(self, prompt) -> list[int]:
        key = (tuple(prompt), prompt.heal.text if getattr(prompt, "heal", None) else None)
        if key not in self._outs:
            out, t = run(self.ref, prompt, cache_prompt=False)
            assert t.cached_n == 0 and t.evaluated_n == len(prompt)
            self._outs[key] = out
        return self._outs[key]

    def same(self, out: list[int], prompt) -> bool:
        """``out`` is the cold greedy output of ``prompt`` (see assert_same_greedy)."""
        assert_same_greedy(out, self(prompt), prompt, self.ref, self.stops, MAX_TOKENS)
        return True


@pytest.fixture(scope="module")
def cold(llama_engine) -> Cold:
    return Cold(llama_engine)


# llama.cpp's CPU kernels are not batch-invariant: a position evaluated in a batch of 1-2 tokens (decode,
# or the few new tokens of a warm request) takes another matmul path than in a long prefill batch, and its
# logits move by up to ~0.6 (measured on the packaged 0.5B: 39-token prompt evaluated whole vs 38 + 1,
# max |delta logit| 0.40; with the CPU repack buffers off, 0.55). Greedy outputs can therefore part at a
# near tie. Wrong reuse (stale or another file's tokens) moves logits by far more than this.
NEAR_TIE = 1.0
partings: list[tuple[int, float]] = []  # (index, margin) of every accepted near-tie parting, for the report


def ref_logits(ref, tokens) -> "np.ndarray":
    """Logits after ``tokens`` from the reference engine, evaluated from scratch."""
    ref.reset_cache()
    for i in range(0, len(tokens), ref.n_batch):
        row = ref._forward(0, list(tokens[i: i + ref.n_batch]))
    return row.copy()


def assert_same_greedy(got: list[int], want: list[int], prompt, ref, stops=frozenset(), max_tokens: int = 0) -> None:
    """``got`` equals the cold greedy ``want`` token for token; the one allowance: they may part at a
    position where ``ref`` (evaluating prompt + the shared tokens from scratch) rates the two choices
    within NEAR_TIE of each other (an output that ended on a stop token chose its best stop id)."""
    i = common_prefix_len(got, want)
    if got == want:
        return
    assert not (max_tokens and i >= max_tokens), "outputs differ after max_tokens?"
    row = ref_logits(ref, list(prompt) + want[:i])
    best_stop = max(stops, key=lambda t: row[t]) if stops else None
    a = want[i] if i < len(want) else best_stop
    b = got[i] if i < len(got) else best_stop
    assert a is not None and b is not None and a != b
    margin = float(abs(row[a] - row[b]))
    assert margin < NEAR_TIE, f"outputs part at token {i} where the cold logits differ by {margin:.2f}: {got} vs {want}"
    partings.append((i, margin))


def assert_consistent(eng) -> None:
    """Slot count, memory stats, and each slot's record against llama.cpp's own view of its sequence."""
    lib = eng._lib
    info = eng.cache_info()
    assert info["slots"] == SLOTS and len(eng.slots) == SLOTS and len(info["slot_tokens"]) == SLOTS
    assert info["kv_bytes_total"] == SLOTS * info["kv_bytes_per_slot"] == SLOTS * N_CTX * info["kv_bytes_per_token"]
    empty_state = None
    for s, cache in enumerate(eng.slots.slots):
        n = len(cache.tokens)
        assert n <= eng.n_ctx
        assert info["slot_tokens"][s] == n
        assert lib.llama_memory_seq_pos_max(eng._memory, s) == n - 1, f"slot {s}: KV cells past its record"
        if n:
            assert lib.llama_memory_seq_pos_min(eng._memory, s) == 0
        size = lib.llama_state_seq_get_size(eng.ctx.ctx, s)  # bytes llama.cpp would save for this sequence
        if not n:
            empty_state = size if empty_state is None else empty_state
            assert size == empty_state
        else:  # its K/V cells and nothing more: about n tokens' worth
            assert n * info["kv_bytes_per_token"] <= size <= (n + 64) * info["kv_bytes_per_token"] + 4096


def slot_of(eng, prompt) -> int | None:
    hits = [i for i, c in enumerate(eng.slots.slots) if c.tokens[: len(prompt) - 1] == list(prompt)[:-1]]
    assert len(hits) <= 1
    return hits[0] if hits else None


def header_len(prompts) -> int:
    """Tokens every document's prompt shares (the FIM marker at the start)."""
    ps = list(prompts.values())
    return min(common_prefix_len(ps[0], p) for p in ps[1:])


def test_switching_back_to_a_file_reuses_its_slot(engine, prompts, cold):
    engine.reset_cache()
    a, b = prompts["a"], prompts["b"]
    out_a, t_a = run(engine, a)
    out_b, t_b = run(engine, b)
    assert t_b.cached_n <= header_len(prompts)  # B did not take A's tokens
    assert slot_of(engine, a) is not None and slot_of(engine, b) not in (None, slot_of(engine, a))
    out_a2, t_a2 = run(engine, a)
    assert t_a2.cached_n == len(a) - 1 and t_a2.evaluated_n == 1  # only the last prompt token again
    assert cold.same(out_a, a) and cold.same(out_a2, a) and cold.same(out_b, b)
    assert len(out_a) > 2 and out_a != out_b
    assert_consistent(engine)


def test_more_files_than_slots_evicts_the_least_recently_used(engine, prompts, cold):
    engine.reset_cache()
    a, b, c, d = (prompts[k] for k in "abcd")
    assert len(d) < len(a)  # d reuses a's cells: a shorter prompt must not leave a's tail behind
    for p in (a, b, c):
        out, t = run(engine, p)
        assert cold.same(out, p) and t.cached_n <= header_len(prompts)
        assert_consistent(engine)
    slot_a = slot_of(engine, a)
    out, t = run(engine, d)  # a full table: d goes to the least recently used slot, a's
    assert cold.same(out, d) and t.cached_n <= header_len(prompts)
    assert slot_of(engine, a) is None and slot_of(engine, d) == slot_a
    assert_consistent(engine)
    out, t = run(engine, b)  # still cached
    assert cold.same(out, b) and t.evaluated_n == 1
    out, t = run(engine, a)  # evicted: read again, into c's slot (now the least recently used)
    assert cold.same(out, a) and t.cached_n <= header_len(prompts)
    assert slot_of(engine, c) is None
    for p in (d, b, a):  # the three most recent all cached
        out, t = run(engine, p)
        assert cold.same(out, p) and t.evaluated_n == 1
        assert_consistent(engine)
    assert sum(engine.cache_info()["slot_tokens"]) <= SLOTS * N_CTX


@pytest.mark.parametrize("where", ["early", "late"])
def test_an_edit_above_the_cursor_is_never_answered_from_stale_tokens(engine, completer, prompts, cold, where):
    engine.reset_cache()
    prefix, suffix = DOCS["b"]
    if where == "early":  # the class name: the slot no longer matches (under the similarity threshold)
        edited = prefix.replace("class Stack:", "class LifoStack:")
    else:  # the last method's name, just above the cursor: the slot matches, its tail must go
        edited = prefix.replace("def pop(self)", "def pop_last(self)")
    assert edited != prefix
    old, new = prompts["b"], completer.prompt(InfillRequest(edited, suffix))[0]
    shared = common_prefix_len(old, new)
    run(engine, prompts["a"])
    run(engine, old)
    out, t = run(engine, new)
    assert t.cached_n <= shared  # nothing after the edit reused
    if where == "late":
        assert t.cached_n == shared > len(new) // 2  # and everything before it reused
    assert cold.same(out, new)
    assert_consistent(engine)
    out, t = run(engine, old)  # and back: the original text is not served the edit's cells either
    assert cold.same(out, old)
    assert_consistent(engine)


def test_cancel_during_a_long_prefill_leaves_the_slots_consistent(engine, completer, prompts, cold):
    engine.reset_cache()
    long_prefix = "".join(f"def helper_{i}(x):\n    return x * {i} + {i * i}\n\n\n" for i in range(14))
    long = completer.prompt(InfillRequest(long_prefix + "def main():\n    total = ", "\n    print(total)\n"))[0]
    assert len(long) > 6 * 32
    out_b, _ = run(engine, prompts["b"])
    stream = engine.generate(GenerationRequest(tokens=list(long), max_tokens=MAX_TOKENS, chunk_tokens=32,
                                               cancel=CancelAtPoll(4), heal=long.heal))
    assert list(stream) == [] and stream.timings.cancelled
    partial = [c for c in engine.slots.slots if len(c.tokens) > header_len(prompts)
               and c.tokens == list(long)[: len(c.tokens)]]
    assert len(partial) == 1 and len(partial[0].tokens) == 3 * 32  # three chunks evaluated, then the cancel
    assert_consistent(engine)
    out, t = run(engine, long)  # resumes from the evaluated chunks
    assert t.cached_n == 3 * 32
    assert cold.same(out, long)
    out, t = run(engine, prompts["b"])  # the other slot untouched
    assert t.evaluated_n == 1 and out == out_b and cold.same(out, prompts["b"])
    assert_consistent(engine)


def test_cancel_after_the_first_tokens_keeps_a_usable_slot(engine, prompts, cold):
    engine.reset_cache()
    a = prompts["a"]
    stream = engine.generate(GenerationRequest(tokens=list(a), max_tokens=MAX_TOKENS, cancel=CancelAtPoll(4),
                                               heal=a.heal))
    got = list(stream)
    assert stream.timings.cancelled and 1 <= len(got) < len(cold(a))
    assert got == cold(a)[: len(got)]
    assert_consistent(engine)
    out, t = run(engine, a)
    assert t.evaluated_n == 1 and cold.same(out, a)


def test_a_prefill_only_request_makes_the_real_one_evaluate_only_new_tokens(engine, spm, cold):
    engine.reset_cache()
    prefix, suffix = "def parse_header(line):\n    key, _, value = line.partition(':')\n    ", \
        "\n    return key.strip(), value\n"
    warm = spm.prompt(InfillRequest(prefix, suffix))[0]
    stream = engine.generate(GenerationRequest(tokens=list(warm), max_tokens=0, chunk_tokens=32, heal=warm.heal))
    assert list(stream) == [] and stream.timings.evaluated_n == len(warm) and not stream.timings.cancelled
    assert_consistent(engine)
    out, t = run(engine, warm)  # the same position: the prefill did it all
    assert t.evaluated_n == 1 and cold.same(out, warm)
    engine.reset_cache()
    run(engine, warm, max_tokens=0, chunk_tokens=32)
    typed = spm.prompt(InfillRequest(prefix + "value = ", suffix))[0]  # then the user types
    shared = common_prefix_len(warm, typed)
    out, t = run(engine, typed)
    assert t.cached_n == shared and t.evaluated_n == len(typed) - shared <= 5
    assert cold.same(out, typed)
    assert_consistent(engine)


def test_typing_at_the_end_of_an_append_only_prompt_evaluates_only_what_was_typed(engine, spm, cold):
    engine.reset_cache()
    suffix = "\n    return result\n\n\nprint(scale([1, 2, 3], 2))\n"
    above = "def scale(values, factor):\n    result = []\n    for v in values:\n        "
    typed = "result.append"
    prev = None
    evaluated = []
    for n in range(1, len(typed) + 1, 4):
        p = spm.prompt(InfillRequest(above + typed[:n], suffix))[0]
        out, t = run(engine, p)
        if prev is not None:
            shared = common_prefix_len(prev, p)
            assert t.cached_n == min(shared, len(p) - 1)  # everything up to the cursor's last tokens reused
            assert t.evaluated_n <= 6  # four characters typed between requests
            evaluated.append(t.evaluated_n)
        assert cold.same(out, p)
        prev = p
    assert sum(evaluated) < len(prev) // 4
    assert_consistent(engine)


def _jump_case():
    """A cursor in the middle of a real file (the stdlib's textwrap.py), on a fresh line inside a method."""
    import textwrap as module

    text = open(module.__file__, encoding="utf-8").read()
    cut = text.index("\n", len(text) // 2) + 1
    return text[:cut] + "        ", text[cut:]


def test_after_a_jump_the_small_window_answers_then_the_full_one_takes_over(engine, cold):
    """CompletionConfig.jump_*: with the full window cold, a request is answered from the jump window (its
    greedy output, evaluated alone); a warm-up prefills the jump window first, in a slot it keeps, then the
    full one; once the full window is warm it is the one used again, and it gives the cold greedy output."""
    import asyncio
    import dataclasses

    from localcoder.client import InProcessClient, complete
    from localcoder.fim.context import Budget

    engine.reset_cache()
    full_budget, jump_budget = Budget(384, 96, 0), Budget(96, 32, 0)
    jumpy = Completer(engine, order="spm", model_orders=("spm",), budget=full_budget, jump=jump_budget)
    prefix, suffix = _jump_case()
    req = InfillRequest(prefix, suffix, max_tokens=MAX_TOKENS, mode="single")
    full = jumpy.prompt(req)[0]
    small = jumpy.prompt(dataclasses.replace(req, budget=jump_budget))[0]
    assert len(small) < len(full) // 2
    picked = jumpy.jump_window(req, full)
    assert picked is not None and list(picked[0]) == list(small)

    # a real request on a cold engine: the jump window, evaluated whole
    result = jumpy.complete(req)
    assert result.timings.window == "jump" and result.prompt_tokens == len(small)
    assert result.timings.evaluated_n == len(small) and slot_of(engine, small) is not None
    out, t = run(engine, small)  # the same position again: nothing to evaluate but the last token
    assert t.evaluated_n == 1 and cold.same(out, small)

    # a warm-up at that place (what the client queues after a jump-window answer): the full window next to it
    engine.reset_cache()
    jumpy.complete(dataclasses.replace(req, max_tokens=0))
    assert slot_of(engine, small) is not None and slot_of(engine, full) is not None
    assert slot_of(engine, small) != slot_of(engine, full)
    assert_consistent(engine)
    assert jumpy.jump_window(req, full) is None  # the full window is warm: it is the one used
    warm = jumpy.complete(req)
    assert warm.timings.window == "full" and warm.prompt_tokens == len(full) and warm.timings.evaluated_n <= 2
    out, t = run(engine, full)
    assert cold.same(out, full)

    # through the engine client: a jump-window answer queues the full window's prefill, run when idle
    engine.reset_cache()

    async def flow() -> tuple[str, int]:
        client = InProcessClient(jumpy)
        try:
            answer = await complete(client, req)
            for _ in range(600):  # the background prefill of ~480 tokens: seconds
                if client.stats.prefills and client._running is None and not client._background:
                    break
                await asyncio.sleep(0.1)
            return answer.timings.window, client.stats.prefills
        finally:
            client.shutdown()

    window, prefills = asyncio.run(flow())
    assert window == "jump" and prefills == 1
    assert slot_of(engine, full) is not None and slot_of(engine, small) is not None
    assert_consistent(engine)


def test_a_cancel_stops_a_background_prefill_inside_its_chunk(engine, completer, cold):
    """llama.cpp's abort callback (set for prefill-only requests): a real request's cancel stops a warm-up in
    the middle of a chunk, not after it; the aborted chunk leaves no KV cells and no record, the chunks
    before it stay, and the next request there gives the cold greedy output."""
    import threading
    import time

    engine.reset_cache()
    long_prefix = "".join(f"def helper_{i}(x):\n    return x * {i} + {i * i}\n\n\n" for i in range(24))
    long = completer.prompt(InfillRequest(long_prefix + "def main():\n    total = ", "\n    print(total)\n"))[0]
    chunk = 256
    assert len(long) > chunk + 64
    first = engine.generate(GenerationRequest(tokens=list(long)[:chunk], max_tokens=0, chunk_tokens=chunk))
    t0 = time.perf_counter()
    assert list(first) == []
    one_chunk_s = time.perf_counter() - t0  # what a whole chunk of this size takes here
    cancel = CancelToken()
    stream = engine.generate(GenerationRequest(tokens=list(long), max_tokens=0, chunk_tokens=chunk, cancel=cancel))
    timer = threading.Timer(one_chunk_s / 5, cancel.cancel)
    timer.start()
    t0 = time.perf_counter()
    assert list(stream) == []
    stopped_after = time.perf_counter() - t0
    timer.join()
    assert stream.timings.cancelled
    assert stopped_after < one_chunk_s * 0.6, (stopped_after, one_chunk_s)  # stopped inside the chunk
    (slot,) = [c for c in engine.slots.slots if c.tokens[:chunk] == list(long)[:chunk]]
    kept = len(slot.tokens)
    assert kept == chunk  # the first request's chunk, not the aborted one
    assert_consistent(engine)
    out, t = run(engine, long)
    assert t.cached_n == kept and cold.same(out, long)
    assert_consistent(engine)

"""The one Engine protocol every backend implements, and the types it speaks.

An engine turns a token prompt into a stream of token ids. It knows nothing about FIM, editors or
HTTP: prompt formats live in ``localcoder.fim``, stop rules in ``localcoder.completion``.

Contract:
- ``generate(request)`` returns a ``TokenStream``; iterating it evaluates what the KV cache does not
  already hold (longest common token prefix with the previous request), then decodes one token per
  step. ``stream.timings`` is filled as it goes.
- ``request.cancel.cancel()`` from any thread stops the stream before the next token (and between
  prefill chunks); the engine is then free for the next request.
- An engine is used by one generation at a time; callers serialise (see ``server`` / ``lsp``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    from localcoder.engines.speculative import Speculation
    from localcoder.fim.healing import Heal


class Aborted(Exception):
    """A backend stopped evaluating a prefill chunk midway because the request was cancelled (llama.cpp's
    abort callback); it keeps what it evaluated before that chunk, and drops the chunk."""


class CancelToken:
    """Thread-safe flag that a running generation polls between tokens."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 40
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GenerationRequest:
    tokens: list[int]
    max_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    stop_token_ids: frozenset[int] = frozenset()
    cancel: CancelToken = field(default_factory=CancelToken)
    cache_prompt: bool = True  # False: evaluate the whole prompt (no KV reuse)
    chunk_tokens: int = 0  # prefill chunk size (0 = the engine's batch); small for background prefill
    heal: "Heal | None" = None  # token healing: the first tokens must spell heal.text (localcoder.fim.healing)
    adapter: int | None = None  # a specialist bundle's adapter (localcoder.specialists); None: the engine's default
    keep_slot: bool = False  # a warm-up the next request will use (a jump window): not a slot later warm-ups take first


@dataclass
class Timings:
    prompt_n: int = 0  # tokens in the prompt
    cached_n: int = 0  # of those, reused from the KV cache
    prompt_ms: float = 0.0  # time to evaluate the uncached part
    predicted_n: int = 0
    predicted_ms: float = 0.0
    cancelled: bool = False
    stopped_by_token: bool = False  # a stop token ended generation
    draft_n: int = 0  # speculative decoding: drafted tokens verified by the target
    draft_accepted_n: int = 0  # of those, accepted (equal to the target's own choice)
    target_forwards: int = 0  # target forwards during speculative decoding (tokens per forward)
    reused: bool = False  # answered from the suggestion the user typed into, without the model (localcoder.typed)
    specialist: str | None = None  # the specialist adapter a bundle routed the request to (localcoder.specialists)
    route_ms: float = 0.0  # choosing it (0 when the document already had one)
    adapter_switch_ms: float = 0.0  # setting it on the engine's context (0 when it was already set)
    window: str = "full"  # "jump": the small first window after a cursor jump (localcoder.completion)

    @property
    def evaluated_n(self) -> int:
        return self.prompt_n - self.cached_n

    def to_dict(self) -> dict[str, float | int]:
        def rate(n: float, ms: float) -> float:
            return round(1000.0 * n / ms, 2) if ms > 0 else 0.0

        routed = {"specialist": self.specialist, "route_ms": round(self.route_ms, 3),
                  "adapter_switch_ms": round(self.adapter_switch_ms, 3)} if self.specialist is not None else {}
        return {
            "prompt_n": self.evaluated_n,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_second": rate(self.evaluated_n, self.prompt_ms),
            "predicted_n": self.predicted_n,
            "predicted_ms": round(self.predicted_ms, 3),
            "predicted_per_second": rate(self.predicted_n, self.predicted_ms),
            "cache_n": self.cached_n,
            "draft_n": self.draft_n,
            "draft_n_accepted": self.draft_accepted_n,
            "tokens_per_forward": round((self.predicted_n - 1) / self.target_forwards, 3)
            if self.target_forwards else 0.0,
            "typed_through": self.reused,
            "window": self.window,
            **routed,
        }


StopFn = Callable[[int, list[int]], bool]  # (index of the sequence in its group, its tokens) -> stop it


@dataclass
class SampleGroup:
    """One prompt's share of an engine's ``sample_groups`` (llama.cpp: ``LlamaCppEngine.sample_groups``): ``n`` sequences continuing ``prompt``,
    sequence i sampled with ``sampling`` at seed ``sampling.seed + i``, each ending at ``max_tokens``,
    when ``stop(i, tokens)`` says so, or at a token of ``stop_token_ids`` (not kept). Groups of one
    call share a decode, so their prompts should share a long token prefix."""

    prompt: list[int]
    n: int
    sampling: Sampling
    max_tokens: int
    stop: StopFn | None = None
    stop_token_ids: frozenset[int] = frozenset()


class TokenStream:
    """Iterator of generated token ids with live ``timings``. Built from a generator function
    that receives the Timings to fill."""

    def __init__(self, run: Callable[[Timings], Iterator[int]]):
        self.timings = Timings()
        self._it = run(self.timings)

    def __iter__(self) -> Iterator[int]:
        return self._it

    def __next__(self) -> int:
        return next(self._it)

    def close(self) -> None:
        self._it.close()  # type: ignore[attr-defined]


@runtime_checkable
class Tokenizer(Protocol):
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``. With special=False, strings such as ``<|fim_prefix|>`` are plain
        text (no injection); with special=True they become their special tokens."""

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (may be part of a UTF-8 character). Special tokens give their text."""

    def special_token_id(self, text: str) -> int | None:
        """Id of a special (control) token written as ``text``, or None when the vocab lacks it."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...


@runtime_checkable
class Engine(Protocol):
    name: str  # backend name: llama | torch | onnx | fake
    model_name: str
    device: str
    n_ctx: int
    tokenizer: Tokenizer

    def generate(self, request: GenerationRequest) -> TokenStream: ...

    def reset_cache(self) -> None: ...

    def close(self) -> None: ...

    # Optional: ``counters() -> dict[str, float]``, numbers named like Prometheus series
    # (``remote_requests_total``), exported by ``/metrics`` and shown by the LSP's stats.


def check_request(request: GenerationRequest, n_ctx: int) -> None:
    from localcoder.errors import ContextTooLong, InvalidRequest

    if not request.tokens:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if request.max_tokens < 0:
        raise InvalidRequest("max_tokens must be >= 0", param="max_tokens")
    if request.chunk_tokens < 0:
        raise InvalidRequest("chunk_tokens must be >= 0", param="chunk_tokens")
    if len(request.tokens) + request.max_tokens > n_ctx:
        raise ContextTooLong(
            f"prompt ({len(request.tokens)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
            f"context window of {n_ctx} tokens",
            param="prompt",
        )


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0


def run_tokens(request: GenerationRequest, timings: Timings, keep: int, n_batch: int,
               forward: Callable[[list[int]], "object"], reset: Callable[[], None],
               spec: "Speculation | None" = None) -> Iterator[int]:
    """The token loop every backend shares.

    Evaluates ``request.tokens[keep:]`` in chunks of ``n_batch`` with ``forward(ids) -> (V,) logits
    of the last position`` (the backend appends to its KV cache), then samples one token per step,
    feeding it back through ``forward``. Checks cancellation between prefill chunks and between
    tokens; fills ``timings``. ``reset`` drops the backend's cache if evaluation fails midway.
    ``spec`` (a backend that can verify drafts in one batch) turns on speculative decoding at greedy.
    """
    import numpy as np

    from localcoder.engines.sampling import sample_token

    prompt = request.tokens
    timings.prompt_n, timings.cached_n = len(prompt), keep
    clock = Stopwatch()
    logits = None
    try:
        chunk = min(n_batch, request.chunk_tokens or n_batch)
        for i in range(keep, len(prompt), chunk):
            if request.cancel.cancelled:
                timings.cancelled = True
                return
            logits = forward(prompt[i: i + chunk])
            timings.prompt_ms = clock.ms()
    except Aborted:  # a cancel stopped the backend inside a chunk: it kept the chunks before it
        timings.cancelled = True
        return
    except BaseException:
        reset()
        raise
    rng = np.random.default_rng(request.sampling.seed)

    healer = request.heal.start() if request.heal is not None else None

    def choose(row, step: int) -> int:  # the one token choice, for plain and speculative decoding
        if healer is not None:  # token healing: mask the tokens that do not spell what was backed off
            return healer.choose(row, step, lambda r: sample_token(r, request.sampling, rng))
        return sample_token(row, request.sampling, rng)  # type: ignore[arg-type]

    clock = Stopwatch()
    if spec is not None and request.sampling.temperature <= 0 and request.max_tokens > 0:
        from localcoder.engines.speculative import decode

        yield from decode(request, timings, logits, forward, spec, choose, clock)  # type: ignore[arg-type]
        return
    for step in range(request.max_tokens):
        if request.cancel.cancelled:
            timings.cancelled = True
            return
        token = choose(logits, step)
        timings.predicted_n += 1
        if token in request.stop_token_ids:
            timings.stopped_by_token = True
            timings.predicted_ms = clock.ms()
            return
        yield token
        if step + 1 < request.max_tokens:
            logits = forward([token])
        timings.predicted_ms = clock.ms()

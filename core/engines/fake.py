"""A deterministic engine for tests: byte-level tokenizer, Qwen-style special tokens, scripted output.

It honours the whole Engine contract (KV prefix reuse with reported cached tokens, cancellation
between tokens, timings), so server and LSP tests exercise real control flow without a model.
Configure from the environment when it runs in another process:
``LOCALCODER_FAKE_COMPLETION`` (text to generate) and ``LOCALCODER_FAKE_DELAY_MS`` (per token).
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Iterator

from localcoder.engines.base import GenerationRequest, Stopwatch, Timings, TokenStream, check_request
from localcoder.engines.kvcache import PrefixCache

SPECIALS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
            "<|repo_name|>", "<|file_sep|>"]


class ByteTokenizer:
    """Ids 0-255 are bytes; 256+ are the special tokens above."""

    def __init__(self, specials: list[str] = SPECIALS):
        self.specials = {s: 256 + i for i, s in enumerate(specials)}
        self._by_id = {i: s for s, i in self.specials.items()}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        if not special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for part in self._split.split(text):
            ids.extend([self.specials[part]] if part in self.specials else part.encode("utf-8"))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < 256:
            return bytes([token_id])
        return self._by_id[token_id].encode("utf-8")

    def special_token_id(self, text: str) -> int | None:
        return self.specials.get(text)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({self.specials["<|endoftext|>"]})

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


class FakeEngine:
    name = "fake"
    device = "cpu"

    def __init__(self, completion: str | None = None, token_delay_s: float | None = None, n_ctx: int = 1 << 20):
        self.model_name = "fake"
        self.n_ctx = n_ctx
        self.tokenizer = ByteTokenizer()
        env_text = os.environ.get("LOCALCODER_FAKE_COMPLETION")
        self.completion = completion if completion is not None else (env_text if env_text is not None else "return a + b\n")
        delay_ms = os.environ.get("LOCALCODER_FAKE_DELAY_MS")
        self.token_delay_s = token_delay_s if token_delay_s is not None else (float(delay_ms) / 1000 if delay_ms else 0.0)
        self.cache = PrefixCache()
        self.prompts: list[str] = []  # decoded prompts, for tests to inspect
        self.tokens_generated_total = 0  # decode steps actually run (cancellation tests read it)
        self.active = threading.Event()  # set while a generation is running

    def generate(self, request: GenerationRequest) -> TokenStream:
        check_request(request, self.n_ctx)
        return TokenStream(lambda timings: self._run(request, timings))

    def _run(self, request: GenerationRequest, timings: Timings) -> Iterator[int]:
        self.active.set()
        try:
            prompt = request.tokens
            keep = self.cache.plan(prompt) if request.cache_prompt else 0
            clock = Stopwatch()
            self.cache.truncate(keep)
            self.cache.extend(prompt[keep:])
            self.prompts.append(self.tokenizer.decode(prompt))
            timings.prompt_n, timings.cached_n, timings.prompt_ms = len(prompt), keep, clock.ms()
            output = self.tokenizer.tokenize(self.completion) + sorted(self.tokenizer.eos_token_ids)
            clock = Stopwatch()
            for token in output[: request.max_tokens]:
                if request.cancel.cancelled:
                    timings.cancelled = True
                    return
                if self.token_delay_s:
                    time.sleep(self.token_delay_s)
                self.tokens_generated_total += 1
                self.cache.extend([token])
                timings.predicted_n += 1
                timings.predicted_ms = clock.ms()
                if token in request.stop_token_ids:
                    timings.stopped_by_token = True
                    return
                yield token
        finally:
            self.active.clear()

    def reset_cache(self) -> None:
        self.cache.clear()

    def close(self) -> None:
        self.cache.clear()

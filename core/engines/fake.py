"""A deterministic engine for tests: byte-level tokenizer, Qwen-style special tokens, scripted output.

It drives the shared ``run_tokens`` loop with a scripted forward (logits that put all the mass on the
next scripted token), so it honours the whole Engine contract the real backends do (KV prefix reuse
with reported cached tokens, cancellation between tokens, timings, token healing), and server and
LSP tests exercise real control flow without a model. ``words`` add multi-byte tokens to the
byte vocabulary (greedy longest match), for tests of what a cursor that splits a token does.
Configure from the environment when it runs in another process:
``LOCALCODER_FAKE_COMPLETION`` (text to generate) and ``LOCALCODER_FAKE_DELAY_MS`` (per token).
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from localcoder.engines.base import GenerationRequest, Timings, TokenStream, check_request, run_tokens
from localcoder.engines.kvcache import PrefixCache

SPECIALS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
            "<|repo_name|>", "<|file_sep|>"]


class ByteTokenizer:
    """Ids 0-255 are bytes; 256+ are the special tokens above; then ``words`` (multi-byte tokens)."""

    def __init__(self, specials: list[str] = SPECIALS, words: Sequence[str | bytes] = ()):
        self.specials = {s: 256 + i for i, s in enumerate(specials)}
        self._by_id = {i: s for s, i in self.specials.items()}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")
        base = 256 + len(specials)
        encoded = (w if isinstance(w, bytes) else w.encode("utf-8") for w in words)  # bytes: part of a character
        self.words = {w: base + i for i, w in enumerate(dict.fromkeys(encoded))}
        self._word_bytes = {i: w for w, i in self.words.items()}
        self._longest = max(map(len, self.words), default=0)

    @property
    def n_vocab(self) -> int:
        return 256 + len(self.specials) + len(self.words)

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        if not special:
            return self._plain(text.encode("utf-8"))
        ids: list[int] = []
        for part in self._split.split(text):
            ids.extend([self.specials[part]] if part in self.specials else self._plain(part.encode("utf-8")))
        return ids

    def _plain(self, data: bytes) -> list[int]:
        if not self.words:
            return list(data)
        ids, i = [], 0
        while i < len(data):
            n = next((n for n in range(min(self._longest, len(data) - i), 1, -1) if data[i: i + n] in self.words), 1)
            ids.append(self.words[data[i: i + n]] if n > 1 else data[i])
            i += n
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < 256:
            return bytes([token_id])
        if token_id in self._word_bytes:
            return self._word_bytes[token_id]
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
    n_batch = 64  # prefill chunk, so chunked prefill and cancellation between chunks run here too

    def __init__(self, completion: str | None = None, token_delay_s: float | None = None, n_ctx: int = 1 << 20,
                 words: Sequence[str | bytes] = ()):
        self.model_name = "fake"
        self.n_ctx = n_ctx
        self.tokenizer = ByteTokenizer(words=words)
        env_text = os.environ.get("LOCALCODER_FAKE_COMPLETION")
        self.completion = completion if completion is not None else (env_text if env_text is not None else "return a + b\n")
        delay_ms = os.environ.get("LOCALCODER_FAKE_DELAY_MS")
        self.token_delay_s = token_delay_s if token_delay_s is not None else (float(delay_ms) / 1000 if delay_ms else 0.0)
        self.cache = PrefixCache()
        self.prompts: list[str] = []  # decoded prompts, for tests to inspect
        self.active = threading.Event()  # set while a generation is running
        self._lock = threading.Lock()
        self._finished_tokens = 0
        self._running: Timings | None = None

    @property
    def tokens_generated_total(self) -> int:
        """Decode steps actually run, over all generations (cancellation tests read it)."""
        with self._lock:
            return self._finished_tokens + (self._running.predicted_n if self._running else 0)

    def counters(self) -> dict[str, float]:
        return {"engine_tokens_generated": self.tokens_generated_total}

    def generate(self, request: GenerationRequest) -> TokenStream:
        check_request(request, self.n_ctx)
        return TokenStream(lambda timings: self._run(request, timings))

    def _run(self, request: GenerationRequest, timings: Timings) -> Iterator[int]:
        self.active.set()
        with self._lock:
            self._running = timings
        try:
            prompt = request.tokens
            keep = self.cache.plan(prompt) if request.cache_prompt else 0
            self.cache.truncate(keep)
            self.prompts.append(self.tokenizer.decode(prompt))
            script = self.tokenizer.tokenize(self.completion) + sorted(self.tokenizer.eos_token_ids)
            yield from run_tokens(request, timings, keep, self.n_batch,
                                  lambda ids: self._forward(request, script, ids), self.cache.clear)
        finally:
            with self._lock:
                self._finished_tokens += timings.predicted_n
                self._running = None
            self.active.clear()

    def _forward(self, request: GenerationRequest, script: list[int], ids: list[int]) -> np.ndarray:
        """Append ``ids`` to the cache; logits (V,) with all the mass on the next scripted token (the
        script is followed by position: the n-th generated token is the n-th of the script)."""
        self.cache.extend(ids)
        generated = len(self.cache.tokens) - len(request.tokens)
        if generated >= 0 and request.max_tokens > 0 and self.token_delay_s:
            time.sleep(self.token_delay_s)  # the cost of one decode step
        logits = np.full(self.tokenizer.n_vocab, -1e4, dtype=np.float32)
        logits[script[min(max(generated, 0), len(script) - 1)]] = 0.0
        return logits

    def reset_cache(self) -> None:
        self.cache.clear()

    def close(self) -> None:
        self.cache.clear()

"""llama.cpp backend (llama-cpp-python): CPU, or CUDA when the wheel is built with it.

Drives the model token by token through ``Llama.eval`` so it can (a) reuse the KV cache for the
longest common token prefix with the previous prompt, (b) stop between prefill chunks and between
decoded tokens when cancelled, and (c) time prefill and decode separately.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from localcoder.engines.base import GenerationRequest, Timings, TokenStream, check_request, run_tokens
from localcoder.engines.kvcache import PrefixCache
from localcoder.errors import BackendUnavailable, ModelCorrupt


def _import_llama():
    try:
        import llama_cpp
    except ImportError as exc:  # the [llama] extra is not installed
        raise BackendUnavailable("the llama.cpp engine needs llama-cpp-python",
                                 hint="pip install 'localcoder[llama]'") from exc
    return llama_cpp


class LlamaTokenizer:
    def __init__(self, llm) -> None:
        import llama_cpp

        self._llm = llm
        self._lib = llama_cpp
        self._vocab = llm._model.vocab
        self.prompt_start: list[int] = [llm.token_bos()] if self._lib.llama_vocab_get_add_bos(self._vocab) else []
        eog = {self._lib.llama_vocab_eos(self._vocab), self._lib.llama_vocab_eot(self._vocab)}
        self._eos = frozenset(t for t in eog if t >= 0)
        self.token_bytes = lru_cache(maxsize=None)(self._piece)

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        if not text:
            return []
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _piece(self, token_id: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_token_to_piece(self._vocab, token_id, buf, 256, 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token_id, buf, -n, 0, True)
        return buf.raw[:n]

    @lru_cache(maxsize=256)
    def special_token_id(self, text: str) -> int | None:
        ids = self.tokenize(text, special=True)
        if len(ids) != 1 or self.tokenize(text, special=False) == ids:
            return None
        return ids[0]

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos


class LlamaCppEngine:
    name = "llama"

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int = 0,
                 n_batch: int = 512, gpu_layers: int = -1, device: str = "auto", model_name: str | None = None):
        llama_cpp = _import_llama()
        path = Path(model_path)
        if not path.is_file():
            raise ModelCorrupt(f"model file not found: {path}")
        threads = n_threads or max(1, (os.cpu_count() or 2))
        gpu = llama_cpp.llama_supports_gpu_offload() and device != "cpu"
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                n_threads_batch=threads, n_gpu_layers=gpu_layers if gpu else 0, logits_all=False,
                verbose=False, flash_attn=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelCorrupt(f"llama.cpp could not load {path}: {exc}",
                               hint="re-fetch it with `localcoder models pull --force`") from exc
        self.model_name = model_name or path.stem
        self.device = "cuda" if gpu else "cpu"
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.threads = threads
        self.tokenizer = LlamaTokenizer(self.llm)
        self.cache = PrefixCache()
        self._n_vocab = self.llm.n_vocab()
        self._get_logits = llama_cpp.llama_get_logits_ith

    def generate(self, request: GenerationRequest) -> TokenStream:
        check_request(request, self.n_ctx)
        return TokenStream(lambda timings: self._run(request, timings))

    def _logits(self) -> np.ndarray:
        """(V,) logits of the last evaluated token (a view into llama.cpp's buffer)."""
        return np.ctypeslib.as_array(self._get_logits(self.llm.ctx, -1), shape=(self._n_vocab,))

    def _forward(self, tokens: list[int]) -> np.ndarray:
        self.llm.eval(tokens)
        self.cache.extend(tokens)
        return self._logits()

    def _run(self, request: GenerationRequest, timings: Timings) -> Iterator[int]:
        keep = self.cache.plan(request.tokens) if request.cache_prompt else 0
        self.llm.n_tokens = keep  # llama's eval drops the KV cells from here on
        self.cache.truncate(keep)
        yield from run_tokens(request, timings, keep, self.n_batch, self._forward, self._drop_cache)

    def _drop_cache(self) -> None:
        self.llm.n_tokens = 0
        self.cache.clear()

    def reset_cache(self) -> None:
        self._drop_cache()

    def close(self) -> None:
        self.llm.close()

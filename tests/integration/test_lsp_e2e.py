"""End-to-end sessions against a real `localcoder lsp` process (fake engine: exact, fast)."""

from __future__ import annotations

import asyncio
import tempfile

import pytest
import pytest_lsp
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient

from lsp_helpers import (edit, fake_server, inline_params, init_params, open_doc, raw_request, ready_stats,
                         server_env)

CONFIG_HOME = tempfile.mkdtemp(prefix="lc-lsp-cfg-")
URI = "file:///work/proj/add.py"
SOURCE = "def add(a, b):\n    \n"


@pytest_lsp.fixture(config=ClientServerConfig(server_command=fake_server("--debounce-ms", "40"),
                                              server_env=server_env(CONFIG_HOME)))
async def client(lsp_client: LanguageClient):
    await lsp_client.initialize_session(init_params())
    yield
    await lsp_client.shutdown_session()


async def stats(client: LanguageClient) -> dict:
    return await ready_stats(client)


async def test_stats_reports_the_engine_and_no_heavy_imports(client: LanguageClient):
    result = await stats(client)
    assert result["engine"] == "fake" and result["heavy_modules"] == []


async def test_initialize_advertises_inline_completion():
    cfg = ClientServerConfig(server_command=fake_server(), server_env=server_env(CONFIG_HOME))
    c = await cfg.start()
    try:
        res = await c.initialize_session(init_params())
        caps = res.capabilities
        assert caps.inline_completion_provider is not None
        assert caps.text_document_sync.change == types.TextDocumentSyncKind.Incremental
        assert caps.completion_provider is not None and "." in caps.completion_provider.trigger_characters
        assert "localcoder.generateDocstring" in caps.execute_command_provider.commands
        assert caps.position_encoding == types.PositionEncodingKind.Utf16
        await c.shutdown_session()
    finally:
        await c.stop()


@pytest.mark.parametrize("automatic", [False, True])
async def test_inline_completion_for_both_trigger_kinds(client: LanguageClient, automatic: bool):
    open_doc(client, URI, SOURCE)
    res = await client.text_document_inline_completion_async(inline_params(URI, 1, 4, automatic))
    [item] = res.items
    assert item.insert_text == "return a + b"
    assert item.range == types.Range(types.Position(1, 4), types.Position(1, 4))
    assert item.command.command == "localcoder.accepted"


async def test_completion_fallback_replaces_the_word_before_the_cursor(client: LanguageClient):
    # emoji before the cursor: UTF-16 columns must line up (😀 = 2 units)
    text = "x = '😀'; re\n"
    open_doc(client, URI, text)
    res = await client.text_document_completion_async(types.CompletionParams(
        types.TextDocumentIdentifier(URI), types.Position(0, 12),
        context=types.CompletionContext(trigger_kind=types.CompletionTriggerKind.Invoked)))
    assert res.is_incomplete is True
    [item] = res.items
    assert item.text_edit.range == types.Range(types.Position(0, 10), types.Position(0, 12))
    assert item.text_edit.new_text == "re" + "return a + b"


async def test_incremental_edits_then_completion_at_the_new_position(client: LanguageClient):
    open_doc(client, URI, "import os\r\n")
    edit(client, URI, 2, (1, 0), (1, 0), "s = '😀'\r\ndef add(a, b):\r\n    ")
    res = await client.text_document_inline_completion_async(inline_params(URI, 3, 4))
    assert res.items[0].insert_text == "return a + b"
    assert res.items[0].range.start == types.Position(3, 4)


async def test_unknown_document_is_an_invalid_params_error(client: LanguageClient):
    with pytest.raises(JsonRpcException) as err:
        await client.text_document_inline_completion_async(inline_params("file:///nope.py", 0, 0))
    assert err.value.code == -32602 and "file:///nope.py" in err.value.message


async def test_position_past_the_end_is_an_invalid_params_error(client: LanguageClient):
    open_doc(client, URI, SOURCE)
    with pytest.raises(JsonRpcException) as err:
        await client.text_document_inline_completion_async(inline_params(URI, 40, 0))
    assert err.value.code == -32602 and "past the end" in err.value.message
    # a character past the end of a line means the end of that line (LSP spec)
    res = await client.text_document_inline_completion_async(inline_params(URI, 1, 400))
    assert res.items[0].range.start == types.Position(1, 400) or res.items[0].insert_text


async def test_malformed_params_get_an_error_response_and_the_server_lives(client: LanguageClient):
    open_doc(client, URI, SOURCE)
    bad = [
        {"textDocument": {"uri": URI}},  # no position, no context
        {"textDocument": {"uri": URI}, "position": {"line": -1, "character": 0}, "context": {"triggerKind": 1}},
        {"textDocument": {"uri": URI}, "position": {"line": "one", "character": 0}, "context": {"triggerKind": 1}},
        {"textDocument": {"uri": URI}, "position": {"line": 0, "character": 0}, "context": {"triggerKind": 7}},
    ]
    for params in bad:
        with pytest.raises(JsonRpcException) as err:
            await raw_request(client, "textDocument/inlineCompletion", params)
        assert err.value.code == -32602, params
    res = await client.text_document_inline_completion_async(inline_params(URI, 1, 4))
    assert res.items[0].insert_text == "return a + b"


async def test_settings_from_did_change_configuration(client: LanguageClient):
    open_doc(client, URI, SOURCE)
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"localcoder": {"maxTokens": 3, "mode": "single"}}))
    res = await client.text_document_inline_completion_async(inline_params(URI, 1, 4))
    assert res.items[0].insert_text == "ret"  # the fake engine's tokens are bytes
    # a bad value is reported once and the old settings stay
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"maxTokens": "many"}))
    await asyncio.sleep(0.3)
    assert any("maxTokens" in m.message for m in client.messages)
    res = await client.text_document_inline_completion_async(inline_params(URI, 1, 4))
    assert res.items[0].insert_text == "ret"


async def test_accept_reject_and_stats(client: LanguageClient):
    open_doc(client, URI, SOURCE)
    first = await client.text_document_inline_completion_async(inline_params(URI, 1, 4))
    second = await client.text_document_inline_completion_async(inline_params(URI, 1, 4))
    # acceptance arrives as the item's command (VS Code, Neovim 0.12 run it) ...
    cmd = first.items[0].command
    await client.workspace_execute_command_async(types.ExecuteCommandParams(cmd.command, cmd.arguments))
    # ... the same id again as a notification is not double counted
    client.protocol.notify("localcoder/accepted", {"id": cmd.arguments[0]})
    client.protocol.notify("localcoder/rejected", {"id": second.items[0].command.arguments[0]})
    await asyncio.sleep(0.2)
    s = await stats(client)
    assert (s["shown"], s["accepted"], s["rejected"]) == (2, 1, 1)
    assert s["accepted_chars"] == len("return a + b") and s["acceptance_rate"] == 0.5


async def test_tcp_transport(tmp_path):
    import json
    import subprocess
    import time

    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen(fake_server("--tcp", f"127.0.0.1:{port}"), env=server_env(CONFIG_HOME),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                assert time.monotonic() < deadline, "the TCP server did not come up"
                await asyncio.sleep(0.1)
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                           "params": {"processId": None, "rootUri": None, "capabilities": {}}}).encode()
        writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        header = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        length = int(header.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        reply = json.loads(await reader.readexactly(length))
        assert reply["id"] == 1 and "inlineCompletionProvider" in reply["result"]["capabilities"]
        writer.close()
    finally:
        proc.terminate()
        proc.wait(10)

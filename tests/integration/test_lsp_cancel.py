"""Cancellation through the real `localcoder lsp`: storms of requests, $/cancelRequest; nothing leaks.

The fake engine decodes one byte-token every 10 ms, so a 300-character completion takes ~3 s; the
server's stats expose the engine's decode-step counter, which must stop moving after a cancel.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid

import pytest
import pytest_lsp
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient

from lsp_helpers import fake_server, inline_params, init_params, open_doc, ready_stats, request, server_env

LONG = "x = 1  # " + "y" * 300 + "\n"
URI = "file:///work/proj/storm.py"
ENV = server_env(tempfile.mkdtemp(prefix="lc-lsp-cfg-"), LOCALCODER_FAKE_COMPLETION=LONG,
                 LOCALCODER_FAKE_DELAY_MS="10")


@pytest_lsp.fixture(config=ClientServerConfig(server_command=fake_server("--debounce-ms", "50", "--max-tokens", "400"),
                                              server_env=ENV))
async def client(lsp_client: LanguageClient):
    await lsp_client.initialize_session(init_params())
    yield
    await lsp_client.shutdown_session()


async def tokens_settle(client: LanguageClient) -> tuple[dict, int]:
    """Stats once the engine is idle, and the decode-step count 400 ms later (must be equal).
    A cancelled generation stops before its next token: allow one token time (10 ms) first."""
    await asyncio.sleep(0.1)
    s1 = await request(client, "localcoder/stats", {})
    await asyncio.sleep(0.4)
    s2 = await request(client, "localcoder/stats", {})
    return s2, s2["engine_tokens_generated"] - s1["engine_tokens_generated"]


async def test_storm_of_50_requests_only_the_last_answers(client: LanguageClient):
    open_doc(client, URI, "import os\n")
    before = await ready_stats(client)
    tasks = []
    for i in range(50):  # a person typing very fast: each keystroke's request supersedes the last
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            types.VersionedTextDocumentIdentifier(uri=URI, version=i + 2),
            [types.TextDocumentContentChangePartial(
                range=types.Range(types.Position(1, i), types.Position(1, i)), text="a")]))
        tasks.append(asyncio.ensure_future(
            client.text_document_inline_completion_async(inline_params(URI, 1, i + 1, automatic=True))))
        await asyncio.sleep(0.005)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert [len(r.items) for r in results[:-1]] == [0] * 49
    assert results[-1].items[0].insert_text == LONG.rstrip("\n")
    s, moved_after = await tokens_settle(client)
    assert moved_after == 0  # no generation left running
    assert s["superseded"] - before["superseded"] == 49
    assert s["generations"] - before["generations"] <= 3  # the debounce swallowed the rest
    # the only full generation is the last one: 300+ tokens, not 50 x 300
    assert s["engine_tokens_generated"] - before["engine_tokens_generated"] < 2 * len(LONG)


async def test_a_newer_invoked_request_stops_the_running_generation(client: LanguageClient):
    open_doc(client, URI, "import os\n")
    first = asyncio.ensure_future(client.text_document_inline_completion_async(inline_params(URI, 1, 0)))
    await asyncio.sleep(0.5)  # the first is decoding now
    second = await client.text_document_inline_completion_async(inline_params(URI, 1, 0))
    assert list((await first).items) == []
    assert second.items[0].insert_text == LONG.rstrip("\n")
    s, moved_after = await tokens_settle(client)
    assert moved_after == 0
    # the first stopped after ~0.5 s of decoding: far fewer than two full completions
    assert s["engine_tokens_generated"] < len(LONG) + 150


async def test_cancel_request_really_stops_the_engine(client: LanguageClient):
    open_doc(client, URI, "import os\n")
    await ready_stats(client)  # loaded, so the cancel lands mid-generation (on a busy machine loading takes > 0.5 s)
    msg_id = str(uuid.uuid4())
    fut = asyncio.wrap_future(client.protocol.send_request(
        types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(URI, 1, 0), msg_id=msg_id))
    await asyncio.sleep(0.5)
    client.protocol.notify("$/cancelRequest", types.CancelParams(id=msg_id))
    with pytest.raises(JsonRpcException) as err:
        await asyncio.wait_for(fut, 10)
    assert err.value.code == types.LSPErrorCodes.RequestCancelled
    s, moved_after = await tokens_settle(client)
    assert moved_after == 0
    assert 0 < s["engine_tokens_generated"] < len(LONG) // 2
    assert s["cancelled"] == 1
    # and the server still answers
    res = await client.text_document_inline_completion_async(inline_params(URI, 1, 0))
    assert res.items[0].insert_text == LONG.rstrip("\n")

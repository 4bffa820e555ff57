"""`localcoder lsp --server-url`: the LSP's engine client talks to a real `localcoder serve` (uvicorn on
127.0.0.1, fake engine decoding one byte-token every 10 ms). Superseding or cancelling an LSP request
must stop the *server's* engine within about one token, and the request must carry the file's path,
language, mode and budget just as the in-process path does."""

from __future__ import annotations

import asyncio
import tempfile

import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from lsp_helpers import fake_server, inline_params, init_params, open_doc, server_env
from test_server_harness import fake_completer, running_server

LONG = "x = 1  # " + "y" * 300 + "\n"
URI = "file:///work/proj/pkg/storm.py"
TOKEN_S = 0.01


async def settle(engine) -> int:
    """The server's decode-step counter once it stops moving (a cancelled generation stops at once)."""
    await asyncio.sleep(0.1)
    before = engine.tokens_generated_total
    await asyncio.sleep(0.3)
    assert engine.tokens_generated_total == before, "the server's engine kept decoding"
    return before


async def decoding(engine, tokens: int) -> None:
    """Until the server's engine has decoded ``tokens`` tokens of the running generation."""
    for _ in range(500):
        if engine.tokens_generated_total >= tokens:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the server's engine never reached {tokens} tokens")


async def start_lsp(url: str) -> LanguageClient:
    cfg = ClientServerConfig(server_command=fake_server("--server-url", url, "--max-tokens", "400",
                                                        "--debounce-ms", "0"),
                             server_env=server_env(tempfile.mkdtemp(prefix="lc-lsp-cfg-")))
    client = await cfg.start()
    await client.initialize_session(init_params())
    return client


async def test_superseding_in_server_url_mode_stops_the_servers_engine_within_a_token():
    completer, engine = fake_completer(LONG, delay_s=TOKEN_S)
    with running_server(completer) as url:
        client = await start_lsp(url)
        try:
            open_doc(client, URI, "import os\n")
            first = asyncio.ensure_future(client.text_document_inline_completion_async(inline_params(URI, 1, 0)))
            await decoding(engine, 20)
            at_supersede = engine.tokens_generated_total
            second = asyncio.ensure_future(client.text_document_inline_completion_async(inline_params(URI, 1, 0)))
            assert list((await asyncio.wait_for(first, 10)).items) == []
            done = await asyncio.wait_for(second, 20)
            assert done.items[0].insert_text == LONG.rstrip("\n")
            total = await settle(engine)
            # the first generation stopped within a few tokens of being superseded (one token plus the
            # loopback round trip), not after its 300 tokens
            first_tokens = total - len(LONG.rstrip("\n")) - 1
            assert at_supersede <= first_tokens <= at_supersede + 15
            # the request carried what the in-process path uses
            prompt = engine.prompts[-1]
            assert "pkg/storm.py" in prompt and "import os\n" in prompt
            await client.shutdown_session()
        finally:
            await client.stop()


async def test_cancel_request_in_server_url_mode_stops_the_servers_engine():
    completer, engine = fake_completer(LONG, delay_s=TOKEN_S)
    with running_server(completer) as url:
        client = await start_lsp(url)
        try:
            open_doc(client, URI, "import os\n")
            fut = asyncio.wrap_future(client.protocol.send_request(
                types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(URI, 1, 0), msg_id="c1"))
            await decoding(engine, 20)
            client.protocol.notify("$/cancelRequest", types.CancelParams(id="c1"))
            try:
                await asyncio.wait_for(fut, 10)
            except Exception:
                pass
            total = await settle(engine)
            assert 20 <= total < 60
            await client.shutdown_session()
        finally:
            await client.stop()

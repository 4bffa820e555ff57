"""Background prefill from the LSP: the first keystroke somewhere new (an edit away from the previous
one) and the editor's `localcoder/prefetch` (the cursor moved without typing) warm the engine's cache
at the lowest priority; the next keystroke on the same line does not; bad prefetches are ignored."""

from __future__ import annotations

import asyncio
import tempfile

import pytest_lsp
from pytest_lsp import ClientServerConfig, LanguageClient

from lsp_helpers import edit, fake_server, init_params, open_doc, ready_stats, request, server_env

URI = "file:///work/proj/m.py"
TEXT = "".join(f"x{i} = {i}\n" for i in range(40))


@pytest_lsp.fixture(config=ClientServerConfig(server_command=fake_server(),
                                              server_env=server_env(tempfile.mkdtemp(prefix="lc-lsp-cfg-"))))
async def client(lsp_client: LanguageClient):
    await lsp_client.initialize_session(init_params())
    yield
    await lsp_client.shutdown_session()


async def prefills(client, want: int) -> dict:
    for _ in range(100):  # a prefill runs on the engine thread; give it its turn
        s = await request(client, "localcoder/stats", {})
        if s.get("prefills", 0) + s.get("prefills_cancelled", 0) >= want:
            return s
        await asyncio.sleep(0.05)
    return s


async def test_jumps_and_prefetch_warm_the_cache_and_typing_on_does_not(client: LanguageClient):
    await ready_stats(client)
    open_doc(client, URI, TEXT)
    edit(client, URI, 2, (30, 0), (30, 0), "y")  # the first edit in this document: somewhere new
    s = await prefills(client, 1)
    assert s["prefills"] + s["prefills_cancelled"] == 1, s
    edit(client, URI, 3, (30, 1), (30, 1), "z")  # the next keystroke on the same line
    edit(client, URI, 4, (30, 2), (30, 2), " ")
    await asyncio.sleep(0.3)
    s = await request(client, "localcoder/stats", {})
    assert s["prefills"] + s["prefills_cancelled"] == 1, s
    edit(client, URI, 5, (3, 0), (3, 0), "q")  # a jump up the file
    s = await prefills(client, 2)
    assert s["prefills"] + s["prefills_cancelled"] == 2, s

    client.protocol.notify("localcoder/prefetch", {"textDocument": {"uri": URI}, "position": {"line": 20, "character": 2}})
    s = await prefills(client, 3)
    assert s["prefills"] + s["prefills_cancelled"] == 3, s
    # nonsense is ignored (a notification cannot be answered) and the server keeps serving
    client.protocol.notify("localcoder/prefetch", {"textDocument": {"uri": "file:///nope.py"}, "position": {}})
    client.protocol.notify("localcoder/prefetch", {"position": "x"})
    client.protocol.notify("localcoder/prefetch", {"textDocument": {"uri": URI}, "position": {"line": -4, "character": 0}})
    await asyncio.sleep(0.3)
    s = await request(client, "localcoder/stats", {})
    assert s["prefills"] + s["prefills_cancelled"] == 3 and s["documents"] == 1, s

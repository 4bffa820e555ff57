"""Failures the user must fix are shown once and the server stays alive; `serverUrl` mode works
against the real `localcoder serve`; the "Generate docstring" code action edits the document."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from conftest import free_port
from lsp_helpers import (fake_server, inline_params, init_params, open_doc, raw_request, request,
                         server_command, server_env)

CONFIG_HOME = tempfile.mkdtemp(prefix="lc-lsp-cfg-")
URI = "file:///work/proj/add.py"
SOURCE = "def add(a, b):\n    \n"


async def session(cmd: list[str], env: dict[str, str], options: dict | None = None) -> LanguageClient:
    client = await ClientServerConfig(server_command=cmd, server_env=env).start()
    await client.initialize_session(init_params(options))
    return client


async def close(client: LanguageClient) -> None:
    await client.shutdown_session()
    await client.stop()


async def wait_messages(client: LanguageClient, n: int = 1, timeout: float = 10.0) -> list[str]:
    t0 = time.monotonic()
    while len(client.messages) < n and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.05)
    return [m.message for m in client.messages]


async def test_missing_model_is_shown_once_and_the_server_lives(tmp_path):
    missing = str(tmp_path / "no-such-model.gguf")
    client = await session(server_command("--model", missing), server_env(CONFIG_HOME))
    try:
        open_doc(client, URI, SOURCE)
        for _ in range(3):
            res = await client.text_document_inline_completion_async(inline_params(URI, 1, 4))
            assert list(res.items) == []
        messages = await wait_messages(client)
        assert len(messages) == 1 and "no-such-model.gguf" in messages[0]
        assert client.messages[0].type == types.MessageType.Error
        s = await request(client, "localcoder/stats", {})
        assert s["errors"]["model_not_found"] >= 1 and s["heavy_modules"] == []
    finally:
        await close(client)


async def test_unreachable_server_url_is_shown_once():
    url = f"http://127.0.0.1:{free_port()}"
    client = await session(server_command("--server-url", url), server_env(CONFIG_HOME))
    try:
        open_doc(client, URI, SOURCE)
        for _ in range(3):
            res = await client.text_document_inline_completion_async(inline_params(URI, 1, 4))
            assert list(res.items) == []
        messages = await wait_messages(client)
        assert len(messages) == 1 and "cannot reach" in messages[0] and url in messages[0]
    finally:
        await close(client)


@pytest.fixture
def serve_fake():
    """The real `localcoder serve` on the fake engine."""
    port = free_port()
    env = server_env(CONFIG_HOME, LOCALCODER_FAKE_COMPLETION="return a + b  # via http\n")
    proc = subprocess.Popen([sys.executable, "-m", "localcoder.cli", "serve", "--engine", "fake", "--model", "fake",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    yield url
    proc.terminate()
    proc.wait(10)


async def test_server_url_mode_completes_through_localcoder_serve(serve_fake):
    # the URL comes from initializationOptions; the LSP itself loads no model
    client = await session(server_command(), server_env(CONFIG_HOME), {"serverUrl": serve_fake, "maxTokens": 40})
    try:
        open_doc(client, URI, SOURCE)
        open_doc(client, "file:///work/proj/util.py", "def sub(a, b):\n    return a - b\n")
        res = await client.text_document_inline_completion_async(inline_params(URI, 1, 4))
        assert res.items[0].insert_text == "return a + b  # via http"
        s = await request(client, "localcoder/stats", {})
        assert s["engine"] == "http" and s["http_requests"] == 1 and s["heavy_modules"] == []
        assert client.messages == []
    finally:
        await close(client)


DOC_ENV = server_env(CONFIG_HOME, LOCALCODER_FAKE_COMPLETION="Return the sum of a and b.")


@pytest_lsp.fixture(config=ClientServerConfig(server_command=fake_server(), server_env=DOC_ENV))
async def doc_client(lsp_client: LanguageClient):
    edits: list[types.ApplyWorkspaceEditParams] = []

    @lsp_client.feature(types.WORKSPACE_APPLY_EDIT)
    def apply_edit(params: types.ApplyWorkspaceEditParams):
        edits.append(params)
        return types.ApplyWorkspaceEditResult(applied=True)

    lsp_client.edits = edits
    await lsp_client.initialize_session(init_params())
    yield
    await lsp_client.shutdown_session()


async def test_generate_docstring_code_action(doc_client: LanguageClient):
    text = "import math\n\n\ndef area(w, h):\n    return w * h\n"
    open_doc(doc_client, URI, text)
    # raw: the typed client cannot tell a CodeAction from a Command when structuring the union
    actions = await raw_request(doc_client, "textDocument/codeAction", code_action_params(4, 6))
    [action] = actions
    assert action["title"] == "Generate docstring for area()" and action["kind"] == "refactor.rewrite"
    result = await raw_request(doc_client, "workspace/executeCommand",
                               {"command": action["command"]["command"], "arguments": action["command"]["arguments"]})
    assert result["applied"] is True
    [applied] = doc_client.edits
    [edit] = applied.edit.changes[URI]
    assert edit.range.start == types.Position(4, 0) == edit.range.end
    assert edit.new_text == '    """Return the sum of a and b."""\n'
    # no action where there is no function, or when it has a docstring already
    assert await raw_request(doc_client, "textDocument/codeAction", code_action_params(0, 0)) == []
    documented = text.replace("    return w", '    """Area."""\n    return w')
    open_doc(doc_client, "file:///work/proj/doc.py", documented)
    params = code_action_params(5, 4) | {"textDocument": {"uri": "file:///work/proj/doc.py"}}
    assert await raw_request(doc_client, "textDocument/codeAction", params) == []


def code_action_params(line: int, character: int) -> dict:
    pos = {"line": line, "character": character}
    return {"textDocument": {"uri": URI}, "range": {"start": pos, "end": pos}, "context": {"diagnostics": []}}

"""A real completion through `localcoder lsp` with the packaged Qwen2.5-Coder 0.5B on llama.cpp."""

from __future__ import annotations

import os
import tempfile

import pytest
from pytest_lsp import ClientServerConfig

from lsp_helpers import inline_params, init_params, open_doc, request, server_command, server_env

pytestmark = pytest.mark.integration

SOURCE = '''def fib(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return 

print(fib(10))
'''


async def test_real_model_completes_fibonacci(model_05b_path):
    env = server_env(tempfile.mkdtemp(prefix="lc-lsp-cfg-"))
    env["LOCALCODER_HOME"] = str(model_05b_path.parents[2])  # the cache the fixture resolved
    cmd = server_command("--model", "qwen2.5-coder-0.5b", "--threads", str(min(2, os.cpu_count() or 2)),
                         "--max-tokens", "16", "--mode", "single")
    client = await ClientServerConfig(server_command=cmd, server_env=env).start()
    try:
        await client.initialize_session(init_params())
        uri = "file:///work/proj/fib.py"
        open_doc(client, uri, SOURCE)
        res = await client.text_document_inline_completion_async(inline_params(uri, 4, 11))
        text = res.items[0].insert_text
        assert "fib(n - 1)" in text or "fib(n-1)" in text, text
        assert "\n" not in text  # single-line mode
        s = await request(client, "localcoder/stats", {})
        assert s["engine"] == "llama" and "llama_cpp" in s["heavy_modules"] and "torch" not in s["heavy_modules"]
        assert client.messages == []
        await client.shutdown_session()
    finally:
        await client.stop()

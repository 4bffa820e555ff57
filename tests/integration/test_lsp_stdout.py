"""The protocol stream survives libraries that write to fd 1 or point it at /dev/null.

llama-cpp-python does exactly that while loading a model (``suppress_stdout_stderr``): before the
fix, every LSP message written during a model load was lost and clients waited forever. Here the
fake engine's loading imitates it: a stray write to fd 1, then fd 1 on /dev/null for a second.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile

from pytest_lsp import ClientServerConfig

from lsp_helpers import inline_params, init_params, open_doc, request, server_env

NOISY = r'''
import os, sys, time
from localcoder.completion import Completer
real_open = Completer.from_config.__func__

def noisy_open(cls, cfg, **kw):
    os.write(1, b"llama.cpp log line on fd 1\n")
    null, saved = os.open(os.devnull, os.O_WRONLY), os.dup(1)
    os.dup2(null, 1)  # like llama_cpp._utils.suppress_stdout_stderr
    try:
        time.sleep(1.5)
        return real_open(cls, cfg, **kw)
    finally:
        os.dup2(saved, 1)

Completer.from_config = classmethod(noisy_open)
from localcoder.cli import main
sys.exit(main(["lsp", "--engine", "fake", "--model", "fake"]))
'''


async def test_messages_during_a_noisy_model_load_are_not_lost():
    cfg = ClientServerConfig(server_command=[sys.executable, "-c", NOISY],
                             server_env=server_env(tempfile.mkdtemp(prefix="lc-lsp-cfg-")))
    client = await cfg.start()
    try:
        await client.initialize_session(init_params())
        # the backend is loading now (1.5 s): every answer written meanwhile must arrive
        answers = [await asyncio.wait_for(request(client, "localcoder/stats", {}), 10) for _ in range(10)]
        assert all(isinstance(a, dict) for a in answers)
        assert "engine" not in answers[0]  # really asked during the load
        uri = "file:///work/proj/add.py"
        open_doc(client, uri, "def add(a, b):\n    \n")
        res = await asyncio.wait_for(client.text_document_inline_completion_async(inline_params(uri, 1, 4)), 20)
        assert res.items[0].insert_text == "return a + b"
        await client.shutdown_session()
    finally:
        await client.stop()

"""The Neovim plugin in real editors (tmux): Neovim 0.12-dev with native vim.lsp.inline_completion,
and Debian's 0.7.2 with the plugin's extmark ghost text and vim.lsp.start_client.
The fake engine makes the completion exact: ``return a + b``."""

from __future__ import annotations

import pytest

from nvim_driver import NVIM_07, NVIM_012, Editor, editor_env, version

COMPLETION = "return a + b\n"
GHOST = "    return a + b"
NVIMS = {"0.12-native": (NVIM_012, True), "0.7-extmarks": (NVIM_07, False)}


@pytest.fixture(params=list(NVIMS))
def editor(request, tmp_path):
    nvim, native = NVIMS[request.param]
    assert nvim.exists(), f"{nvim} missing: run tests/setup.d/editors.sh"
    expected = "v0.12" if native else "v0.7.2"
    assert expected in version(nvim)
    ed = Editor(nvim, tmp_path, native=native, env=editor_env(tmp_path, COMPLETION))
    yield ed
    ed.close()


def test_type_see_ghost_text_accept_with_tab(editor: Editor):
    editor.start("add.py")
    editor.send("i")
    editor.type("def add(a, b):\n    ")
    editor.wait_screen(GHOST)  # the ghost text, not in the buffer yet
    editor.send("Tab")
    assert editor.saved() == "def add(a, b):\n    return a + b\n"
    s = editor.stats()
    assert s["shown"] >= 1 and s["accepted"] == 1 and s["heavy_modules"] == []


def test_accept_a_word_then_the_rest_and_dismiss(editor: Editor):
    editor.start("add.py")
    editor.send("i")
    editor.type("def add(a, b):\n    ")
    editor.wait_screen(GHOST)
    editor.send("C-l")  # accept one word: "return" is typed, the ghost text keeps the rest
    editor.wait_screen("    return")
    if editor.nvim == NVIM_07:
        editor.wait_screen(GHOST)  # " a + b" still shown after the accepted word
        editor.send("Tab")
        text = editor.saved()
        assert text == "def add(a, b):\n    return a + b\n"
    else:
        text = editor.saved()
        assert text == "def add(a, b):\n    return\n"
    # a new ghost text on a fresh line, dismissed with <C-]>: nothing is inserted
    before = text.count("return a + b")  # in the buffer; the screen adds the ghost text
    editor.send("o")
    editor.type("def sub(a, b):\n    ")
    editor.wait_for(lambda: editor.screen().count("return a + b") == before + 1, 15, "a second ghost text")
    editor.send("C-]")
    editor.wait_for(lambda: editor.screen().count("return a + b") == before, 10, "the ghost text to go")
    assert editor.saved().endswith("def sub(a, b):\n    \n")
    assert editor.stats()["rejected"] >= 1


def test_the_cursor_landing_somewhere_new_prefetches_on_the_server(editor: Editor):
    editor.start("add.py")
    editor.send("i")
    editor.type("def add(a, b):\n    ")
    editor.wait_screen(GHOST)
    editor.send("Escape")

    def warmed() -> int:
        s = editor.stats()
        return s.get("prefills", 0) + s.get("prefills_cancelled", 0)

    before = warmed()
    editor.ex("lua require('localcoder').prefetch()")  # what BufEnter / CursorHold run
    editor.wait_for(lambda: warmed() > before, 15, "a prefetch on the server")

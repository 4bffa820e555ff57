"""The VS Code extension at the protocol level: build it, package it, and run the Node script that
speaks the extension's JSON-RPC messages to a real `localcoder lsp` (VS Code cannot run here)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

EXT = Path(__file__).resolve().parents[2] / "editors" / "vscode"


def npm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["npm", *args], cwd=EXT, capture_output=True, text=True, timeout=timeout)


def test_extension_compiles_and_speaks_the_protocol():
    assert (EXT / "node_modules").is_dir(), "run tests/setup.d/editors.sh (npm ci) first"
    build = npm("run", "compile")
    assert build.returncode == 0, build.stdout + build.stderr
    assert (EXT / "out" / "extension.js").is_file() and (EXT / "out" / "protocol.js").is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCALCODER_")}
    env.update(XDG_CONFIG_HOME=tempfile.mkdtemp(prefix="lc-vscode-"), LOCALCODER_FAKE_COMPLETION="return a + b\n",
               LOCALCODER_LSP=shlex.join([sys.executable, "-m", "localcoder.cli", "lsp", "--engine", "fake",
                                          "--model", "fake"]))
    run = subprocess.run(["node", "test/protocol.test.js"], cwd=EXT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "ok 12 checks" in run.stdout


def test_extension_packages_as_vsix(tmp_path):
    out = tmp_path / "localcoder.vsix"
    pkg = subprocess.run(["npx", "--no-install", "@vscode/vsce", "package", "--allow-missing-repository",
                          "--skip-license", "-o", str(out)], cwd=EXT, capture_output=True, text=True, timeout=300)
    assert pkg.returncode == 0, pkg.stdout + pkg.stderr
    import zipfile

    names = zipfile.ZipFile(out).namelist()
    assert "extension/package.json" in names and "extension/out/extension.js" in names
    assert any(n.startswith("extension/node_modules/vscode-languageclient/") for n in names)
    assert not any("node_modules/typescript/" in n for n in names)

"""The `localcoder` command as a user runs it: one clear line and a non-zero exit for bad input."""

import os
import subprocess
import sys

import pytest


def lc(*args, stdin=None, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "localcoder.cli", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=120)


@pytest.fixture
def pyfile(tmp_path):
    f = tmp_path / "add.py"
    f.write_text("def add(a, b):\n    \n")
    return f


def test_complete_with_the_fake_engine_prints_the_completion(pyfile):
    r = lc("complete", str(pyfile), "--line", "2", "--column", "5", "--model", "fake")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "return a + b\n"


def test_complete_json_has_text_and_timings(pyfile):
    import json

    r = lc("complete", "--stdin", "--line", "2", "--column", "5", "--model", "fake", "--json",
           stdin=pyfile.read_text())
    data = json.loads(r.stdout)
    assert data["text"] == "return a + b" and data["mode"] == "multi"
    assert data["timings"]["predicted_n"] > 0 and data["stop_type"] in ("eos", "block")


@pytest.mark.parametrize("setup,args,message", [
    (None, ["missing.py", "--line", "1", "--column", "1"], "no such file"),
    (b"\x00\x01\x02binary", ["F", "--line", "1", "--column", "1"], "binary"),
    (b"caf\xe9 = 1\n", ["F", "--line", "1", "--column", "1"], "not UTF-8"),
    (b"", ["F", "--line", "1", "--column", "1"], "empty"),
    (b"x = 1\n", ["F", "--line", "9", "--column", "1"], "line 9 is outside"),
    (b"x = 1\n", ["F", "--line", "1", "--column", "40"], "column 40 is outside"),
])
def test_bad_input_gets_one_clear_line_and_exit_2(tmp_path, setup, args, message):
    f = tmp_path / "f.py"
    if setup is not None:
        f.write_bytes(setup)
    args = [str(f) if a == "F" else a for a in args]
    r = lc("complete", *args, "--model", "fake")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_model_and_non_fim_model(tmp_path, pyfile):
    r = lc("complete", str(pyfile), "--line", "1", "--column", "1", "--model", "no-such-model")
    assert r.returncode == 2 and "no model named 'no-such-model'" in r.stderr
    r = lc("complete", str(pyfile), "--line", "1", "--column", "1", "--model", str(tmp_path / "nope.gguf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_models_list_shows_the_packaged_models(tmp_path):
    r = lc("models", "list", env_extra={"LOCALCODER_HOME": str(tmp_path)})
    assert r.returncode == 0
    assert "qwen2.5-coder-0.5b" in r.stdout and "qwen2.5-coder-1.5b" in r.stdout and "not pulled" in r.stdout
    r = lc("models", "path", "qwen2.5-coder-1.5b", env_extra={"LOCALCODER_HOME": str(tmp_path)})
    assert r.returncode == 2 and "localcoder models pull qwen2.5-coder-1.5b" in r.stderr


def test_lsp_subcommand_does_not_import_torch():
    code = ("import sys; from localcoder.cli import build_parser; build_parser('lsp'); "
            "import localcoder.completion, localcoder.engines.llamacpp; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr

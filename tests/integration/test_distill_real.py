"""`localcoder distill` with the real packaged 0.5B teacher: a short run on a slice of the standard
library, then the exported student is registered and serves FIM completions through the torch engine."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from localcoder.cli import main as cli_main

pytestmark = pytest.mark.integration

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_distill_real_teacher_then_serve(model_05b_path, tmp_path, monkeypatch, capsys):
    from localcoder import models

    home = models.home()  # reuse the converted teacher; registry goes to a private file
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for m in ("textwrap", "shlex", "bisect", "heapq", "colorsys", "fnmatch", "glob", "keyword"):
        shutil.copy(STDLIB / f"{m}.py", corpus)
    out = tmp_path / "s4"
    rc = cli_main(["distill", "--teacher", "qwen2.5-coder-0.5b", "--student-layers", "4", "--data", str(corpus),
                   "--out", str(out), "--steps", "2", "--seq-len", "128", "--batch-size", "2", "--train-rows", "4",
                   "--val-rows", "2", "--val-every", "2", "--ckpt-every", "2", "--cache-dir", str(tmp_path / "cache"),
                   "--register-as", "it-student-4l", "--quiet"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    prov = json.loads((out / "model" / "localcoder.json").read_text())
    assert prov["teacher"] == "qwen2.5-coder-0.5b" and len(prov["student_init"]["layers_kept"]) == 4
    assert prov["student_init"]["layers_kept"][0] == 0 and prov["student_init"]["layers_kept"][-1] == 23
    resolved = models.resolve("it-student-4l")
    assert resolved.kind == "hf" and home == models.home()

    from localcoder.completion import Completer, InfillRequest
    from localcoder.engines.torch import TorchEngine

    engine = TorchEngine(resolved.path, device="cpu", n_threads=2)
    assert engine.model.config.num_hidden_layers == 4
    result = Completer(engine, "qwen").complete(InfillRequest(prefix="def add(a, b):\n    ", suffix="\n",
                                                              max_tokens=8))
    assert result.prompt_tokens > 5 and result.timings.predicted_n >= 1  # the student serves FIM prompts

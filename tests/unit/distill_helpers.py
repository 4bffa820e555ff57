"""Shared by the distill recipe tests (test_distill_train.py, test_distill_branches.py): a small stdlib
corpus, a private LOCALCODER_HOME, the CLI flags of a tiny run on ``tiny_qwen_dir`` (tests/conftest.py),
and readers for what a run leaves on disk. Import the fixtures into a test module to use them."""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap", "shlex", "bisect", "heapq", "colorsys", "fnmatch", "glob", "keyword", "numbers", "opcode",
           "sched", "stat", "token", "this", "tty", "cmd"]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for m in MODULES:
        shutil.copy(STDLIB / f"{m}.py", d / f"{m}.py")
    return d


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALCODER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def flags(tiny: Path, corpus: Path, out: Path, cache: Path, **kw) -> list[str]:
    base = {"teacher": tiny, "student-layers": 2, "data": corpus, "out": out, "cache-dir": cache, "seq-len": 64,
            "batch-size": 2, "steps": 8, "val-every": 4, "ckpt-every": 2, "val-rows": 2, "log-every": 1,
            "threads": 1, "lr": 3e-3, "warmup-steps": 1, "train-rows": 8, "top-k": 8,
            "autocast": "off"}  # the tests compare fp32 numbers; bf16 autocast has its own tests
    base.update(kw)
    out_flags = []
    for k, v in base.items():
        out_flags += [f"--{k}", str(v)]
    return out_flags + ["--quiet"]


def cfg_of(argv: list[str]):
    import argparse

    from localcoder.distill.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(argv))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

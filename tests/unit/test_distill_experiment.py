"""The acceptance experiment's scoring tools on the tiny random Qwen2 fixture: batched FIM generation with the
single-line early stop, `experiment score` / `speed` / `combine` end to end (same cases for every model,
paired bootstrap lines, speed ratios)."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("torch")


def _tok(model_dir):
    from transformers import AutoTokenizer

    from localcoder.engines.torch import HFTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(model_dir)))


def test_newline_stop_marks_rows_that_produced_a_newline(tiny_qwen_dir):
    import torch

    from localcoder.distill.evaluate import _newline_mask, _newline_stop

    tok = _tok(tiny_qwen_dir)
    mask = _newline_mask(tok, 151936)
    nl = tok.tokenize("\n")[0]
    word = tok.tokenize("return")[0]
    assert bool(mask[nl]) and not bool(mask[word])
    assert bool(mask[tok.tokenize("):\n")[-1]])  # merged pieces that end in a newline count too
    stop = _newline_stop(mask, start=2)
    ids = torch.tensor([[nl, nl, word, word],  # newlines only inside the prompt: not done
                        [word, word, word, nl]])  # produced a newline: done
    assert stop(ids, None).tolist() == [False, True]


def test_at_step_rebuilds_the_model_a_checkpoint_describes(tiny_qwen_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from localcoder.distill import experiment
    from localcoder.distill.students import load_causal_lm

    run = tmp_path / "run"
    model, tok = load_causal_lm(tiny_qwen_dir)
    model.save_pretrained(run / "init")
    tok.save_pretrained(run / "init")
    name = "model.layers.1.mlp.down_proj.weight"
    trained = torch.full_like(dict(model.named_parameters())[name], 0.5)
    (run / "checkpoints" / "step-0000007").mkdir(parents=True)
    torch.save({"model": {name: trained}}, run / "checkpoints" / "step-0000007" / "state.pt")
    assert experiment.main(["at-step", str(run), "7", str(tmp_path / "at7")]) == 0
    w = load_file(str(tmp_path / "at7" / "model.safetensors"))
    assert torch.equal(w[name], trained)
    assert torch.equal(w["model.layers.0.mlp.down_proj.weight"], dict(model.named_parameters())[
        "model.layers.0.mlp.down_proj.weight"].detach())


def test_score_speed_combine_end_to_end(tiny_qwen_dir, tmp_path):
    from localcoder.distill import experiment

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    y = x * {j} + {i}\n    return y\n\n"
                                              for j in range(12)))
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"test": [str(p) for p in sorted(src.glob("*.py"))]}))
    out = tmp_path / "eval"
    common = ["--splits", str(splits), "--out", str(out), "--n", "6", "--threads", "1", "--prefix-tokens", "32",
              "--suffix-tokens", "8", "--batch-size", "4", "--no-speed"]
    for name in ("teacher", "student"):
        assert experiment.main(["score", "--name", name, "--model", str(tiny_qwen_dir), *common]) == 0
    a, b = (json.loads((out / f"{n}.json").read_text()) for n in ("teacher", "student"))
    assert a["heldout"]["ids"] == b["heldout"]["ids"] and len(a["heldout"]["es"]) == 6
    assert a["layers"] == 4 and "speed" not in a
    # the same weights give the same greedy completions
    assert a["heldout"]["texts"] == b["heldout"]["texts"]
    assert experiment.main(["speed", "--out", str(out), "--name", "teacher", "--name", "student", "--repeats", "1",
                            "--prompt", "16", "--decode", "4", "--threads", "1"]) == 0
    assert json.loads((out / "student.json").read_text())["speed"]["decode_tok_s"] > 0
    assert experiment.main(["combine", "--out", str(out), "--a", "student", "--b", "teacher"]) == 0
    summary = (out / "summary.md").read_text()
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "| student | 4 |" in summary and "100%" in summary
    assert "heldout ES student − teacher: +0.0000" in summary  # identical models: a zero difference
    assert experiment.main(["depth", "--out", str(out), "--teacher", str(out / "teacher.json")]) == 0
    table = (out / "depth.md").read_text().splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| teacher | 4 |")
    assert re.search(r"\| \d+\.\d\d \|$", table[-1])  # decode speed relative to the teacher
    assert (out / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""FIM transformation, teacher/student alignment, packing and the tokenized cache (distill/fim_transform.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from localcoder.distill import fim_transform as ft
from localcoder.distill.data import walk_corpus
from localcoder.fim.formats import get_format

CODE = '''import os


def walk(root):
    """Yield files."""
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(d, f)


class Box:
    def __init__(self, x):
        self.x = x

    def area(self):
        return self.x * self.x
'''


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir):
    import transformers

    from localcoder.engines.torch import HFTokenizer

    return HFTokenizer(transformers.AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir)))


@pytest.mark.parametrize("kind", ft.SPAN_KINDS)
def test_span_round_trip(kind):
    rng = random.Random(0)
    for _ in range(200):
        pre, mid, suf = ft.split_span(CODE, kind, rng)
        assert pre + mid + suf == CODE
        if kind == "line":
            assert mid.count("\n") == 1 and mid.strip() and (pre == "" or pre.endswith("\n"))
        if kind == "block":
            assert mid.strip() and (pre == "" or pre.endswith("\n")) and (mid.endswith("\n") or not suf)
        if kind == "cursor":  # inside a non-blank line: the rest of it (and maybe a few lines) is the middle
            first = mid.split("\n", 1)[0]
            assert first and (pre.rsplit("\n", 1)[-1] + first).strip()
            assert not suf or suf.startswith("\n") or mid.endswith("\n")


def test_block_span_takes_the_indented_body():
    rng = random.Random(1)
    spans = {ft.split_span(CODE, "block", rng)[1] for _ in range(300)}
    assert "    def area(self):\n        return self.x * self.x\n" in spans
    assert any(s.startswith("def walk(root):\n") and "yield" in s for s in spans)


def test_chunking_keeps_lines_whole():
    chunks = ft.chunk_text(CODE * 5, 200)
    assert "".join(chunks).replace("\n", "") == (CODE * 5).replace("\n", "")
    assert all(c.endswith("\n") for c in chunks)


@pytest.mark.parametrize("order", ["psm", "spm"])
def test_student_order_aligns_with_teacher_psm(tok, order):
    fmt = get_format("qwen")
    spec = ft.FimSpec(seq_len=256, order=order, teacher_order="psm")
    pre, mid, suf = "def area(self):\n    ", "return self.x * self.x", "\n\nprint(Box(2).area())\n"
    ex = ft.encode_example(tok, fmt, pre, mid, suf, spec)
    p, m, s = tok.tokenize(pre), tok.tokenize(mid), tok.tokenize(suf)
    assert ex.student_ids[: -len(m) - 1] == fmt.build(tok, p, s, order=order)  # the exact serving prompt
    assert ex.teacher_ids[: -len(m) - 1] == fmt.build(tok, p, s, order="psm")
    assert sum(ex.loss_mask) == len(p) + len(s) + len(m) + 1  # every content token + EOS, no markers
    assert sum(ex.mid_mask) == len(m) + 1
    for j, on in enumerate(ex.loss_mask):  # same next token on both sides, at every loss position
        if on:
            assert ex.student_ids[j + 1] == ex.teacher_ids[ex.t_index[j] + 1]
    mids = [ex.student_ids[j + 1] for j, on in enumerate(ex.mid_mask) if on]
    assert mids == m + [ex.student_ids[-1]]
    if order == "spm":
        assert ex.student_ids != ex.teacher_ids and sorted(ex.student_ids) == sorted(ex.teacher_ids)


def test_long_example_is_trimmed_to_seq_len(tok):
    spec = ft.FimSpec(seq_len=64)
    ex = ft.encode_example(tok, get_format("qwen"), CODE * 4, "x = 1\n", CODE * 4, spec)
    assert len(ex.student_ids) <= 64 and tok.tokenize("x = 1\n")[0] in ex.student_ids


def test_pack_and_cache(tok, tmp_path, monkeypatch):
    for i in range(6):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / f"m{i}.py").write_text(CODE.replace("Box", f"Box{i}"))
    files = walk_corpus([tmp_path / "src"]).files
    spec = ft.FimSpec(seq_len=128, order="spm")
    fmt = get_format("qwen")
    packed = ft.build_split(tok, fmt, files, spec, seed=0, data_fp="fp", cache_dir=tmp_path / "cache", name="train")
    N, L = packed.student_ids.shape
    assert L == 128 and N >= 6
    for r in range(N):  # alignment survives packing
        for j in np.flatnonzero(packed.loss_mask[r]):
            assert packed.student_ids[r, j + 1] == packed.teacher_ids[r, packed.t_index[r, j] + 1]
    monkeypatch.setattr(ft, "make_examples", lambda *a, **k: pytest.fail("re-tokenized despite the cache"))
    again = ft.build_split(tok, fmt, files, spec, seed=0, data_fp="fp", cache_dir=tmp_path / "cache", name="train")
    assert all(np.array_equal(a, b) for a, b in zip(packed.arrays(), again.arrays()))


def test_sequence_kd_rewrites_the_middles(tok, tmp_path, tiny_qwen_dir):
    import transformers

    from localcoder.distill.teacher import teacher_middles

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text(CODE)
    files = walk_corpus([tmp_path / "src"]).files
    fmt = get_format("qwen")
    spec = ft.FimSpec(seq_len=128, rate=1.0, span_kinds=("line",))
    seen = []

    def rewrite(triples):
        seen.extend(triples)
        return ["pass  # teacher\n"] * len(triples)

    packed = ft.build_split(tok, fmt, files, spec, seed=0, data_fp="fp-seqkd", cache_dir=None, name="train",
                            rewrite=rewrite)
    want = tok.tokenize("pass  # teacher\n")
    mids = [[int(packed.student_ids[r, j + 1]) for j in np.flatnonzero(packed.mid_mask[r])][:-1]
            for r in range(len(packed))]
    assert seen and all(m == want for m in mids if m)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_qwen_dir))
    out = teacher_middles(teacher, tok, fmt, (seen * 2)[:2], max_new=4)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)

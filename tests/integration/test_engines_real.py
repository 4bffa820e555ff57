"""The real engines: llama.cpp on the packaged 0.5B, torch on a tiny random Qwen2 (hub-free)."""

import subprocess
import sys
import threading

import pytest

from localcoder.completion import Completer, InfillRequest
from localcoder.engines.base import CancelToken, GenerationRequest

pytestmark = pytest.mark.integration

FIB_PREFIX = "def fib(n):\n    if n < 2:\n        return n\n    return "
FIB_SUFFIX = "\n\n\nprint(fib(10))\n"


def test_llama_completes_fibonacci(llama_engine):
    llama_engine.reset_cache()
    r = Completer(llama_engine).complete(InfillRequest(FIB_PREFIX, FIB_SUFFIX))
    assert r.mode == "single" and "fib(n - 1)" in r.text.replace("n-1", "n - 1")
    assert r.timings.prompt_n > 10 and r.timings.predicted_n > 3


def test_llama_kv_reuse_after_typing_matches_a_cold_run(llama_engine):
    c = Completer(llama_engine)
    llama_engine.reset_cache()
    c.complete(InfillRequest(FIB_PREFIX[:-3], FIB_SUFFIX))
    warm = c.complete(InfillRequest(FIB_PREFIX, FIB_SUFFIX))
    llama_engine.reset_cache()
    cold = c.complete(InfillRequest(FIB_PREFIX, FIB_SUFFIX))
    assert warm.tokens_cached > 0 and cold.tokens_cached == 0
    assert warm.tokens_evaluated < cold.tokens_evaluated
    assert warm.text == cold.text


def test_llama_cancel_stops_within_one_token(llama_engine):
    tok = llama_engine.tokenizer
    cancel = CancelToken()
    stream = llama_engine.generate(GenerationRequest(tok.tokenize("# a long comment\n" * 5), max_tokens=200,
                                                     cancel=cancel))
    got = []
    for t in stream:
        got.append(t)
        if len(got) == 3:
            threading.Thread(target=cancel.cancel).start()
            threading.Event().wait(0.05)
    assert len(got) <= 4 and stream.timings.cancelled


def test_llama_tokenizer_does_not_parse_fim_strings_in_user_text(llama_engine):
    tok = llama_engine.tokenizer
    assert tok.special_token_id("<|fim_prefix|>") == 151659
    assert 151659 not in tok.tokenize("x = '<|fim_prefix|>'")
    assert tok.tokenize("<|fim_prefix|>", special=True) == [151659]
    text = "café 🙂 ünïcode"
    assert b"".join(tok.token_bytes(t) for t in tok.tokenize(text)).decode() == text


def test_the_tokenizers_memo_answers_what_llama_cpp_does_and_stays_bounded(model_05b_path, monkeypatch):
    """LlamaTokenizer remembers recent texts (lines above the cursor repeat at every keystroke): a remembered
    answer equals llama.cpp's, a caller changing the list it got changes nothing remembered, special and
    plain tokenization of one text are apart, and the memo holds at most TOKENIZE_MEMO texts."""
    import llama_cpp

    from localcoder.engines import llamacpp

    monkeypatch.setattr(llamacpp, "TOKENIZE_MEMO", 8)
    tok = llamacpp.LlamaTokenizer(llama_cpp.Llama(model_path=str(model_05b_path), vocab_only=True, verbose=False))
    line = "    result = '<|fim_middle|>'.join(parts)  # ünïcode\n"
    first = tok.tokenize(line)
    assert first == tok._model.tokenize(line.encode(), False, False)
    first.append(-1)  # the caller's list is its own
    assert tok.tokenize(line) == first[:-1]
    assert tok.tokenize(line, special=True) == tok._model.tokenize(line.encode(), False, True) != first[:-1]
    for i in range(20):
        assert tok.tokenize(f"x{i} = {i}\n") == tok._model.tokenize(f"x{i} = {i}\n".encode(), False, False)
    assert len(tok._memo) == 8
    long = "y = 1\n" * (llamacpp.TOKENIZE_MEMO_CHARS // 6 + 1)  # longer than the memo keeps
    assert tok.tokenize(long) == tok._model.tokenize(long.encode(), False, False)
    assert (long, False) not in tok._memo


def test_a_vocab_only_tokenizer_equals_the_engines_and_llama_cpp_pythons(llama_engine, model_05b_path):
    """The bench tokenizes with a vocab-only model it does not keep: the tokenizer must keep it alive (a collected
    ``Llama`` frees its model, and tokenizing then crashed `localcoder bench`'s cold and typing workloads)."""
    import llama_cpp

    from localcoder.engines.llamacpp import LlamaTokenizer

    vocab_only = LlamaTokenizer(llama_cpp.Llama(model_path=str(model_05b_path), vocab_only=True, verbose=False))
    text = "def héllo(x):\n    return x  # <|fim_middle|> 😀\n" * 50
    ids = vocab_only.tokenize(text)
    assert ids == llama_engine.tokenizer.tokenize(text) and len(ids) > 500
    assert ids == llama_engine.tokenizer._model.tokenize(text.encode(), False, False)  # llama-cpp-python's own
    assert vocab_only.tokenize("<|fim_middle|>", special=True) == [vocab_only.special_token_id("<|fim_middle|>")]
    assert vocab_only.tokenize("") == []


def test_complete_cli_on_the_real_model(tmp_path, model_05b_path):
    f = tmp_path / "fib.py"
    f.write_text(FIB_PREFIX + FIB_SUFFIX)
    r = subprocess.run([sys.executable, "-m", "localcoder.cli", "complete", str(f), "--line", "4", "--column",
                        "12", "--threads", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "fib(n" in r.stdout


def test_eval_cli_on_a_small_humaneval_sample(tmp_path, model_05b_path):
    import json

    out = tmp_path / "ev.json"
    r = subprocess.run([sys.executable, "-m", "localcoder.cli", "eval", "--limit", "8", "--threads", "2", "-q",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())["humaneval-single"]["summary"]
    assert s["n"] == 8 and s["es"] > 0.4 and s["pass_at_1"] > 0.2


def test_torch_engine_kv_reuse_gives_the_same_tokens_as_cold(tiny_qwen_dir):
    from localcoder.engines.torch import TorchEngine

    eng = TorchEngine(tiny_qwen_dir, device="cpu", n_batch=16)
    c = Completer(eng)
    assert c.format.name == "qwen"
    c.complete(InfillRequest("def add(a, b):\n    ret", "\n", max_tokens=8))
    warm = c.complete(InfillRequest("def add(a, b):\n    return", "\n", max_tokens=8))
    eng.reset_cache()
    cold = c.complete(InfillRequest("def add(a, b):\n    return", "\n", max_tokens=8))
    assert warm.tokens_cached > 0 and cold.tokens_cached == 0
    assert warm.text == cold.text
    assert 151659 not in eng.tokenizer.tokenize("'<|fim_prefix|>'")


def test_bitsandbytes_without_cuda_is_a_clear_error(tiny_qwen_dir):
    from localcoder.engines.torch import TorchEngine
    from localcoder.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        TorchEngine(tiny_qwen_dir, device="cpu", quantization="nf4")


def test_a_bitsandbytes_saved_model_on_cpu_is_a_clear_error(tiny_qwen_dir, tmp_path):
    import json
    import shutil

    from localcoder.engines.torch import TorchEngine
    from localcoder.errors import BackendUnavailable

    d = tmp_path / "bnb"
    shutil.copytree(tiny_qwen_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        TorchEngine(d, device="cpu")


def test_the_packaged_05b_as_iq4_nl_is_made_once_remade_when_stale_and_not_the_default(model_05b_path, monkeypatch):
    """gguf_type iq4_nl: llama.cpp requantizes the shipped file (mostly Q5_0) to IQ4_NL once, beside it; the
    output head keeps Q8_0; a stamp that no longer matches (another llama.cpp, another source) remakes it.
    The default (auto) serves the shipped file: IQ4_NL lost 10 points of HumanEval function pass@1."""
    import json

    import gguf

    from localcoder import models

    m = models.resolve("qwen2.5-coder-0.5b")
    assert models.serving_gguf(m, "auto", progress=False) == m.path == models.serving_gguf(m, "original")
    served = models.serving_gguf(m, "iq4_nl", progress=False)
    assert served != m.path and served.parent == m.path.parent
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(served).tensors}
    assert types["blk.0.ffn_up.weight"] == "IQ4_NL" and types["blk.23.attn_q.weight"] == "IQ4_NL"
    assert types["output.weight"] == "Q8_0"
    made = served.stat().st_mtime_ns
    assert models.serving_gguf(m, "iq4_nl", progress=False) == served and served.stat().st_mtime_ns == made
    stamp = served.with_name(served.name + ".verified")
    good = stamp.read_text()
    remade = []  # (requantizing for real takes ~1 min on 2 cores: record the call instead)
    monkeypatch.setattr(models, "_requantize", lambda source, out, kind, progress: remade.append((source, out, kind)))
    try:
        stamp.write_text(json.dumps({**json.loads(good), "llama_cpp": "0.0.0"}))  # made by another llama.cpp
        assert models.serving_gguf(m, "iq4_nl", progress=False) == served
        assert remade == [(m.path, served, "iq4_nl")] and json.loads(stamp.read_text()) == json.loads(good)
        assert models.serving_gguf(m, "iq4_nl", progress=False) == served and len(remade) == 1  # current again
    finally:
        stamp.write_text(good)
        monkeypatch.undo()
    # the engine loads it when asked, with the shipped layout adapter on top; the default config does not
    cfg = _default_config()
    cfg.model.gguf_type = "iq4_nl"
    c = Completer.from_config(cfg)
    try:
        assert c.engine.weights["file"] == str(served) and "IQ4_NL" in c.engine.weights["type"]
        assert c.engine.adapter and c.order == "spm"
        r = c.complete(InfillRequest(FIB_PREFIX, FIB_SUFFIX))
        assert "fib(n - 1)" in r.text.replace("n-1", "n - 1")
    finally:
        c.engine.close()
    d = Completer.from_config(_default_config())
    try:
        assert d.engine.weights["file"] == str(m.path)
    finally:
        d.engine.close()


def _default_config():
    from localcoder.config import Config

    cfg = Config()
    cfg.model.threads = 2
    return cfg


KERNELS_PROBE = """
import json, sys
from localcoder.completion import Completer, InfillRequest
from localcoder.config import Config
cfg = Config()
cfg.model.threads, cfg.model.kernels = 2, sys.argv[1]
c = Completer.from_config(cfg, pull=True, progress=False)
r = c.complete(InfillRequest(sys.argv[2], sys.argv[3]))
maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libggml-cpu" in line})
print(json.dumps({"weights": c.engine.weights, "maps": maps, "text": r.text}))
"""


def test_the_avx512_kernels_serve_by_default_where_the_cpu_has_them(model_05b_path):
    """`make test` (like `make serve`) builds the AVX-512 set on a CPU that runs it; `kernels auto` then loads it
    instead of pip's portable build, every library from its own folder, and completes as the portable one does.
    Asking for it on a CPU without AVX-512 is a clear error."""
    import json

    from localcoder.engines import native

    def probe(kernels: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", KERNELS_PROBE, kernels, FIB_PREFIX, FIB_SUFFIX],
                              capture_output=True, text=True, timeout=300)

    missing = native.AVX512.cpu_flags - native.cpu_flags()
    if missing:  # an AVX2-only machine: the set is neither built nor loadable, and asking for it says why
        r = probe("avx512")
        assert r.returncode != 0 and "this CPU lacks" in r.stderr
        pytest.skip(f"this CPU lacks {' '.join(sorted(missing))}: the portable kernels are the only ones")
    folder = native.built(native.AVX512)
    assert folder is not None, "the AVX-512 set is not built: run `localcoder models kernels --build` (make test does)"
    runs = {}
    for kernels in ("auto", "portable"):
        r = probe(kernels)
        assert r.returncode == 0, r.stderr
        runs[kernels] = json.loads(r.stdout.strip().splitlines()[-1])
    auto, portable = runs["auto"], runs["portable"]
    assert auto["weights"]["kernels"] == "avx512" and auto["weights"]["path"] == str(folder.resolve())
    assert auto["maps"] == [str((folder / "libggml-cpu.so").resolve())]
    assert portable["weights"]["kernels"] == "portable" and portable["maps"][0].startswith(str(native.pip_libs()))
    assert "fib(n" in auto["text"] and auto["text"] == portable["text"]

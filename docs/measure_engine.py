"""Issue 2 numbers: llama.cpp engine prefill/decode tok/s and KV reuse after typing (PSM vs SPM), 2 threads.

Run: .venv/bin/python docs/measure_engine.py   (needs `localcoder models pull qwen2.5-coder-0.5b`)
"""
import json
import statistics
from pathlib import Path
from localcoder import models
from localcoder.engines.llamacpp import LlamaCppEngine
from localcoder.engines.base import GenerationRequest
from localcoder.completion import Completer, InfillRequest

eng = LlamaCppEngine(models.resolve("qwen2.5-coder-0.5b").path, n_ctx=4096, n_threads=2)
import argparse
src = Path(argparse.__file__).read_text()
tok = eng.tokenizer
ids = tok.tokenize(src)[:1000]
res = {"prefill": [], "decode": []}
for _ in range(3):
    eng.reset_cache()
    s = eng.generate(GenerationRequest(ids, max_tokens=64, stop_token_ids=frozenset()))
    n = sum(1 for _ in s)
    t = s.timings
    res["prefill"].append(t.evaluated_n / t.prompt_ms * 1000)
    res["decode"].append(t.predicted_n / t.predicted_ms * 1000)
c = Completer(eng)
cut = src.index("def parse_known_args")
prefix, suffix = src[:cut][-3500:], src[cut:][:700]
cold, warm, cold_spm, warm_spm = [], [], [], []
for _ in range(3):
    for order, cl, wl in (("psm", cold, warm), ("spm", cold_spm, warm_spm)):
        eng.reset_cache()
        r1 = c.complete(InfillRequest(prefix, suffix, mode="single", max_tokens=16, order=order))
        r2 = c.complete(InfillRequest(prefix + "def", suffix, mode="single", max_tokens=16, order=order))
        cl.append((r1.timings.prompt_ms, r1.prompt_tokens, r1.tokens_evaluated))
        wl.append((r2.timings.prompt_ms, r2.tokens_cached, r2.tokens_evaluated))
out = {"prefill_tok_s": statistics.median(res["prefill"]), "decode_tok_s": statistics.median(res["decode"]),
       "cold_prefill_ms_psm": statistics.median(x[0] for x in cold), "prompt_tokens": cold[0][1],
       "after_typing_prefill_ms_psm": statistics.median(x[0] for x in warm), "after_typing_evaluated_psm": warm[0][2],
       "cold_prefill_ms_spm": statistics.median(x[0] for x in cold_spm),
       "after_typing_prefill_ms_spm": statistics.median(x[0] for x in warm_spm), "after_typing_evaluated_spm": warm_spm[0][2]}
print(json.dumps(out, indent=1))

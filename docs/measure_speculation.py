"""Issue 16 item 5 numbers: greedy decode with and without speculative decoding, llama.cpp, 2 threads.

For a few cut points in standard-library files (PSM FIM prompt: 600 tokens of prefix, 128 of suffix,
64 tokens generated, no stop), runs the same request with ``speculation`` off and on, interleaved, and
reports decode tok/s, tokens per target forward, draft acceptance and whether the outputs are identical.

Run: .venv/bin/python docs/measure_speculation.py [--draft qwen2.5-coder-0.5b --model qwen2.5-coder-1.5b]
(needs the models pulled). Say the machine's load (`uptime`) next to any number it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from localcoder import models
from localcoder.engines.base import GenerationRequest
from localcoder.engines.llamacpp import LlamaCppEngine
from localcoder.engines.speculative import DraftModel, PromptLookup

FILES = ("textwrap.py", "argparse.py", "json/encoder.py", "dataclasses.py", "csv.py", "configparser.py")


def prompts(tok, n_per_file: int = 2) -> list[list[int]]:
    """PSM prompts cut at line starts in the middle of each file."""
    pre, suf, mid = (tok.special_token_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
    out = []
    for name in FILES:
        src = (Path(os.__file__).parent / name).read_text()
        lines = src.splitlines(keepends=True)
        for j in range(n_per_file):
            cut = len(lines) * (j + 1) // (n_per_file + 1)
            prefix, suffix = "".join(lines[:cut]), "".join(lines[cut:])
            out.append([pre] + tok.tokenize(prefix)[-600:] + [suf] + tok.tokenize(suffix)[:128] + [mid])
    return out


def run(engine: LlamaCppEngine, ids: list[int], drafter) -> tuple[list[int], dict]:
    engine.drafter = drafter
    engine.reset_cache()
    stream = engine.generate(GenerationRequest(ids, max_tokens=64))
    return list(stream), stream.timings.to_dict()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--draft", default="", help="draft model (same tokenizer); default: prompt lookup")
    ap.add_argument("--per-file", type=int, default=2)
    args = ap.parse_args()
    engine = LlamaCppEngine(models.resolve(args.model).path, n_ctx=4096, n_threads=2)
    drafter = (DraftModel(LlamaCppEngine(models.resolve(args.draft).path, n_ctx=4096, n_threads=2))
               if args.draft else PromptLookup())
    rows = []
    for ids in prompts(engine.tokenizer, args.per_file):
        plain, t0 = run(engine, ids, None)
        fast, t1 = run(engine, ids, drafter)
        rows.append({"same": plain == fast, "plain_tok_s": t0["predicted_per_second"],
                     "spec_tok_s": t1["predicted_per_second"], "tokens_per_forward": t1["tokens_per_forward"],
                     "draft_n": t1["draft_n"], "accepted": t1["draft_n_accepted"]})
        print(json.dumps(rows[-1]))
    drafted = sum(r["draft_n"] for r in rows)
    print(json.dumps({
        "model": args.model, "drafter": args.draft or "prompt lookup", "prompts": len(rows),
        "all_identical": all(r["same"] for r in rows),
        "median_plain_tok_s": statistics.median(r["plain_tok_s"] for r in rows),
        "median_spec_tok_s": statistics.median(r["spec_tok_s"] for r in rows),
        "median_speedup": statistics.median(r["spec_tok_s"] / r["plain_tok_s"] for r in rows),
        "median_tokens_per_forward": statistics.median(r["tokens_per_forward"] for r in rows),
        "acceptance": round(sum(r["accepted"] for r in rows) / drafted, 3) if drafted else 0.0,
        "load": os.getloadavg(),
    }, indent=1))


if __name__ == "__main__":
    main()

"""Speculative decoding, measured: the target alone and with each drafter, interleaved prompt by prompt.

For cut points in source files (PSM FIM prompt of the target's served layout: up to 600 tokens of prefix and
128 of suffix, ``--max-tokens`` generated with no stop but the model's own end), every prompt is decoded by
the target alone and then with each drafter, cold cache each time. Reports per drafter: decode tok/s (median
over prompts and as the ratio to the target alone on the same prompts), tokens per target forward, draft
acceptance, and whether every output equals the target's own (greedy: it must, up to near-ties; see
docs/latency.md "Exactness"). Writes a table (stdout and ``--out``.md), JSON and a PNG.

    python docs/measure_speculation.py --model qwen2.5-coder-1.5b \\
        --draft 0.5b=qwen2.5-coder-0.5b --draft pruned6=runs/prune6.gguf --draft distilled=runs/draft-q4_k_m \\
        --draft lookup=lookup --files $(python -c "import json;print(' '.join(json.load(open('runs/x/splits.json'))['test']))")

(``--files`` defaults to a few standard-library modules.) Say the machine's load next to any number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from localcoder import models
from localcoder.engines.base import GenerationRequest
from localcoder.engines.llamacpp import LlamaCppEngine, check_same_tokenizer
from localcoder.engines.speculative import DraftModel, PromptLookup

STDLIB = tuple(str(Path(os.__file__).parent / n) for n in ("textwrap.py", "argparse.py", "json/encoder.py",
                                                            "dataclasses.py", "csv.py", "configparser.py"))


def prompts(tok, files, n_per_file: int = 2) -> list[list[int]]:
    """PSM prompts cut at line starts inside each file (the 1.5B is served in PSM)."""
    pre, suf, mid = (tok.special_token_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
    out = []
    for name in files:
        lines = Path(name).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        if len(lines) < 8:
            continue
        for j in range(n_per_file):
            cut = len(lines) * (j + 1) // (n_per_file + 1)
            prefix, suffix = "".join(lines[:cut]), "".join(lines[cut:])
            out.append([pre] + tok.tokenize(prefix)[-600:] + [suf] + tok.tokenize(suffix)[:128] + [mid])
    return out


def run(engine: LlamaCppEngine, ids: list[int], drafter, max_tokens: int) -> tuple[list[int], dict]:
    engine.drafter = drafter
    engine.reset_cache()
    stream = engine.generate(GenerationRequest(ids, max_tokens=max_tokens))
    out = list(stream)
    return out, stream.timings.to_dict()


def drafter_for(spec: str, target: LlamaCppEngine, threads: int):
    if spec == "lookup":
        return PromptLookup()
    draft = LlamaCppEngine(models.resolve(spec).path, n_ctx=4096, n_threads=threads)
    check_same_tokenizer(target, draft)
    return DraftModel(draft)


def summarize(rows: list[dict], label: str) -> dict:
    mine = [r for r in rows if r["drafter"] == label]
    drafted = sum(r["draft_n"] for r in mine)
    return {"drafter": label, "prompts": len(mine), "identical": sum(r["same"] for r in mine),
            "median_tok_s": round(statistics.median(r["tok_s"] for r in mine), 2),
            "median_speedup": round(statistics.median(r["speedup"] for r in mine), 3),
            "tokens_per_forward": round(statistics.median(r["tokens_per_forward"] for r in mine), 3) if drafted else 1.0,
            "acceptance": round(sum(r["accepted"] for r in mine) / drafted, 3) if drafted else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="the target")
    ap.add_argument("--draft", action="append", default=[], metavar="LABEL=MODEL",
                    help="a drafter: a model with the target's tokenizer, or `lookup` (repeatable)")
    ap.add_argument("--files", nargs="+", default=list(STDLIB), help="source files to cut prompts from")
    ap.add_argument("--per-file", type=int, default=2)
    ap.add_argument("--max-prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="speculation", help="path stem for .md, .json and .png")
    args = ap.parse_args()
    target = LlamaCppEngine(models.resolve(args.model).path, n_ctx=4096, n_threads=args.threads)
    drafters = {}
    for item in args.draft or ["lookup=lookup"]:
        label, _, spec = item.partition("=")
        drafters[label] = drafter_for(spec or label, target, args.threads)
    todo = prompts(target.tokenizer, args.files, args.per_file)[: args.max_prompts]
    rows = []
    for i, ids in enumerate(todo):
        plain, t0 = run(target, ids, None, args.max_tokens)
        for label, drafter in drafters.items():
            fast, t1 = run(target, ids, drafter, args.max_tokens)
            rows.append({"prompt": i, "drafter": label, "same": plain == fast, "tok_s": t1["predicted_per_second"],
                         "alone_tok_s": t0["predicted_per_second"],
                         "speedup": t1["predicted_per_second"] / max(t0["predicted_per_second"], 1e-9),
                         "tokens_per_forward": t1["tokens_per_forward"], "draft_n": t1["draft_n"],
                         "accepted": t1["draft_n_accepted"], "generated": len(plain)})
        print(f"prompt {i + 1}/{len(todo)}: alone {t0['predicted_per_second']:.1f} tok/s; " + ", ".join(
            f"{r['drafter']} {r['tok_s']:.1f}" for r in rows[-len(drafters):]), file=sys.stderr, flush=True)
    alone = statistics.median(r["alone_tok_s"] for r in rows if r["drafter"] == next(iter(drafters)))
    table = [summarize(rows, label) for label in drafters]
    result = {"model": args.model, "drafts": dict(item.partition("=")[::2] for item in args.draft),
              "max_tokens": args.max_tokens, "prompts": len(todo), "median_alone_tok_s": round(alone, 2),
              "drafters": table, "rows": rows, "load": os.getloadavg()}
    md = [f"Target {args.model} alone: median {alone:.1f} tok/s decode ({len(todo)} prompts, {args.max_tokens} "
          f"tokens, load {os.getloadavg()[0]:.1f}).", "",
          "| drafter | decode tok/s (median) | × alone (median of per-prompt ratios) | tokens per target forward | "
          "draft acceptance | outputs identical |", "|---|---|---|---|---|---|"]
    for t in table:
        acceptance = "–" if t["acceptance"] is None else f"{t['acceptance']:.2f}"
        md.append(f"| {t['drafter']} | {t['median_tok_s']:.1f} | {t['median_speedup']:.2f} | "
                  f"{t['tokens_per_forward']:.2f} | {acceptance} | {t['identical']}/{t['prompts']} |")
    text = "\n".join(md) + "\n"
    print(text)
    out = Path(args.out)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(table, alone, out.with_suffix(".png"), args.model)


def plot(table: list[dict], alone: float, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = ["alone"] + [t["drafter"] for t in table]
    ax.bar(labels, [alone] + [t["median_tok_s"] for t in table], color=["grey"] + ["tab:blue"] * len(table))
    for i, t in enumerate(table, start=1):
        ax.text(i, t["median_tok_s"], f"{t['median_speedup']:.2f}×", ha="center", va="bottom")
    ax.set_ylabel("decode tok/s (median)")
    ax.set_title(f"{model}: greedy decode with each drafter (same output)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""What the docstring/comment scope rule (``[completion] string_scope``) costs in quality, and what it saves.

The rule only acts on multi-line middles whose cursor sits inside a docstring or block comment, and it
only shortens them. So each case is completed once by the default configuration with the rule off, and
the rule is applied to that very text afterwards: both arms come from one generation, paired exactly.
Cases: held-out multi-line spans (2-6 lines, ``localcoder eval --suite heldout --heldout-kinds block``)
whose cursor is inside a string or comment, from code the layout adapter never saw.

    python docs/measure_string_scope.py [N] [OUT.json] \\
        --data .venv/lib/python3.11/site-packages/{starlette,httpx,jinja2,click}

Reports ES (rule on vs off, paired bootstrap CI), how many cases the rule shortened, and the generated
tokens it saves (the decode time of the keystroke's tail; docs/latency.md, "The tail of a keystroke").
"""

from __future__ import annotations

import argparse
import json
import statistics

from localcoder.completion import Completer, InfillRequest
from localcoder.config import Config
from localcoder.eval.heldout import sample_cases
from localcoder.eval.metrics import edit_similarity, exact_match, paired_bootstrap
from localcoder.stops import StopRules, open_block_closer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=80)
    ap.add_argument("out", nargs="?", default="string-scope.json")
    ap.add_argument("--data", nargs="+", required=True)
    args = ap.parse_args()
    pool = sample_cases(args.data, args.n * 8, seed=0, kinds=("block",))
    cases = [c for c in pool if open_block_closer(c.prefix)][: args.n]
    cfg = Config()
    cfg.model.threads, cfg.completion.string_scope = 2, False
    completer = Completer.from_config(cfg, pull=True)
    tok = completer.engine.tokenizer
    rows = []
    for i, c in enumerate(cases):
        req = InfillRequest(c.prefix, c.suffix, path=c.path, mode="multi")
        r = completer.complete(req)
        rules = StopRules("multi", c.prefix, c.suffix, indent=req.indent, string_scope=True)  # the rule on
        hit = rules.check(r.text, final=True)
        scoped = rules.finish(r.text[: hit[0]]) if hit is not None else r.text
        saved = len(tok.tokenize(r.text)) - len(tok.tokenize(scoped)) if scoped != r.text else 0
        rows.append({"id": c.id, "off": r.text, "on": scoped, "reference": c.reference,
                     "es_off": edit_similarity(r.text, c.reference), "es_on": edit_similarity(scoped, c.reference),
                     "em_off": exact_match(r.text, c.reference), "em_on": exact_match(scoped, c.reference),
                     "tokens": r.timings.predicted_n, "tokens_saved": saved,
                     "ms_per_token": r.timings.predicted_ms / max(1, r.timings.predicted_n)})
        print(f"{i + 1}/{len(cases)} {c.id}: ES {rows[-1]['es_off']:.3f} -> {rows[-1]['es_on']:.3f}, "
              f"{saved} tokens saved", flush=True)
    on, off = [r["es_on"] for r in rows], [r["es_off"] for r in rows]
    diff = paired_bootstrap(on, off)
    shortened = [r for r in rows if r["tokens_saved"]]
    summary = {"n": len(rows), "es_on": statistics.mean(on), "es_off": statistics.mean(off), "es_diff": diff,
               "shortened": len(shortened),
               "tokens_saved_median_of_shortened": statistics.median([r["tokens_saved"] for r in shortened])
               if shortened else 0,
               "tokens_mean_off": statistics.mean(r["tokens"] for r in rows),
               "tokens_mean_on": statistics.mean(r["tokens"] - r["tokens_saved"] for r in rows),
               "ms_per_token_median": statistics.median(r["ms_per_token"] for r in rows)}
    print(json.dumps(summary, indent=1))
    with open(args.out, "w") as fh:
        json.dump({"summary": summary, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

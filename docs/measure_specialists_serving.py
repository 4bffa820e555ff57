"""Serving a specialist bundle: what routing and adapter switching add to a request (packaged 0.5B, llama.cpp).

    python docs/measure_specialists_serving.py --n 30 --out specialists-serving.json [--bundle DIR] [--threads 2]

Without --bundle, a 2-adapter bundle is built in a temporary directory the way the tests build theirs
(tests/specialist_bundles.py: the shipped layout adapter and a copy of it with lora_b negated, a TF-IDF router
over Python and JavaScript). Medians over --n of:

- route: ``Router.route`` of a new document (embedding + nearest centroid) over a ~3000-character context
  (the end of a prefix, the start of a suffix, from standard-library files); and of a known one (sticky);
- switch call: ``llama_set_adapters_lora`` alone (what ``timings.adapter_switch_ms`` reports); llama.cpp
  re-plans its graph at the next decode, so that cost lands in the request, not in the call;
- the request: the same-length prompt, evaluated cold (``cache_prompt: false``) in both cases, right after a
  request under the same adapter (no switch) and under the other (switch); the paired difference is what a
  switch adds end to end (--prompt-tokens, and 16 tokens + 1, where less work around it means less noise);
- keystrokes: one document typed into, request after request: the switches and routing they pay.

Prints a table, writes JSON with --out. Say the machine's load next to any number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from localcoder.completion import Completer, InfillRequest
from localcoder.config import Config
from localcoder.engines.base import GenerationRequest

TARGET_MS = 20.0  # routing + switch per request


def stdlib_texts(n: int, chars: int) -> list[tuple[str, str]]:
    """``n`` (path, text) pairs of at least ``chars`` characters from the standard library, in a fixed order."""
    root = Path(os.__file__).parent
    out = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= chars:
            out.append((path.name, text))
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} standard-library files of {chars} characters")


def demo_bundle(model: str, where: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from specialist_bundles import make_bundle, scaled_lora

    from localcoder.models import BUILTIN, shipped_adapter

    shipped = shipped_adapter(model)
    if shipped is None or model not in BUILTIN:
        raise SystemExit(f"no shipped adapter for {model}; pass --bundle")
    m = BUILTIN[model]
    negated = scaled_lora(shipped, where / "negated.gguf", -1.0)
    return make_bundle(where / "bundle", [shipped, negated], base={"name": m.name, "sha256": m.sha256, "size": m.size})


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3) if xs else float("nan")


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--bundle", help="a bundle directory (default: a demo bundle of 2 adapters)")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256, help="length of the cold prompts (switch vs not)")
    ap.add_argument("--keystrokes", type=int, default=12)
    ap.add_argument("--out")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="specialists-")
    bundle = Path(args.bundle) if args.bundle else demo_bundle(args.model, Path(tmp.name))
    cfg = Config()
    cfg.apply({"model": args.model, "specialists": str(bundle), "threads": args.threads, "ctx": 2048,
               "cache_slots": 3, "typed_through": False})
    completer = Completer.from_config(cfg, pull=True)
    engine, router = completer.engine, completer.router
    assert router is not None and len(router.names) >= 2, "a bundle of at least 2 specialists"
    texts = stdlib_texts(args.n, 4000)
    res: dict = {"model": args.model, "bundle": str(bundle), "specialists": router.names, "threads": args.threads,
                 "n": args.n, "load_avg": os.getloadavg()}

    # routing: a new document each time (embedding + nearest centroid), then the same documents again (sticky)
    route_new, route_sticky, picked = [], [], []
    for path, text in texts:
        prefix, suffix = text[:3000], text[3000:4000]
        idx, ms = router.route(path, path, prefix, suffix)
        route_new.append(ms)
        picked.append(idx)
    for path, text in texts:
        t0 = time.perf_counter()
        router.route(path, path, text[:3000], text[3000:4000])
        route_sticky.append(ms_since(t0))
    res["route_ms"] = {"new_document": median(route_new), "known_document": median(route_sticky),
                       "context_chars": 4000, "picked": {router.names[k]: picked.count(k) for k in set(picked)}}

    # the switch call alone
    calls = []
    for i in range(args.n):
        calls.append(engine._use_adapter(i % 2))  # alternates: every call switches
    res["switch_call_ms"] = median(calls)

    # a cold request right after one under the same adapter vs the other one
    tok = engine.tokenizer
    prompts = []
    for _, text in texts:
        ids = tok.tokenize(text)
        assert len(ids) >= args.prompt_tokens + 16
        prompts.append(ids[: args.prompt_tokens])

    def run(ids: list[int], adapter: int, max_tokens: int) -> float:
        t0 = time.perf_counter()
        stream = engine.generate(GenerationRequest(list(ids), max_tokens=max_tokens, adapter=adapter,
                                                   cache_prompt=False))
        for _ in stream:
            pass
        return ms_since(t0)

    def compare(n_tokens: int, max_tokens: int) -> dict:
        """Cold requests of ``n_tokens``: right after one under the same adapter, and under the other."""
        same, switched = [], []
        for i, ids in enumerate(prompts):
            a, b = i % 2, 1 - i % 2
            run(ids[:8], a, 1)  # adapter a set and its graph planned
            same.append(run(ids[:n_tokens], a, max_tokens))
            switched.append(run(prompts[(i + 1) % len(prompts)][:n_tokens], b, max_tokens))
        diffs = [s - n for s, n in zip(switched, same)]
        return {"no_switch": median(same), "switch": median(switched), "added_by_switch": median(diffs),
                "prompt_tokens": n_tokens, "max_tokens": max_tokens}

    res["request_ms"] = compare(args.prompt_tokens, 4)
    res["short_request_ms"] = compare(16, 1)  # the same comparison with little work around it: less noise

    # keystrokes in one file: one routing decision, no switch after the first request
    path, text = texts[0]
    cut = 2000
    own, _ = completer.route(InfillRequest(text[:cut], text[cut: cut + 400], path=f"typed/{path}"))
    run(prompts[1][:8], 1 - own, 1)  # the other specialist is set: the first keystroke switches, no other may
    before = engine.adapter_switches
    strokes = []
    for k in range(args.keystrokes):
        r = completer.complete(InfillRequest(text[: cut + k], text[cut + k: cut + k + 400], path=f"typed/{path}",
                                             max_tokens=4))
        strokes.append({"specialist": r.timings.specialist, "route_ms": round(r.timings.route_ms, 3),
                        "switch_ms": round(r.timings.adapter_switch_ms, 3), "cached": r.tokens_cached,
                        "evaluated": r.tokens_evaluated})
    res["keystrokes"] = {"n": args.keystrokes, "switches": engine.adapter_switches - before,
                         "switches_after_the_first": sum(1 for s in strokes[1:] if s["switch_ms"] > 0),
                         "routed_after_the_first": sum(1 for s in strokes[1:] if s["route_ms"] > 0),
                         "specialists": sorted({s["specialist"] for s in strokes}), "requests": strokes}
    route, added = res["route_ms"]["new_document"], res["short_request_ms"]["added_by_switch"]
    res["per_request_overhead_ms"] = {"route_plus_switch_call": round(route + res["switch_call_ms"], 3),
                                      "route_plus_switch_end_to_end": round(route + added, 3), "target": TARGET_MS}
    engine.close()

    rows = [("route, new document (3000 + 1000 chars)", res["route_ms"]["new_document"]),
            ("route, known document (sticky)", res["route_ms"]["known_document"]),
            ("llama_set_adapters_lora call", res["switch_call_ms"]),
            (f"cold request, {args.prompt_tokens} tok + 4, no switch", res["request_ms"]["no_switch"]),
            (f"cold request, {args.prompt_tokens} tok + 4, switch", res["request_ms"]["switch"]),
            ("added by a switch (paired median)", res["request_ms"]["added_by_switch"]),
            ("cold request, 16 tok + 1, no switch", res["short_request_ms"]["no_switch"]),
            ("cold request, 16 tok + 1, switch", res["short_request_ms"]["switch"]),
            ("added by a switch (paired median), 16 tok", res["short_request_ms"]["added_by_switch"]),
            ("route + switch, end to end (16 tok)", res["per_request_overhead_ms"]["route_plus_switch_end_to_end"])]
    print(f"specialists {router.names}, {args.n} runs, {args.threads} threads, load {res['load_avg'][0]:.2f}")
    print(f"{'':44} {'median ms':>10}")
    for name, value in rows:
        print(f"{name:44} {value:10.3f}")
    ks = res["keystrokes"]
    print(f"keystrokes in one file: {ks['n']} requests, {ks['switches']} switch(es) in all, "
          f"{ks['switches_after_the_first']} after the first, routed {ks['routed_after_the_first']} time(s) after the "
          f"first; target route + switch <= {TARGET_MS} ms")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1), encoding="utf-8")
    tmp.cleanup()


if __name__ == "__main__":
    main()

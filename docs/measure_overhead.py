"""Warm mid-file keystrokes sent alternately to two `localcoder serve`s (A, B): client latency and the
part of it outside the engine's prompt+decode time, per server (a before/after of the request path).

    localcoder serve --port 18911 &   # e.g. the old commit (git archive + PYTHONPATH), and the new one:
    localcoder serve --port 18912 &
    python docs/measure_overhead.py http://127.0.0.1:18911 http://127.0.0.1:18912 160

llama.vim's bodies from `localcoder bench`'s mid-file workload; the first 8 requests and typed-through
answers are left out; before each request both servers finish their background prefills."""
import sys, time, statistics, copy
import httpx
from localcoder import bench_editor as ed
from localcoder.bench import default_typing_file
urls = sys.argv[1:3]; chars = int(sys.argv[3]) if len(sys.argv) > 3 else 120
a = str(default_typing_file())
wl = ed.editor_workloads(a, a, chars, 128)["vim:mid-file"]
cs = [httpx.Client(base_url=u, timeout=600) for u in urls]
rows = {u: [] for u in urls}
for i, req in enumerate(wl):
    for u, c in zip(urls, cs):
        while any(int(x.get("/health").json().get("background", 0)) for x in cs):
            time.sleep(0.05)
        body = copy.deepcopy(req.body); body.pop("response_fields", None)
        t0 = time.perf_counter(); d = c.post("/infill", json=body).json(); ms = (time.perf_counter() - t0) * 1000
        t = d.get("timings", {})
        if i < 8 or t.get("typed_through"):
            continue
        rows[u].append((ms, ms - t["prompt_ms"] - t["predicted_ms"], d["content"]))
for u in urls:
    r = rows[u]
    print(u, "n", len(r), "median latency", round(statistics.median(x[0] for x in r), 1), "median outside engine", round(statistics.median(x[1] for x in r), 1))
print("same texts:", sum(x[2] == y[2] for x, y in zip(*rows.values())), "of", min(len(v) for v in rows.values()))

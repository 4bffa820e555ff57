"""The bench's cursor jumps against one `localcoder serve` alone: is a slow first completion after a jump the
server's doing, or the bench's (several servers sharing two cores)?

Sends the bench's own after-jump bodies (``localcoder.bench_editor.jump_requests``: llama.vim's warm-up with
``n_predict: 0``, a rest, then one keystroke) to a fresh default server on loopback, and prints each
keystroke's latency with the prompt and cached token counts from the response. No other server runs.

    python docs/measure_jumps_alone.py [--jumps 4] [--rest 5] [--gap 8] [--model qwen2.5-coder-0.5b]

``--gap``: seconds between a keystroke and the next jump's warm-up (0: the next jump comes while the
full window of the last one is still being prefilled in the background). docs/latency.md,
"A second CPU class".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from localcoder import bench_editor as ed
from localcoder.bench import default_typing_file, free_port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jumps", type=int, default=4)
    ap.add_argument("--rest", type=float, default=5.0, help="seconds between the warm-up and the keystroke")
    ap.add_argument("--gap", type=float, default=8.0, help="seconds between a keystroke and the next jump")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    text = default_typing_file().read_text(encoding="utf-8")
    other = (Path(os.__file__).parent / "shlex.py").read_text(encoding="utf-8")
    requests = ed.jump_requests(text, "textwrap.py", args.jumps, ed.extra_chunk(other, "shlex.py"), 24)
    port = free_port()
    cmd = [sys.executable, "-m", "localcoder.cli", "serve", "--model", args.model, "--threads", str(args.threads),
           "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("the server never became ready")
                time.sleep(0.3)
            print("jump  keystroke ms  prompt  cached  generated")
            for i, req in enumerate(requests):
                client.post("/infill", json=req.warm).raise_for_status()
                time.sleep(args.rest)
                t0 = time.perf_counter()
                res = client.post("/infill", json=req.body)
                ms = (time.perf_counter() - t0) * 1000
                res.raise_for_status()
                body = res.json()
                cached = body.get("tokens_cached", 0)
                prompt = body.get("timings/prompt_n", 0) + cached
                print(f"{i + 1:>4}  {ms:>12.0f}  {prompt:>6}  {cached:>6}  {body.get('timings/predicted_n', 0):>9}")
                time.sleep(args.gap)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()

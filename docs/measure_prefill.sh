#!/usr/bin/env bash
# Prefill / decode tok/s of one llama-server binary on the packaged 0.5B at prompt depths 16 / 400 / 1,150
# (cold each time, 2 threads, two rounds). docs/latency.md "What the portable build costs".
#   bash docs/measure_prefill.sh BINARY [PORT] [FLASH_ATTN on|off]
BIN=$1; PORT=${2:-18090}; FA=${3:-off}
M=~/.cache/localcoder/models/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
$BIN -m $M --port $PORT -t 2 -tb 2 -np 1 -fa $FA -c 4096 > /tmp/ls_probe_$PORT.log 2>&1 & P=$!
for i in $(seq 60); do curl -sf http://127.0.0.1:$PORT/health >/dev/null && break; sleep 1; done
"$(dirname "$0")/../.venv/bin/python" - "$PORT" <<'PY'
import sys, json, httpx
port = sys.argv[1]
text = open("/usr/lib/python3.11/textwrap.py").read()
ids = httpx.post(f"http://127.0.0.1:{port}/tokenize", json={"content": text}).json()["tokens"]
for rnd in range(2):
    for d in (16, 400, 1150):
        r = httpx.post(f"http://127.0.0.1:{port}/completion", json={"prompt": ids[:d], "n_predict": 32, "cache_prompt": False,
                        "temperature": 0, "ignore_eos": True}, timeout=120).json()["timings"]
        print(port, rnd, d, "prefill %.1f tok/s  decode %.1f tok/s (%.1f ms/tok)" % (r["prompt_per_second"], r["predicted_per_second"], r["predicted_per_token_ms"]))
PY
kill $P

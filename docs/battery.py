"""The bad-input battery behind docs/reliability.md: hostile HTTP and LSP input, loopback only, bounded.

    python docs/battery.py                      # starts `localcoder serve --engine fake` and `localcoder lsp`
    python docs/battery.py --url http://127.0.0.1:8765   # an already running server (HTTP cases only)
    python docs/battery.py --json               # totals as JSON
    python docs/battery.py --model qwen2.5-coder-0.5b --no-lsp   # HTTP cases against the real llama.cpp engine

It needs only the standard library and a `localcoder` on this Python. Every case has a deadline
(``--timeout``, default 15 s): a reply that does not come in time is a hang. It prints, per group
and in total: cases tried, 5xx answers, crashes (the server process died), hangs (no answer, or a
connection held open past the read deadlines), silent corruptions (a corrupted cached model taken
as good) and wrong answers (an answer, but not the one a careful server gives: a 200 for a
text/plain POST, a foreign Host served, exit code 0 after exit without shutdown...).

The model check copies the cached packaged 0.5B GGUF into a temporary LOCALCODER_HOME, flips one
byte and asks `localcoder models path`/`verify`; skipped (``--no-model``) if that model is not cached.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

LONE = "\ud800"
LC = [sys.executable, "-m", "localcoder.cli"]
# read deadlines for the server this script starts (ignored by versions without them)
SERVE_ENV = {"LOCALCODER_HEADER_TIMEOUT_S": "2", "LOCALCODER_BODY_TIMEOUT_S": "3", "LOCALCODER_KEEP_ALIVE_S": "2"}


class Tally:
    def __init__(self) -> None:
        self.rows: dict[str, Counter] = {}
        self.failures: list[str] = []

    def add(self, group: str, name: str, outcome: str) -> None:
        c = self.rows.setdefault(group, Counter())
        c["cases"] += 1
        if outcome != "ok":
            c[outcome.split(":", 1)[0]] += 1
            self.failures.append(f"{group}/{name}: {outcome}")

    def total(self) -> Counter:
        out: Counter = Counter()
        for c in self.rows.values():
            out.update(c)
        return out


KINDS = ("cases", "5xx", "crash", "hang", "corruption", "wrong")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- HTTP -----------------------------------------------------------------------------------------------------
class Http:
    def __init__(self, url: str, timeout: float, proc: subprocess.Popen | None = None, restart=None):
        self.host, port = url.removeprefix("http://").rstrip("/").split(":")
        self.port, self.timeout, self.proc, self.restart = int(port), timeout, proc, restart

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
                ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers={"Host": f"127.0.0.1:{self.port}", **(headers or {})})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def case(self, method: str, path: str, body: bytes | None, headers: dict | None, expect: set[int]) -> str:
        try:
            status, data = self.request(method, path, body, headers)
        except (socket.timeout, TimeoutError):
            return "hang"
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            if self.proc is not None and self.proc.poll() is not None:
                self.restart()
                return f"crash: {exc.__class__.__name__}"
            return f"wrong: connection error {exc.__class__.__name__}"
        if self.proc is not None and self.proc.poll() is not None:
            self.restart()
            return "crash"
        if status >= 500:
            return f"5xx: {status} {data[:120]!r}"
        return "ok" if status in expect else f"wrong: {status} (expected {sorted(expect)}) {data[:100]!r}"


def j(obj: Any) -> bytes:
    return json.dumps(obj).encode("ascii")  # lone surrogates travel as \\ud800 escapes


JSON = {"Content-Type": "application/json"}


def http_cases() -> list[tuple[str, str, str, bytes | None, dict | None, set[int]]]:
    """(name, method, path, body, headers, acceptable statuses)."""
    cases = []
    surrogate_bodies = {
        "infill.input_prefix": ("/infill", {"input_prefix": f"a{LONE} = "}),
        "infill.input_suffix": ("/infill", {"input_prefix": "x", "input_suffix": LONE}),
        "infill.prompt": ("/infill", {"prompt": f"{LONE}"}),
        "infill.input_extra.text": ("/infill", {"input_prefix": "x", "input_extra": [{"filename": "a", "text": LONE}]}),
        "infill.input_extra.filename": ("/infill", {"input_prefix": "x", "input_extra": [{"filename": LONE, "text": "t"}]}),
        "infill.stop": ("/infill", {"input_prefix": "x", "stop": [LONE]}),
        "openai.prompt": ("/v1/completions", {"prompt": f"x{LONE}"}),
        "openai.suffix": ("/v1/completions", {"prompt": "x", "suffix": LONE}),
        "openai.raw_fim": ("/v1/completions", {"prompt": f"<|fim_prefix|>{LONE}<|fim_suffix|><|fim_middle|>"}),
        "openai.unknown_field_name": ("/v1/completions", {"prompt": "x", LONE: 1}),
        "tabby.prefix": ("/v1/completions", {"segments": {"prefix": LONE, "suffix": ""}}),
        "tabby.filepath": ("/v1/completions", {"segments": {"prefix": "x", "filepath": LONE}}),
    }
    for name, (path, body) in surrogate_bodies.items():
        expect = {400} if "unknown_field" in name else {200}
        cases.append((f"surrogate {name}", "POST", path, j(body), JSON, expect))
        if not name.startswith("tabby") and "unknown" not in name:
            cases.append((f"surrogate {name} stream", "POST", path, j({**body, "stream": True}), JSON, expect))
    for depth in (1000, 10_000, 100_000):
        for path in ("/infill", "/v1/completions"):
            cases.append((f"nesting {depth} {path}", "POST", path, b'{"x":' + b"[" * depth + b"]" * depth + b"}",
                          JSON, {400}))
    malformed = [b"", b"{", b"\xff\xfe{}", b"[]", b"null", b'"s"', b"1e999", b'{"input_prefix": NaN}',
                 b'{"input_prefix": "a", "input_prefix": 5}', b"{" * 50_000]
    for i, body in enumerate(malformed):
        cases.append((f"malformed #{i}", "POST", "/infill", body, JSON, {400}))
    wrong_types = [{"input_prefix": 5}, {"input_suffix": []}, {"n_predict": "x"}, {"n_predict": -5},
                   {"n_predict": 10**12}, {"n_predict": True}, {"input_extra": "x"}, {"input_extra": [1]},
                   {"input_extra": [{"text": 5}]}, {"input_extra": [{"text": "a"}] * 1000}, {"stop": 5},
                   {"stop": ["a"] * 1000}, {"temperature": -1}, {"temperature": "hot"}, {"top_p": 0},
                   {"response_fields": "content"}, {"id_slot": 2**40}, {"t_max_predict_ms": -1}, {"stream": "yes"}]
    for i, body in enumerate(wrong_types):
        cases.append((f"wrong type infill #{i}", "POST", "/infill", j({"input_prefix": "x", **body}), JSON, {400}))
    for i, body in enumerate([{"prompt": 5}, {"prompt": ["a", "b"]}, {"prompt": "x", "n": 2}, {"prompt": "x", "echo": True},
                              {"prompt": "x", "logprobs": 3}, {"prompt": "<|fim_prefix|>a", "suffix": "b"},
                              {"prompt": "x", "max_tokens": -1}, {"segments": "x"}, {"segments": {"prefix": 5}}]):
        cases.append((f"wrong type completions #{i}", "POST", "/v1/completions", j(body), JSON, {400}))
    good = j({"input_prefix": "x = "})
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        cases.append((f"content-type {ctype}", "POST", "/infill", good, headers, {415}))
    for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example", "localhost.evil.example", "10.0.0.1"):
        for method, path in (("GET", "/health"), ("POST", "/infill")):
            cases.append((f"host {host} {path}", method, path, good if method == "POST" else None,
                          {**JSON, "Host": host}, {403}))
    for method, path, expect in (("GET", "/infill", {405}), ("DELETE", "/v1/completions", {405}),
                                 ("GET", "/../../etc/passwd", {404}), ("GET", "/" + "a" * 8000, {404, 414, 400}),
                                 ("GET", "/health?x=" + "%00" * 100, {200}), ("PUT", "/health", {405})):
        cases.append((f"route {method} {path[:30]}", method, path, None, None, expect))
    cases.append(("body 2 MB", "POST", "/infill", j({"input_prefix": "a" * 2_000_000}), JSON, {413}))
    cases.append(("header 64 KB", "GET", "/health", None, {"X-Big": "a" * 65536}, {400, 431}))
    for name, path in (("llama.vim", "/infill"), ("openai", "/v1/completions")):
        body = {"input_prefix": "def f():\n    "} if path == "/infill" else {"prompt": "def f():\n    "}
        cases.append((f"control {name}", "POST", path, j(body), JSON, {200}))
    return cases


def slow_clients(url: str, tally: Tally, n_header: int = 20, n_body: int = 10, bound_s: float = 8.0) -> None:
    """Clients that send half their headers or body: the server must drop each within ``bound_s``."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    socks = []
    for i in range(n_header + n_body):
        s = socket.create_connection((host, int(port)), timeout=5)
        head = b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        s.sendall(head if i < n_header else head + b"Content-Length: 1000\r\n\r\n{\"input_prefix\": ")
        socks.append(("half headers" if i < n_header else "half body", s))
    deadline = time.monotonic() + bound_s
    for name, s in socks:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            while s.recv(4096):
                pass
            outcome = "ok"
        except (socket.timeout, TimeoutError):
            outcome = f"hang: still open after {bound_s:g}s"
        except ConnectionError:
            outcome = "ok"
        s.close()
        tally.add("http slow clients", name, outcome)


def start_serve(env: dict, model: str = "fake") -> tuple[subprocess.Popen, str]:
    port = free_port()
    engine = ["--engine", "fake"] if model == "fake" else ["--max-tokens", "8"]  # a real model: short answers
    proc = subprocess.Popen([*LC, "serve", *engine, "--model", model, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if Http(url, 2).request("GET", "/health")[0] == 200:
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("localcoder serve did not become ready")


def run_http(args, tally: Tally, env: dict) -> None:
    holder: dict[str, Any] = {}

    def restart() -> None:
        holder["proc"], holder["url"] = start_serve(env, args.model)
        client.proc, client.port = holder["proc"], int(holder["url"].rsplit(":", 1)[1])

    if args.url:
        client = Http(args.url, args.timeout)
    else:
        holder["proc"], holder["url"] = start_serve(env, args.model)
        client = Http(holder["url"], args.timeout, holder["proc"], restart)
    try:
        for name, method, path, body, headers, expect in http_cases():
            tally.add("http", name, client.case(method, path, body, headers, expect))
        slow_clients(args.url or f"http://127.0.0.1:{client.port}", tally)
        tally.add("http", "control after slow clients",
                  client.case("POST", "/infill", j({"input_prefix": "x"}), JSON, {200}))
    finally:
        if holder.get("proc") is not None:
            holder["proc"].terminate()
            holder["proc"].wait(10)


# ---- LSP ------------------------------------------------------------------------------------------------------
def frame(obj: Any, length: int | None = None, header: bytes = b"Content-Length") -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode("ascii")
    return header + b": %d\r\n\r\n" % (len(body) if length is None else length) + body


def req(i: Any, method: str, params: Any = None) -> dict:
    return {"jsonrpc": "2.0", "id": i, "method": method, **({"params": params} if params is not None else {})}


def note(method: str, params: Any) -> dict:
    return {"jsonrpc": "2.0", "method": method, "params": params}


INIT = req(1, "initialize", {"processId": None, "rootUri": "file:///tmp/battery", "capabilities": {}})
URI = "file:///tmp/battery/a.py"


class Lsp:
    def __init__(self, env: dict, timeout: float):
        self.timeout = timeout
        self.proc = subprocess.Popen([*LC, "lsp", "--engine", "fake", "--model", "fake"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ids = iter(range(1000, 10**9))

    def _read(self) -> None:
        out = self.proc.stdout
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    return
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                if line == b"\r\n":
                    break
            self.inbox.put(json.loads(out.read(length)))

    def send(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def wait_for(self, match: Callable[[dict], bool], timeout: float | None = None) -> dict | None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            try:
                msg = self.inbox.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None:
                    return None
                continue
            if match(msg):
                return msg
        return None

    def ask(self, method: str, params: Any = None, msg_id: Any = None) -> dict | None:
        msg_id = next(self.ids) if msg_id is None else msg_id
        self.send(frame(req(msg_id, method, params)))
        return self.wait_for(lambda m: m.get("id") == msg_id and "method" not in m)

    def initialize(self) -> bool:
        self.send(frame(INIT))
        ok = self.wait_for(lambda m: m.get("id") == 1) is not None
        self.send(frame(note("initialized", {})))
        return ok

    def outcome(self, verdict: str | None) -> str:
        """After a case: the server must still answer (else hang, or crash if it died)."""
        if self.proc.poll() is not None:
            return f"crash: exit {self.proc.returncode}"
        if self.ask("localcoder/stats", {}) is None:
            return "crash: died" if self.proc.poll() is not None else "hang: deaf after the case"
        return verdict or "ok"

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.ask("shutdown")
            self.send(frame(note("exit", None)))
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def _error_code(msg: dict | None) -> int | None:
    return (msg or {}).get("error", {}).get("code")


def lsp_frame_cases() -> list[tuple[str, bytes, Callable[[Lsp], str | None]]]:
    stats = json.dumps(req(5, "localcoder/stats", {})).encode()

    def answered_error(lsp: Lsp) -> str | None:
        return None if lsp.wait_for(lambda m: "error" in m, 8) else "wrong: no error answer"

    def served(msg_id: int) -> Callable[[Lsp], str | None]:
        return lambda lsp: None if lsp.wait_for(lambda m: m.get("id") == msg_id and "result" in m, 8) else \
            "wrong: request not served"

    return [
        ("Content-Length 10**12", b"Content-Length: 1000000000000\r\n\r\n" + stats, answered_error),
        ("non-numeric", b"Content-Length: abc\r\n\r\n" + stats, answered_error),
        ("negative", b"Content-Length: -5\r\n\r\n" + stats, answered_error),
        ("zero", b"Content-Length: 0\r\n\r\n" + stats, answered_error),
        ("lowercase header", frame(req(6, "localcoder/stats", {}), header=b"content-length"), served(6)),
        ("no space after colon", b"Content-Length:%d\r\n\r\n%s" % (len(stats), stats.replace(b'"id": 5', b'"id": 7')),
         served(7)),
        ("too small", frame(stats, length=len(stats) - 5), answered_error),
        ("too large then a frame", frame(stats, length=len(stats) + 30) + frame(req(8, "localcoder/stats", {})),
         served(8)),
        ("too large at the end", frame(stats, length=len(stats) + 500), answered_error),
        ("junk line", b"garbage\r\n\r\n", None),
        ("invalid UTF-8 body", frame(b"\xff\xfe{}"), answered_error),
        ("not JSON", frame(b"{oops"), answered_error),
        ("deep nesting", frame(b"[" * 100_000 + b"]" * 100_000), answered_error),
        ("batch", frame(b"[1, 2]"), answered_error),
        ("no jsonrpc", frame(b'{"id": 9, "method": "localcoder/stats"}'), answered_error),
        ("unknown method, no params", frame(req(10, "no/such")),
         lambda lsp: None if _error_code(lsp.wait_for(lambda m: m.get("id") == 10, 8)) == -32601 else "wrong: not -32601"),
        ("didChange text 5", frame(note("textDocument/didChange", {"textDocument": {"uri": URI, "version": 2},
                                                                   "contentChanges": [{"text": 5}]})), None),
    ]


def run_lsp(args, tally: Tally, env: dict) -> None:
    lsp = Lsp(env, args.timeout)
    if not lsp.initialize():
        tally.add("lsp frames", "initialize", "hang: no initialize answer")
        return
    lsp.send(frame(note("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                                   "text": "line0\nline1\n"}})))
    for name, data, check in lsp_frame_cases():
        if lsp.proc.poll() is not None:
            lsp = Lsp(env, args.timeout)
            lsp.initialize()
        lsp.send(data)
        verdict = check(lsp) if check else None
        tally.add("lsp frames", name, lsp.outcome(verdict))
    run_lsp_documents(lsp, tally)
    lsp.close()
    run_lsp_lifecycle(env, args.timeout, tally)


def run_lsp_documents(lsp: Lsp, tally: Tally) -> None:
    def inline(line: int, ch: int) -> dict | None:
        return lsp.ask("textDocument/inlineCompletion", {"textDocument": {"uri": URI}, "position":
                                                         {"line": line, "character": ch}, "context": {"triggerKind": 1}})

    def rng(a, b):
        return {"start": {"line": a[0], "character": a[1]}, "end": {"line": b[0], "character": b[1]}}

    bad_changes = {"range ends before start": [{"range": rng((1, 3), (0, 2)), "text": "x"}],
                   "second change bad": [{"range": rng((0, 0), (0, 1)), "text": "ok"},
                                         {"range": rng((1, 4), (1, 1)), "text": "y"}],
                   "negative character": [{"range": rng((0, -1), (0, 1)), "text": "x"}],
                   "text 5 with range": [{"range": rng((0, 0), (0, 1)), "text": 5}]}
    for name, changes in bad_changes.items():
        while not lsp.inbox.empty():
            lsp.inbox.get()
        lsp.send(frame(note("textDocument/didChange", {"textDocument": {"uri": URI, "version": 2},
                                                       "contentChanges": changes})))
        shown = lsp.wait_for(lambda m: m.get("method") == "window/showMessage", 5)
        verdict = None
        if shown is None:
            verdict = "wrong: no message to the user"
        elif "internal error" in shown["params"]["message"].lower():
            verdict = "wrong: an internal-error popup"
        # unchanged: "line0\nline1\n" has no line 2 content and line 0 is exactly 5 wide
        after = inline(0, 5)
        if after is None or "error" in after:
            verdict = verdict or "corruption: the document changed"
        tally.add("lsp documents", f"didChange {name}", lsp.outcome(verdict))
    lsp.send(frame(note("textDocument/didOpen", {"textDocument": {"uri": URI + "s", "languageId": "python",
                                                                   "version": 1, "text": f"def f{LONE}():\n    "}})))
    r = lsp.ask("textDocument/inlineCompletion", {"textDocument": {"uri": URI + "s"}, "position":
                                                  {"line": 1, "character": 4}, "context": {"triggerKind": 1}})
    verdict = None if r is not None and "result" in r else f"wrong: {json.dumps(r)[:120] if r else 'no answer'}"
    tally.add("lsp documents", "lone surrogate in a document", lsp.outcome(verdict))


def run_lsp_lifecycle(env: dict, timeout: float, tally: Tally) -> None:
    lsp = Lsp(env, timeout)
    code = _error_code(lsp.ask("localcoder/stats", {}))
    tally.add("lsp lifecycle", "request before initialize", "ok" if code == -32002 else f"wrong: got {code}")
    lsp.initialize()
    lsp.ask("shutdown")
    code = _error_code(lsp.ask("localcoder/stats", {}))
    tally.add("lsp lifecycle", "request after shutdown", "ok" if code == -32600 else
              ("hang: no answer" if code is None else f"wrong: got {code}"))
    lsp.send(frame(note("exit", None)))
    rc = _wait(lsp.proc)
    tally.add("lsp lifecycle", "exit after shutdown", "ok" if rc == 0 else f"wrong: exit {rc}")
    lsp = Lsp(env, timeout)
    lsp.initialize()
    lsp.send(frame(note("exit", None)))
    rc = _wait(lsp.proc)
    tally.add("lsp lifecycle", "exit without shutdown", "ok" if rc == 1 else f"wrong: exit {rc}")


def _wait(proc: subprocess.Popen) -> int | None:
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None


# ---- a corrupted cached model -------------------------------------------------------------------------------------
MODEL = "qwen2.5-coder-0.5b"


def run_model(env: dict, tally: Tally) -> None:
    src = subprocess.run([*LC, "models", "path", MODEL], capture_output=True, text=True, env=env, timeout=600)
    if src.returncode != 0:
        print(f"model check skipped: {MODEL} is not cached", file=sys.stderr)
        return
    path = Path(src.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory(prefix="lc-battery-") as home:
        copy = Path(home) / "models" / MODEL / path.name
        copy.parent.mkdir(parents=True)
        shutil.copyfile(path, copy)
        with copy.open("r+b") as fh:  # one flipped byte, same size
            fh.seek(copy.stat().st_size // 2)
            b = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([b[0] ^ 0xFF]))
        henv = {**env, "LOCALCODER_HOME": home}
        for name, cmd in (("models path", [*LC, "models", "path", MODEL]),
                          ("models verify", [*LC, "models", "verify", MODEL, "-q"])):
            r = subprocess.run(cmd, capture_output=True, text=True, env=henv, timeout=600)
            if r.returncode == 0:
                outcome = "corruption: the flipped model was taken as good"
            elif "Traceback" in r.stderr:
                outcome = "crash: traceback"
            else:
                outcome = "ok" if "--force" in r.stderr else f"wrong: {r.stderr.strip()[-120:]}"
            tally.add("model", f"flipped byte: {name}", outcome)
        r = subprocess.run([*LC, "models", "list"], capture_output=True, text=True, env=henv, timeout=60)
        row = next((line for line in r.stdout.splitlines() if line.startswith(MODEL)), "")
        tally.add("model", "flipped byte: models list", "ok" if "pulled" not in row.split() else
                  "corruption: listed as pulled")


# ---- main ----------------------------------------------------------------------------------------------------
def report(tally: Tally, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"groups": {g: dict(c) for g, c in tally.rows.items()}, "total": dict(tally.total()),
                          "failures": tally.failures}, indent=2))
        return
    print(f"{'group':22}" + "".join(f"{k:>11}" for k in KINDS))
    for group, c in [*tally.rows.items(), ("TOTAL", tally.total())]:
        print(f"{group:22}" + "".join(f"{c.get(k, 0):>11}" for k in KINDS))
    for f in tally.failures:
        print("  " + f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server on 127.0.0.1 (then only the HTTP cases run)")
    p.add_argument("--model", default="fake", help="the model the HTTP cases' server runs (fake, or e.g. "
                   "qwen2.5-coder-0.5b for the real llama.cpp engine)")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds before a case counts as a hang")
    p.add_argument("--no-lsp", action="store_true")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.url and not args.url.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise SystemExit("the battery talks to loopback only: --url http://127.0.0.1:PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCALCODER_") or k == "LOCALCODER_HOME"}
    env.update(SERVE_ENV, XDG_CONFIG_HOME=tempfile.mkdtemp(prefix="lc-battery-cfg-"))
    tally = Tally()
    t0 = time.monotonic()
    run_http(args, tally, env)
    if not args.url and not args.no_lsp:
        run_lsp(args, tally, env)
    if not args.url and not args.no_model:
        run_model(env, tally)
    report(tally, args.json)
    print(f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    t = tally.total()
    return 1 if any(t.get(k, 0) for k in KINDS[1:]) else 0


if __name__ == "__main__":
    sys.exit(main())

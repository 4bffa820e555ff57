"""Editor replay: llama.vim's exact ``/infill`` bodies, sent to ``localcoder serve`` (its default
configuration) and to llama.cpp's own ``llama-server`` run the way llama.vim's README tells its
users, on the same GGUF and the same text, interleaved request by request.

Workloads (a real source file typed character by character; a request at each pause, as an
editor's debounce would send it):
- ``vim:mid-file``: the cursor in the middle of the file, the rest of the file below it (>= 200
  tokens of suffix);
- ``vim:end-of-file``: typing at the end of a file (no suffix);
- ``vim:two-files``: two files, alternating one word in each (a user switching buffers); llama.vim's
  ``n_predict: 0`` warm-up with the other file as ``input_extra`` is sent at each switch.

A body is llama.vim's: ``input_prefix`` = up to ``n_prefix`` lines above the cursor line,
``prompt`` = the cursor line up to the cursor, ``input_suffix`` = the rest of the line and up to
``n_suffix`` lines below, ``input_extra`` = chunks of other buffers (see shared/clients).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

from localcoder.bench import Sample, WorkloadResult, pauses, server_background, wait_quiet

CLIENTS_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "clients"
N_PREFIX_LINES, N_SUFFIX_LINES = 256, 64  # llama.vim's defaults (g:llama_config n_prefix / n_suffix)


def vim_template(name: str) -> dict:
    """llama.vim's body from the compatibility fixtures (a copy of shared/clients)."""
    return json.loads((CLIENTS_DIR / f"{name}.json").read_text(encoding="utf-8"))


@dataclass
class VimRequest:
    body: dict
    file: str
    warm: dict | None = None  # a jump: this warm-up (n_predict 0 at the new place) first, then a pause


def vim_body(lines: list[str], row: int, col: int, extra: list[dict], max_tokens: int) -> dict:
    """llama.vim's request for the cursor at (row, col) of ``lines`` (each with its newline)."""
    body = copy.deepcopy(vim_template("llama_vim_infill"))
    line = lines[row] if row < len(lines) else ""
    body.update(input_prefix="".join(lines[max(0, row - N_PREFIX_LINES): row]), prompt=line[:col],
                input_suffix=line[col:] + "".join(lines[row + 1: row + 1 + N_SUFFIX_LINES]),
                input_extra=extra, n_predict=max_tokens,
                n_indent=len(line) - len(line.lstrip(" ")))
    return body


def warmup_body(extra: list[dict]) -> dict:
    body = copy.deepcopy(vim_template("llama_vim_warmup"))
    body["input_extra"] = extra
    return body


def typing_requests(text: str, name: str, chars: int, at_end: bool, extra: list[dict], max_tokens: int
                    ) -> list[VimRequest]:
    """Type ``chars`` characters of ``text`` from a line start in its middle (``at_end``: the text
    above that point is the whole file, nothing below); one request per pause (end of a word). At
    each pause the file is what was typed so far, on a line opened above the rest of the file."""
    lines = text.splitlines(keepends=True)
    above = "".join(lines[: len(lines) // 2])
    rest = text[len(above):]
    cut = rest.find("\n", chars - 1) + 1 or len(rest)  # whole lines, so the rest starts at a line start
    typed = rest[:cut]
    tail = "" if at_end else "\n" + rest[cut:]  # typing into a freshly opened line above the rest
    out = []
    for i in pauses(typed):
        before = above + typed[:i]  # the file as it is now: what is typed so far, then the rest
        now = (before + tail).splitlines(keepends=True) or [""]
        row = before.count("\n")
        col = len(before) - (before.rfind("\n") + 1)
        out.append(VimRequest(vim_body(now, row, col, extra, max_tokens), name))
    return out


# where the cursor lands, as fractions of the file: each jump >= 0.2 of the file from the one before it
JUMP_FRACTIONS = (0.8, 0.25, 0.6, 0.4, 0.9, 0.15, 0.7, 0.3, 0.5, 0.2, 0.85, 0.35)


def jump_requests(text: str, name: str, jumps: int, extra: list[dict], max_tokens: int) -> list[VimRequest]:
    """The cursor jumps to ``jumps`` places spread over the file, opens a fresh line there and rests (the
    client's warm-up: the same body with ``n_predict: 0``), then types one character: the first
    completion after a jump. The file is restored between jumps."""
    if not 0 <= jumps <= len(JUMP_FRACTIONS):
        from localcoder.errors import InvalidRequest

        raise InvalidRequest(f"editor_jumps must be 0..{len(JUMP_FRACTIONS)}, got {jumps}", param="editor_jumps")
    lines = text.splitlines(keepends=True)
    out = []
    for f in JUMP_FRACTIONS[:jumps]:
        row = max(1, min(len(lines) - 1, int(len(lines) * f)))
        body_line = lines[row]
        indent = body_line[: len(body_line) - len(body_line.lstrip(" \t"))]
        first = (body_line.strip() or "x")[0]
        opened = lines[:row] + [indent + "\n"] + lines[row:]
        warm = vim_body(opened, row, len(indent), extra, max_tokens)
        warm["n_predict"] = 0
        typed = lines[:row] + [indent + first + "\n"] + lines[row:]
        out.append(VimRequest(vim_body(typed, row, len(indent) + 1, extra, max_tokens), name, warm=warm))
    return out


def alternate(a: list[VimRequest], b: list[VimRequest]) -> list[VimRequest]:
    out = []
    for x, y in zip(a, b):
        out += [x, y]
    return out


def extra_chunk(text: str, name: str, lines: int = 64) -> list[dict]:
    return [{"filename": name, "text": "".join(text.splitlines(keepends=True)[:lines])}]


# ---- targets -------------------------------------------------------------------------------------


class VimCache:
    """llama.vim's client-side completion cache, as its users get it: a keystroke whose cursor line extends a
    cached request's by up to 128 typed characters (same lines above and below) that the cached suggestion
    starts with is answered from the cache, without a request. The bench still sends every request (so each
    server's own cache sees the same traffic) and marks the ones llama.vim would not have sent."""

    LOOK_BACK = 128

    def __init__(self, size: int = 250):  # llama.vim's max_cache_keys
        self.size = size
        self._seen: dict[tuple[str, str, str], str] = {}

    def hit(self, body: dict) -> bool:
        prompt = body.get("prompt", "")
        for i in range(1, min(self.LOOK_BACK, len(prompt)) + 1):
            content = self._seen.get((body["input_prefix"], prompt[:-i], body["input_suffix"]))
            if content is not None and len(content) > i and content.startswith(prompt[-i:]):
                return True
        return False

    def add(self, body: dict, content: str) -> None:
        self._seen[(body["input_prefix"], body.get("prompt", ""), body["input_suffix"])] = content
        while len(self._seen) > self.size:
            self._seen.pop(next(iter(self._seen)))


class InfillTarget:
    """Any server with llama.cpp's ``/infill`` (localcoder serve, llama-server)."""

    def __init__(self, name: str, url: str):
        self.name = name
        self.client = httpx.Client(base_url=url, timeout=600)
        self.vim_cache = VimCache()

    def send(self, body: dict, file: str = "") -> Sample:
        client_hit = body.get("n_predict") != 0 and self.vim_cache.hit(body)
        t0 = time.perf_counter()
        r = self.client.post("/infill", json=body)
        ms = (time.perf_counter() - t0) * 1000
        r.raise_for_status()
        d = r.json()
        timings = d.get("timings", {}) if isinstance(d.get("timings"), dict) else {}
        evaluated = int(d.get("timings/prompt_n", timings.get("prompt_n", 0)) or 0)
        cached = int(d.get("tokens_cached", 0) or 0)
        predicted = int(d.get("timings/predicted_n", timings.get("predicted_n", 0)) or 0)
        decode = d.get("timings/predicted_ms", timings.get("predicted_ms"))
        content = str(d.get("content", ""))
        if body.get("n_predict") != 0:
            self.vim_cache.add(body, content)
        # typed through: reported in `timings`, or (llama.vim's response_fields leave it out) a non-empty answer
        # for which nothing was evaluated, reused or decoded
        reused = bool(timings.get("typed_through")) or (evaluated + cached == 0 and predicted == 0 and bool(content))
        return Sample(ms, evaluated + cached, cached, predicted, content, decode or None,
                      typed_through=reused, client_hit=client_hit)

    def warm(self, body: dict, file: str = "") -> None:
        """The warm-up at a new cursor position (llama-server answers after its prefill, localcoder at once
        and prefills in the background)."""
        self.client.post("/infill", json={**body, "n_predict": 0, "stream": False}).raise_for_status()

    def background(self) -> int:
        return server_background(self.client)


def llama_server_built() -> Path:
    """Where ``tests/setup.d/llama_server.sh`` builds llama-server (``make test`` runs it)."""
    from localcoder.models import home

    return Path(os.environ.get("LLAMA_SERVER_HOME") or home() / "llama-server") / "bin" / "llama-server"


def find_llama_server() -> str | None:
    """The llama-server binary: $LOCALCODER_LLAMA_SERVER, the one the set-up script built, or PATH."""
    candidates = [os.environ.get("LOCALCODER_LLAMA_SERVER", ""), str(llama_server_built()),
                  shutil.which("llama-server") or ""]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def llama_server_cmd(binary: str, model: str, port: int, threads: int) -> list[str]:
    """llama.vim's README preset (`--cache-reuse 256`, batch/ubatch 1024, the model's context),
    on CPU threads like ours."""
    return [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-ub", "1024", "-b", "1024", "--ctx-size", "0", "--cache-reuse", "256"]


class LspTarget:
    """``localcoder lsp`` over stdio, driven as an editor drives it: the first request of a file opens it
    (``didOpen``), the later ones send the buffer as it is now (``didChange``), then ask for
    ``textDocument/inlineCompletion`` at the cursor (invoked, so the server adds no debounce of its own:
    the report adds the same client debounce to every target). The document is the text llama.vim's body
    holds (its window of the file); llama.vim's warm-ups have no LSP equivalent and are skipped. The
    response carries no token counts, so LSP rows report latency, text and whether the server typed
    through (its ``localcoder/stats`` counter, read after each keystroke's clock stopped)."""

    def __init__(self, name: str, cmd: list[str], timeout_s: float = 600):
        import subprocess
        import threading

        self.name, self.timeout_s = name, timeout_s
        from localcoder.models import TIED_TO_PARENT

        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     preexec_fn=TIED_TO_PARENT)
        self._ids = iter(range(1, 1 << 62))
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._versions: dict[str, int] = {}
        self._typed = 0  # the server's typed-through count after the last keystroke
        threading.Thread(target=self._read, daemon=True).start()
        self.call("initialize", {"processId": os.getpid(), "rootUri": None, "capabilities": {}})
        self.notify("initialized", {})
        deadline = time.monotonic() + timeout_s
        while "engine" not in (self.call("localcoder/stats", {}) or {}):  # the model loads after `initialized`
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]}: the language server never became ready")
            time.sleep(0.2)

    def _write(self, msg: dict) -> None:
        data = json.dumps(msg).encode("utf-8")
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(data) + data)
        self.proc.stdin.flush()

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            length = 0
            while (line := out.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if not line:
                break
            msg = json.loads(out.read(length))
            if "method" in msg and "id" in msg:  # a request from the server (registerCapability, ...)
                self._write({"jsonrpc": "2.0", "id": msg["id"], "result": None})
            elif "id" in msg:
                with self._cond:
                    self._replies[msg["id"]] = msg
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def notify(self, method: str, params: dict) -> None:
        self._write({"jsonrpc": "2.0", "method": method, "params": params})

    def call(self, method: str, params: dict):
        mid = next(self._ids)
        self._write({"jsonrpc": "2.0", "id": mid, "method": method, "params": params})
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._replies or self.proc.poll() is not None, self.timeout_s):
                raise TimeoutError(f"{method}: no answer from the language server in {self.timeout_s:.0f} s")
            if mid not in self._replies:
                raise RuntimeError(f"{method}: the language server exited")
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result")

    def send(self, body: dict, file: str = "buffer.py") -> Sample:
        if body.get("n_predict") == 0:  # llama.vim's warm-up: an LSP client sends nothing like it
            return Sample(0.0, 0, 0, 0, "")
        t0 = time.perf_counter()
        uri, position = self._sync(body, file)
        res = self.call("textDocument/inlineCompletion", {"textDocument": {"uri": uri}, "position": position,
                                                          "context": {"triggerKind": 1}})
        ms = (time.perf_counter() - t0) * 1000
        items = (res or {}).get("items", []) if isinstance(res, dict) else (res or [])
        # typed through: the server's counter moved (asked after the clock stopped)
        typed = int(self.call("localcoder/stats", {}).get("typed_through", 0))
        reused, self._typed = typed > self._typed, typed
        return Sample(ms, 0, 0, 0, str(items[0].get("insertText", "")) if items else "", typed_through=reused)

    def warm(self, body: dict, file: str = "buffer.py") -> None:
        """The cursor rests at a new place: the editor plugins' ``localcoder/prefetch``."""
        uri, position = self._sync(body, file)
        self.notify("localcoder/prefetch", {"textDocument": {"uri": uri}, "position": position})

    def background(self) -> int:
        return int(self.call("localcoder/stats", {}).get("background", 0))

    def _sync(self, body: dict, file: str) -> tuple[str, dict]:
        """Open or update the buffer to the body's text; the cursor's URI and LSP position."""
        uri = "file:///bench/" + file
        before = body["input_prefix"] + body.get("prompt", "")
        text = before + body["input_suffix"]
        if uri not in self._versions:
            self._versions[uri] = 1
            self.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                  "text": text}})
        else:
            self._versions[uri] += 1
            self.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": self._versions[uri]},
                                                   "contentChanges": [{"text": text}]})
        character = len(before[before.rfind("\n") + 1:].encode("utf-16-le")) // 2
        return uri, {"line": before.count("\n"), "character": character}

    def close(self) -> None:
        try:
            self.call("shutdown", None)  # type: ignore[arg-type]
            self.notify("exit", {})
            self.proc.wait(10)
        except Exception:
            self.proc.kill()


# ---- the replay ----------------------------------------------------------------------------------


def editor_workloads(file_a: str, file_b: str, chars: int, max_tokens: int, jumps: int = 0
                     ) -> dict[str, list[VimRequest]]:
    a, b = Path(file_a).read_text(encoding="utf-8"), Path(file_b).read_text(encoding="utf-8")
    na, nb = Path(file_a).name, Path(file_b).name
    jump = {"vim:after-jump": jump_requests(a, na, jumps, extra_chunk(b, nb), max_tokens)} if jumps else {}
    return {**jump,
        "vim:mid-file": typing_requests(a, na, chars, False, extra_chunk(b, nb), max_tokens),
        "vim:end-of-file": typing_requests(b, nb, chars, True, extra_chunk(a, na), max_tokens),
        "vim:two-files": alternate(typing_requests(a, na, chars // 2, False, extra_chunk(b, nb), max_tokens),
                                   typing_requests(b, nb, chars // 2, False, extra_chunk(a, na), max_tokens)),
    }


def run_replay(targets: list[InfillTarget | LspTarget], workloads: dict[str, list[VimRequest]],
               tick: Callable[[], None], pause_s: float = 5.0) -> list[WorkloadResult]:
    """Each request goes to every target in turn (separate server processes, so one target's
    requests never touch the other's cache); a buffer switch first sends llama.vim's warm-up; a jump
    sends its warm-up, then the user rests ``pause_s`` before the measured keystroke. Before a target's
    turn the others finish their background prefills (``wait_quiet``); its own go on as they would."""
    results = []
    for workload, requests in workloads.items():
        by_target = {t.name: WorkloadResult(t.name, workload) for t in targets}
        previous = None
        for req in requests:
            for target in targets:
                wait_quiet([t for t in targets if t is not target])
                if req.warm is not None:
                    target.warm(req.warm, req.file)
                    time.sleep(pause_s)
                elif previous is not None and req.file != previous:
                    target.send(warmup_body(req.body["input_extra"]))
                by_target[target.name].samples.append(target.send(req.body, req.file))
                tick()
            previous = req.file
        results += by_target.values()
    return results

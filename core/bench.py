"""`localcoder bench`: latency and throughput of a completion server, side by side with a peer.

Workloads, sent over HTTP exactly as an editor would:
- cold: single requests at fixed context sizes (tokens), each with text the cache has never seen;
- typing replay: a real source file is typed character by character; at each pause (end of a
  word, like an editor's debounce) a completion is requested. Keystroke-to-completion latency =
  debounce + request latency.
Targets: ``localcoder serve`` (``/infill``, llama.cpp's shape) and llama-cpp-python's own server
(``python -m llama_cpp.server``, ``/v1/completions`` with a raw FIM-token prompt) on the same GGUF,
both running in the same run, each request sent to one then the other. Also the physical bound: decode tok/s <= read bandwidth /
bytes read per token.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import httpx
import numpy as np

from localcoder.engines.base import Tokenizer
from localcoder.engines.kvcache import common_prefix_len
from localcoder.stats import percentile

PEER_STOPS = ["<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|fim_prefix|>", "\n\n"]  # what Continue sends
WORD_END = set(" \n\t.,:;()[]{}=")


def keystrokes(typed: str) -> list[int]:
    """Where each keystroke's edit ends, as offsets into ``typed``: one character each, except that an editor
    indents a new line itself (Vim's ``autoindent``, VS Code's on-enter rules), so a newline and the next
    line's indentation arrive as one edit."""
    return [i for i in range(1, len(typed) + 1)
            if i == len(typed) or not (typed[i] in " \t" and not typed[:i].rsplit("\n", 1)[-1].strip())]


def pauses(typed: str) -> list[int]:
    """Where a typist pauses and the client asks for a completion, as offsets into ``typed``: after each
    keystroke that ends a word (``WORD_END``) and at the end; never from inside a line's leading whitespace,
    only once the editor has inserted all of it (``keystrokes``)."""
    return [i for i in keystrokes(typed) if typed[i - 1] in WORD_END or i == len(typed)]


@dataclass
class BenchConfig:
    model: str  # GGUF path, or "fake" (tests)
    threads: int = 2
    ctx: int = 4096
    contexts: tuple[int, ...] = (256, 1024, 2048)
    cold_repeats: int = 2
    cold_suffix_tokens: int = 32
    typing_file: str = ""  # default: a stdlib module
    typing_chars: int = 200
    window_lines_before: int = 48
    window_lines_after: int = 24
    debounce_ms: int = 60  # the editor's wait before it asks: the Neovim plugin's 60 ms (VS Code's ~50) + the LSP's 0
    max_tokens: int = 24
    suffix_tokens: int = 64  # localcoder's suffix budget (PSM re-reads it at every keystroke)
    peer: bool = True
    url: str = ""  # bench a running localcoder server instead of starting one
    api_key: str = ""
    # of cold,typing,editor,formats; editor: llama.vim's bodies vs llama-server (localcoder.bench_editor);
    # formats: --model and --formats artifacts, each in-process with its own engine (localcoder.bench_formats)
    workloads: str = "cold,typing,editor"
    llama_server: str = ""  # llama-server binary for the editor replay ("" = find it; "off" = skip it)
    editor_file_b: str = ""  # second file of the two-files replay (default: the stdlib's shlex.py)
    editor_chars: int = 160
    # the editor replay's "before" or variants: serve flags of more localcoder servers (default config + these
    # flags each) in the same interleaved run, e.g. "--adapter off" (plain PSM), "--draft-model NAME"
    editor_baseline: tuple[str, ...] = ()
    editor_lsp: bool = True  # the editor replay also types through `localcoder lsp` (default config, stdio)
    editor_workloads: str = "after-jump,mid-file,end-of-file,two-files"  # which editor-replay workloads to run
    editor_jumps: int = 8  # vim:after-jump: cursor jumps, each a warm-up, a rest and one keystroke (0..12; 0 = skip)
    editor_jump_pause_s: float = 5.0  # how long the user rests after a jump before typing
    # formats: --model and these artifacts (LABEL=PATH: GGUF, ONNX dir, HF dir) in-process, interleaved
    formats: tuple[str, ...] = ()
    format_rounds: int = 5  # formats: rounds (each measures every artifact once)
    format_prompt_tokens: int = 512  # formats: cold prefill length
    format_decode_tokens: int = 64  # formats: greedy tokens decoded after it
    format_seed: int = 3  # formats: which calibration window is the prompt


@dataclass
class Sample:
    latency_ms: float
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    text: str
    decode_ms: float | None = None
    typed_through: bool = False  # the server answered from the suggestion being typed into (no model call)
    client_hit: bool = False  # llama.vim's own completion cache would have answered without a request


@dataclass
class WorkloadResult:
    target: str
    workload: str  # cold@256 | typing
    samples: list[Sample] = field(default_factory=list)

    def summary(self, debounce_ms: int = 0) -> dict[str, float]:
        lat = [s.latency_ms + debounce_ms for s in self.samples]
        prompt = sum(s.prompt_tokens for s in self.samples)
        gen = sum(s.generated_tokens for s in self.samples)
        decode_ms = [s.decode_ms for s in self.samples if s.decode_ms]
        # what a llama.vim user sees: its client cache answers some keystrokes itself (debounce only)
        with_client = [debounce_ms if s.client_hit else s.latency_ms + debounce_ms for s in self.samples]
        # the keystrokes the model answered: a typed-through one costs no model call, and how many of them a
        # replay has differs by surface (the first keystroke after a jump never types through)
        model = [s.latency_ms + debounce_ms for s in self.samples if not s.typed_through]
        return {
            "n": len(lat),
            "p50_ms": round(percentile(lat, 50), 1),
            "p95_ms": round(percentile(lat, 95), 1),
            "typed_through": sum(s.typed_through for s in self.samples),
            "p50_model_ms": round(percentile(model, 50), 1) if model else float("nan"),
            "client_cache_hits": sum(s.client_hit for s in self.samples),
            "p50_with_client_cache_ms": round(percentile(with_client, 50), 1),
            "p95_with_client_cache_ms": round(percentile(with_client, 95), 1),
            "mean_ms": round(statistics.fmean(lat), 1) if lat else 0.0,
            "prompt_tokens_mean": round(prompt / max(1, len(lat)), 1),
            "evaluated_tokens_mean": round((prompt - sum(s.cached_tokens for s in self.samples)) / max(1, len(lat)), 1),
            "cache_hit_ratio": round(sum(s.cached_tokens for s in self.samples) / prompt, 3) if prompt else 0.0,
            "generated_tokens_mean": round(gen / max(1, len(lat)), 1),
            "e2e_tok_per_s": round(1000 * gen / sum(s.latency_ms for s in self.samples), 2) if lat else 0.0,
            "decode_tok_per_s": round(1000 * sum(s.generated_tokens for s in self.samples if s.decode_ms)
                                      / sum(decode_ms), 2) if decode_ms else float("nan"),
        }


# ---- targets -------------------------------------------------------------------------------------


class Target(Protocol):
    name: str

    def complete(self, prefix: str, suffix: str, max_tokens: int) -> Sample: ...

    def background(self) -> int:
        """Background work the server is doing or has queued (0: idle between requests)."""
        ...


class LocalcoderTarget:
    """``localcoder serve`` through llama.cpp's /infill shape (what llama.vim sends)."""

    name = "localcoder"

    def __init__(self, url: str, api_key: str = ""):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url, timeout=600, headers=headers)

    def complete(self, prefix: str, suffix: str, max_tokens: int) -> Sample:
        body = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": max_tokens, "temperature": 0,
                "cache_prompt": True}
        t0 = time.perf_counter()
        r = self.client.post("/infill", json=body)
        ms = (time.perf_counter() - t0) * 1000
        r.raise_for_status()
        d = r.json()
        t = d["timings"]
        return Sample(ms, d["tokens_evaluated"] + d["tokens_cached"], d["tokens_cached"], d["tokens_predicted"],
                      d["content"], t["predicted_ms"] or None)

    def background(self) -> int:
        return server_background(self.client)


class PeerTarget:
    """llama-cpp-python's OpenAI server with a raw FIM-token prompt (what Continue sends). Its
    cached tokens are not reported; we compute them as llama-cpp-python does (longest common token
    prefix with the previous prompt)."""

    name = "llama-cpp-python"

    def __init__(self, url: str, tokenizer: Tokenizer):
        self.client = httpx.Client(base_url=url, timeout=600)
        self.tok = tokenizer
        self.previous: list[int] = []

    def background(self) -> int:
        return 0  # it does no work between requests

    def complete(self, prefix: str, suffix: str, max_tokens: int) -> Sample:
        prompt = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
        ids = self.tok.tokenize(prompt, special=True)
        cached = common_prefix_len(self.previous, ids)
        self.previous = ids
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": PEER_STOPS}
        t0 = time.perf_counter()
        r = self.client.post("/v1/completions", json=body)
        ms = (time.perf_counter() - t0) * 1000
        r.raise_for_status()
        d = r.json()
        return Sample(ms, d["usage"]["prompt_tokens"], cached, d["usage"]["completion_tokens"],
                      d["choices"][0]["text"])


# ---- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(cmd: list[str], url: str, probe: str, timeout_s: float = 300, env: dict | None = None) -> Iterator[str]:
    """Start a server process, wait until ``probe`` answers 200, stop it afterwards. Its stderr goes to a
    temporary file, not a pipe: llama-server logs every request, and an undrained pipe filled up after ~490
    requests of the editor replay and blocked it mid-request (the bench then waited on it forever)."""
    import tempfile

    from localcoder.models import TIED_TO_PARENT

    log = tempfile.TemporaryFile(mode="w+", prefix="localcoder-bench-server-")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True,
                            env={**os.environ, **(env or {})},  # a killed bench leaves no server behind
                            preexec_fn=TIED_TO_PARENT)

    def tail() -> str:
        log.flush()
        log.seek(0)
        return log.read()[-2000:]

    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited: {tail()}")
            try:
                if httpx.get(url + probe, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[:4]} did not become ready in {timeout_s} s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def localcoder_cmd(cfg: BenchConfig, port: int) -> list[str]:
    engine = "fake" if cfg.model == "fake" else "llama"
    return [sys.executable, "-m", "localcoder.cli", "serve", "--model", cfg.model, "--engine", engine,
            "--threads", str(cfg.threads), "--ctx", str(cfg.ctx), "--port", str(port),
            "--prefix-tokens", str(max(1024, max(cfg.contexts) + 64)), "--suffix-tokens", str(cfg.suffix_tokens),
            "--extra-tokens", "0", "--mode", "auto", "--log-level", "warning"]


def served_gguf(model: str) -> str:
    """The file `localcoder serve --model MODEL` loads by default (a packaged model's requantized copy,
    ModelConfig.gguf_type): the peers and the bandwidth bound get the same weights."""
    if model == "fake":
        return model
    from localcoder.models import resolve, serving_gguf

    return str(serving_gguf(resolve(model), "auto"))


def peer_cmd(cfg: BenchConfig, port: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", served_gguf(cfg.model), "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(cfg.ctx), "--n_threads", str(cfg.threads),
            "--n_threads_batch", str(cfg.threads), "--n_batch", "512", "--verbose", "false"]


# ---- workloads -----------------------------------------------------------------------------------


@dataclass
class Case:
    prefix: str
    suffix: str


def corpus_files() -> list[Path]:
    """Real source text: the CPython standard library, in a fixed order."""
    root = Path(os.__file__).parent
    files = sorted(p for p in root.glob("*.py") if 20_000 < p.stat().st_size < 200_000)
    return files


def cold_cases(tok: Tokenizer, n_tokens: int, repeats: int, suffix_tokens: int, offset: int) -> list[Case]:
    """``repeats`` prompts of ~``n_tokens`` tokens, each from a different file (so no cache reuse)."""
    cases = []
    for path in corpus_files()[offset: offset + repeats]:
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = tok.tokenize(text)
        pre_n = n_tokens - suffix_tokens - 3  # three FIM markers
        cut = max(pre_n, min(len(ids) - suffix_tokens, len(ids) // 2 + pre_n // 2))
        prefix = _detok(tok, ids[cut - pre_n: cut])
        suffix = _detok(tok, ids[cut: cut + suffix_tokens])
        cases.append(Case(prefix, suffix))
    return cases


def _detok(tok: Tokenizer, ids: list[int]) -> str:
    return b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", errors="ignore")


def typing_window(text: str, chars: int, before: int, after: int) -> tuple[str, str, str]:
    """(anchor above the cursor, text to type, tail below) from a line start in the middle of ``text``."""
    lines = text.splitlines(keepends=True)
    start_line = len(lines) // 2
    anchor = "".join(lines[max(0, start_line - before): start_line])
    start = len("".join(lines[:start_line]))
    typed = text[start: start + chars]
    tail = "".join(text[start + chars:].splitlines(keepends=True)[:after])
    return anchor, typed, tail


def typing_cases(text: str, chars: int, before: int, after: int) -> list[Case]:
    """Type ``chars`` characters of ``text`` (from a line start in its middle); one case per pause.

    The editor window is anchored: it starts ``before`` lines above where typing began (a client
    that keeps its window still while the user types) and ends ``after`` lines below the typed region.
    """
    anchor, typed, tail = typing_window(text, chars, before, after)
    return [Case(anchor + typed[:i], tail) for i in pauses(typed)]


def server_background(client: httpx.Client) -> int:
    """Background prefills a server behind ``client`` runs or has queued, from its ``/health`` (0 for a
    server that reports none: llama-server's warm-up answers after its prefill)."""
    d = client.get("/health").json()
    return int(d.get("background", 0)) if isinstance(d, dict) else 0


QUIET_WAIT_S = 30.0  # the longest a target waits for the others' background prefills to end


def wait_quiet(others: list, limit_s: float = QUIET_WAIT_S) -> None:
    """Wait until none of ``others`` runs a background prefill (or ``limit_s`` passed): the servers share
    two CPU cores, so one server's warm-up prefill would slow the request timed on another (a first
    run without this wait measured llama-server's jump 3x and localcoder's 6x slower than alone)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and any(t.background() for t in others):
        time.sleep(0.05)


def run_interleaved(targets: list[Target], cfg: BenchConfig, cold: dict[int, list[Case]], typing: list[Case],
                    tick: Callable[[], None]) -> list[WorkloadResult]:
    """Each case goes to every target in turn, so load from other processes on a shared machine
    hits all targets alike (separate processes: one target's requests do not touch the other's cache)."""
    results = {(t.name, w): WorkloadResult(t.name, w) for t in targets for w in [*(f"cold@{n}" for n in cold), "typing"]}
    workloads = [(f"cold@{n}", cases) for n, cases in cold.items()] + [("typing", typing)]
    for workload, cases in workloads:
        for case in cases:
            for target in targets:
                wait_quiet([t for t in targets if t is not target])
                results[(target.name, workload)].samples.append(target.complete(case.prefix, case.suffix, cfg.max_tokens))
                tick()
    return list(results.values())


# ---- the physical bound --------------------------------------------------------------------------


def read_bandwidth_gbs(threads: int, mib: int = 512, rounds: int = 3) -> float:
    """Best of ``rounds`` full reads of a ``mib`` MiB array, split across ``threads`` threads."""
    a = np.ones(mib * (1 << 20) // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def bytes_per_token(gguf_path: str) -> dict[str, int]:
    """Weight bytes read per decoded token: every tensor but the embedding table (one row is read);
    the output head reported separately."""
    try:
        from gguf import GGUFReader
    except ImportError:
        size = Path(gguf_path).stat().st_size
        return {"total": size, "output_head": 0, "source": "file size (gguf not installed)"}  # type: ignore[dict-item]
    reader = GGUFReader(gguf_path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    head = sizes.get("output.weight", 0)
    total = sum(n for name, n in sizes.items() if name != "token_embd.weight")
    return {"total": total, "output_head": head, "blocks": total - head}


def physical_bound(cfg: BenchConfig) -> dict[str, Any]:
    bw = read_bandwidth_gbs(max(1, cfg.threads))
    if cfg.model == "fake":
        return {"read_bandwidth_gbs": round(bw, 2)}
    b = bytes_per_token(served_gguf(cfg.model))
    return {"read_bandwidth_gbs": round(bw, 2), "threads": cfg.threads, "bytes_per_token": b,
            "decode_tok_per_s_bound": round(bw * 1e9 / b["total"], 1),
            "output_head_share": round(b.get("output_head", 0) / b["total"], 3)}


# ---- the run -------------------------------------------------------------------------------------


def load_tokenizer(model: str) -> Tokenizer:
    if model == "fake":
        from localcoder.engines.fake import ByteTokenizer

        return ByteTokenizer()
    from localcoder.engines.native import import_llama

    llama_cpp = import_llama()

    from localcoder.engines.llamacpp import LlamaTokenizer

    llm = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
    return LlamaTokenizer(llm)


def default_typing_file() -> Path:
    return Path(os.__file__).parent / "textwrap.py"


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    results = run_http_workloads(cfg, progress) if {"cold", "typing"} & set(cfg.workloads.split(",")) else []
    if "editor" in cfg.workloads.split(",") and cfg.model != "fake":
        results += run_editor_replay(cfg, progress)
    out = report(cfg, results, physical_bound(cfg))
    if "formats" in cfg.workloads.split(",") and cfg.model != "fake":
        from localcoder.bench_formats import run_formats

        out["formats"] = run_formats(cfg, progress)
    return out


def run_editor_replay(cfg: BenchConfig, progress: bool) -> list[WorkloadResult]:
    """llama.vim's bodies to `localcoder serve` in its DEFAULT configuration (only model, threads and
    port given) and to llama-server with llama.vim's preset, interleaved (localcoder.bench_editor)."""
    from tqdm import tqdm

    from localcoder import bench_editor as ed

    binary = None if cfg.llama_server == "off" else (cfg.llama_server or ed.find_llama_server())
    workloads = ed.editor_workloads(cfg.typing_file or str(default_typing_file()),
                                    cfg.editor_file_b or str(Path(os.__file__).parent / "shlex.py"),
                                    cfg.editor_chars, cfg.max_tokens, cfg.editor_jumps)
    wanted = {f"vim:{w.strip()}" for w in cfg.editor_workloads.split(",") if w.strip()}
    unknown = wanted - {"vim:after-jump", "vim:mid-file", "vim:end-of-file", "vim:two-files"}
    if unknown:
        from localcoder.errors import InvalidRequest

        raise InvalidRequest(f"unknown editor workloads: {', '.join(sorted(unknown))}", param="editor_workloads")
    workloads = {k: v for k, v in workloads.items() if k in wanted}
    n = sum(len(r) for r in workloads.values()) * (1 + bool(binary) + len(cfg.editor_baseline) + cfg.editor_lsp)
    bar = tqdm(total=n, desc="editor replay", unit="req", file=sys.stderr, disable=not progress)
    with ExitStack() as stack:
        port = free_port()
        cmd = [sys.executable, "-m", "localcoder.cli", "serve", "--model", cfg.model, "--threads", str(cfg.threads),
               "--port", str(port), "--log-level", "warning"]
        targets = [ed.InfillTarget("localcoder", stack.enter_context(
            serving(cmd, f"http://127.0.0.1:{port}", "/health")))]
        for flags in cfg.editor_baseline:  # the same server with some flags changed: a "before", a variant
            port = free_port()
            base = [*cmd[:cmd.index("--port") + 1], str(port), *cmd[cmd.index("--port") + 2:], *shlex.split(flags)]
            targets.append(ed.InfillTarget(f"localcoder {flags}", stack.enter_context(
                serving(base, f"http://127.0.0.1:{port}", "/health"))))
        if cfg.editor_lsp:  # the same keystrokes through the language server (in-process engine)
            # default config; only the token cap equals the bodies' n_predict, which the HTTP targets get
            lsp = ed.LspTarget("localcoder lsp", [sys.executable, "-m", "localcoder.cli", "lsp", "--model", cfg.model,
                                                  "--threads", str(cfg.threads), "--max-tokens", str(cfg.max_tokens),
                                                  "--log-level", "warning"])
            stack.callback(lsp.close)
            targets.append(lsp)
        if binary:
            port = free_port()
            url = stack.enter_context(serving(ed.llama_server_cmd(binary, served_gguf(cfg.model), port, cfg.threads),
                                              f"http://127.0.0.1:{port}", "/health"))
            targets.append(ed.InfillTarget("llama-server", url))
        results = ed.run_replay(targets, workloads, bar.update, cfg.editor_jump_pause_s)
    bar.close()
    return results


def run_http_workloads(cfg: BenchConfig, progress: bool) -> list[WorkloadResult]:
    from tqdm import tqdm

    tok = load_tokenizer(cfg.model)
    cold = {n: cold_cases(tok, n, cfg.cold_repeats, cfg.cold_suffix_tokens, offset=i * cfg.cold_repeats)
            for i, n in enumerate(cfg.contexts)}
    text = Path(cfg.typing_file or default_typing_file()).read_text(encoding="utf-8")
    typing = typing_cases(text, cfg.typing_chars, cfg.window_lines_before, cfg.window_lines_after)
    per_target = sum(len(c) for c in cold.values()) + len(typing)
    n_targets = 2 if cfg.peer and cfg.model != "fake" else 1
    bar = tqdm(total=per_target * n_targets, desc="bench", unit="req", file=sys.stderr, disable=not progress)
    with ExitStack() as stack:
        if cfg.url:
            targets: list[Target] = [LocalcoderTarget(cfg.url, cfg.api_key)]
        else:
            port = free_port()
            env = {"LOCALCODER_FAKE_DELAY_MS": "2"} if cfg.model == "fake" else {}
            url = stack.enter_context(serving(localcoder_cmd(cfg, port), f"http://127.0.0.1:{port}", "/health", env=env))
            targets = [LocalcoderTarget(url)]
        if n_targets == 2:
            port = free_port()
            url = stack.enter_context(serving(peer_cmd(cfg, port), f"http://127.0.0.1:{port}", "/v1/models"))
            targets.append(PeerTarget(url, tok))
        results = run_interleaved(targets, cfg, cold, typing, bar.update)
    bar.close()
    return results


def report(cfg: BenchConfig, results: list[WorkloadResult], bound: dict[str, Any]) -> dict[str, Any]:
    rows = {}
    for r in results:
        debounce = cfg.debounce_ms if r.workload == "typing" or r.workload.startswith("vim:") else 0
        rows.setdefault(r.workload, {})[r.target] = r.summary(debounce)
    ratios = {}
    for workload, by_target in rows.items():
        peer_name = next((p for p in ("llama-server", "llama-cpp-python") if p in by_target), None)
        if "localcoder" in by_target and peer_name:
            ours, peer = by_target["localcoder"], by_target[peer_name]
            ratios[workload] = {"peer": peer_name,
                                **{k: round(ours[k] / peer[k], 3) if peer[k] else None
                                   for k in ("p50_ms", "p95_ms", "p50_with_client_cache_ms")}}
    # the first completion after a jump (warm-up, rest, one keystroke) against a warm keystroke mid-file: every
    # keystroke, and the ones the model answered (not typed through), as the jump's keystroke always is
    mid = rows.get("vim:mid-file", {})
    jump, jump_model = {}, {}
    for t, s in rows.get("vim:after-jump", {}).items():
        if mid.get(t, {}).get("p50_ms"):
            jump[t] = round(s["p50_ms"] / mid[t]["p50_ms"], 3)
        if mid.get(t, {}).get("p50_model_ms", 0) > 0:  # nan (all typed through) compares False
            jump_model[t] = round(s["p50_ms"] / mid[t]["p50_model_ms"], 3)
    return {
        "config": asdict(cfg), "machine": machine(), "bound": bound, "results": rows,
        "ratios_localcoder_over_peer": ratios, "after_jump_over_mid_file_p50": jump,
        "after_jump_over_model_keystroke_p50": jump_model,
        "samples": {f"{r.target}/{r.workload}": [asdict(s) for s in r.samples] for r in results},
    }


def machine() -> dict[str, Any]:
    """The machine a report ran on: cores, load, the CPU kernels `kernels auto` serves with, how the llama-server
    peer was built (tests/setup.d/llama_server.sh's stamp: llama-cpp-python version and CMake flags)."""
    from localcoder import bench_editor as ed
    from localcoder.engines import native

    stamp = ed.llama_server_built().with_name("VERSION")
    try:
        peer = stamp.read_text(encoding="utf-8").strip()
    except OSError:
        peer = None
    return {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "kernels_auto": native.choose("auto")[0], "llama_server_build": peer}


def markdown(report_: dict[str, Any]) -> str:
    lines = ["| workload | target | n | p50 ms | p95 ms | prompt tok | evaluated tok | cache hit | generated tok | "
             "decode tok/s | p50 ratio (ours/peer) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    if not report_["results"]:
        lines = []  # e.g. --workloads formats alone
    for workload, by_target in report_["results"].items():
        ratio = report_["ratios_localcoder_over_peer"].get(workload, {}).get("p50_ms")
        for target, s in by_target.items():
            shown = f"{ratio:.2f}" if ratio is not None and target == "localcoder" else ""
            lines.append(f"| {workload} | {target} | {s['n']} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | "
                         f"{s['prompt_tokens_mean']:.0f} | {s['evaluated_tokens_mean']:.0f} | {s['cache_hit_ratio']:.2f} | "
                         f"{s['generated_tokens_mean']:.1f} | {s['decode_tok_per_s']:.1f} | {shown} |")
    b = report_["bound"]
    if "decode_tok_per_s_bound" in b:
        bt = b["bytes_per_token"]
        lines += ["", f"Physical bound: read bandwidth {b['read_bandwidth_gbs']} GB/s ({b['threads']} threads) ÷ "
                  f"{bt['total'] / 1e6:.0f} MB read per token (output head {bt['output_head'] / 1e6:.0f} MB, "
                  f"{b['output_head_share']:.0%}) = **{b['decode_tok_per_s_bound']} tok/s** decode at most."]
    m = report_.get("machine", {})
    if "kernels_auto" in m:
        lines += ["", f"Machine: {m['cpus']} CPUs, load {m['load_avg_1m']:.2f} at the end; localcoder's CPU kernels "
                  f"(`kernels auto`): {m['kernels_auto']}; llama-server built from: {m['llama_server_build'] or '-'}."]
    editor = {(w, t): s for w, by in report_["results"].items() if w.startswith("vim:") for t, s in by.items()
              if "p50_with_client_cache_ms" in s}
    if editor:
        lines += ["", "The same editor-replay requests as a llama.vim user sees them: llama.vim answers a keystroke "
                  "from its own completion cache when the text typed since a cached request (on the cursor line, "
                  "≤ 128 characters) is the start of that request's suggestion; those keystrokes cost the debounce "
                  "only, for every server (an LSP client has no such cache: –). `typed through` counts the requests "
                  "localcoder itself answered from the suggestion being typed into (no model call), which every "
                  "client gets; `p50 model` is the median of the other keystrokes.", "",
                  "| workload | target | client cache hits | typed through (server) | p50 ms | p95 ms | p50 model ms | "
                  "p50 with llama.vim's cache | p95 with it |", "|---|---|---|---|---|---|---|---|---|"]
        for (w, t), s in editor.items():
            vim = bool(s.get("prompt_tokens_mean"))  # an LSP row carries no token counts and no client cache
            cache = (f"{s['client_cache_hits']}/{s['n']}", f"{s['p50_with_client_cache_ms']:.0f}",
                     f"{s['p95_with_client_cache_ms']:.0f}") if vim else ("–", "–", "–")
            lines.append(f"| {w} | {t} | {cache[0]} | {s['typed_through']} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | "
                         f"{s.get('p50_model_ms', float('nan')):.0f} | {cache[1]} | {cache[2]} |")
    if report_.get("after_jump_over_mid_file_p50"):
        model = report_.get("after_jump_over_model_keystroke_p50", {})
        lines += ["", "First completion after a jump (warm-up, " f"{report_['config']['editor_jump_pause_s']:g} s rest, "
                  "one keystroke) over a warm mid-file keystroke, p50: " + ", ".join(
                      f"{t} {r:.2f}×" for t, r in report_["after_jump_over_mid_file_p50"].items())
                  + "; over a warm mid-file keystroke the model answered (not typed through): " + ", ".join(
                      f"{t} {r:.2f}×" for t, r in model.items())]
    if report_.get("formats"):
        from localcoder.bench_formats import markdown as formats_markdown

        lines += ["", formats_markdown(report_["formats"]).rstrip()]
    lines.append("")
    lines.append("Typing and editor-replay (vim:*) latency = debounce "
                 f"({report_['config']['debounce_ms']} ms) + request latency; cold = request latency.")
    return "\n".join(lines) + "\n"


def plot(report_: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    targets = sorted({t for by in report_["results"].values() for t in by})
    colds = sorted((w for w in report_["results"] if w.startswith("cold@")), key=lambda w: int(w[5:]))
    for t in targets:
        xs = [int(w[5:]) for w in colds if t in report_["results"][w]]
        ax1.plot(xs, [report_["results"][f"cold@{x}"][t]["p50_ms"] / 1000 for x in xs], marker="o", label=t)
        for workload in ("typing", "vim:mid-file"):  # the HTTP typing replay and llama.vim's mid-file one
            samples = report_["samples"].get(f"{t}/{workload}", [])
            lat = sorted(s["latency_ms"] + report_["config"]["debounce_ms"] for s in samples)
            if lat:
                ax2.plot([v / 1000 for v in lat], np.linspace(0, 1, len(lat)), label=f"{t} {workload}")
    ax1.set(title="cold request (p50)", xlabel="context tokens", ylabel="seconds")
    ax2.set(title="typing replay: keystroke to completion", xlabel="seconds", ylabel="fraction of pauses")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report_: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "plot": out_dir / "bench.png"}
    paths["json"].write_text(json.dumps(report_, indent=2), encoding="utf-8")
    paths["markdown"].write_text(markdown(report_), encoding="utf-8")
    if report_["results"]:
        plot(report_, paths["plot"])
    else:
        del paths["plot"]
    if report_.get("formats"):
        from localcoder.bench_formats import plot as formats_plot

        paths["formats_plot"] = out_dir / "formats.png"
        formats_plot(report_["formats"], paths["formats_plot"])
    return paths

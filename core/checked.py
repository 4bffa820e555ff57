"""Execution-checked completions (CodeT-style): sample several function bodies, write tests with the
same model, run every body against every test in the sandbox, return the bodies ranked by agreement.

For the function whose body holds the cursor (Python):

1. **Candidates**: N middles sampled from one prompt (temperature / top-p, seed ``s + i`` for the i-th).
   An engine with ``sample_groups`` (llama.cpp) decodes them together with the test-writing sequences
   of step 2, one batch per step, the prompts' shared prefix evaluated once; others run one request
   per sequence, one after another (``sample_groups``).
2. **Tests**: the docstring's doctest examples (``>>> f(1)`` / ``3``, ``>>> f(1) == 3``) and its
   example lines (``f(x) == y``, ``==>``, ``->``, ``➞``, ``=``, ``returns``, ``should return``,
   ``For x = 1 the output should be y``) count as tests as written; the model adds M ``assert``
   lines from the signature and docstring (prompt: the code up to the cursor, ``pass``, ``# check the correctness of f``,
   ``assert f(``). Generated lines that do not parse, repeat another test, or fail on every
   candidate are discarded and counted.
3. **Execution**: one sandboxed process per candidate (``localcoder.eval.sandbox``'s guard and
   limits, plus: writes outside its temp dir refused, ``posix`` / ``ctypes`` / ``_socket`` /
   ``multiprocessing`` unimportable, its own network namespace where ``unshare`` works, stdout and
   stderr discarded, a per-test timer, the whole process group killed at the end or on cancel).
4. **Ranking**: first by how many of the docstring's own tests a candidate passes (they are the
   user's spec: AlphaCode-style filtering), then CodeT (Chen et al. 2022): candidates are grouped by
   the set of tests they pass; a group scores (samples in it) × (tests it passes); every candidate
   takes its group's score.
   Duplicate samples are merged into one candidate whose ``samples`` count is its weight. The greedy
   body is decoded in the same batch (``CheckOptions.greedy``, on by default): it weighs as one more
   sample, and it goes first among candidates of equal score, so where the tests tell nothing (no
   tests, none passed, a tie) the answer is the plain completion's.

Other languages get the N candidates unranked, with a note. ``CheckedRequest`` is an
``InfillRequest`` that ``Completer.stream`` hands to ``checked_stream``; its ``validate`` rejects a
cursor that is not in a function body (HTTP 400, an LSP error, a CLI exit code 2).
"""

from __future__ import annotations

import ast
import builtins
import codecs
import doctest
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from localcoder.completion import CompletionResult, CompletionStream, InfillRequest
from localcoder.docstring import FunctionAt, find_function
from localcoder.engines.base import CancelToken, GenerationRequest, SampleGroup, Sampling, StopFn, Timings
from localcoder.errors import InvalidRequest
from localcoder.stops import StopRules

Progress = Callable[[str, int, int], None]  # (what, done, total): "candidates" | "tests" | "runs"

MAX_CANDIDATES = 32
MAX_TESTS = 32
MAX_ASSERT_CHARS = 240  # a generated assertion line longer than this is degenerate: its sequence stops there
STRAGGLER_MIN_TOKENS = 32  # a candidate shorter than this is never cut as a straggler


@dataclass
class CheckOptions:
    candidates: int = 8  # N sampled bodies
    tests: int = 8  # M generated assertions (docstring examples come on top)
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int = 0
    max_tokens: int = 256  # per candidate
    # once half of the candidates have finished, one still running at this many times the longest finished one
    # is stopped there (it then usually fails its tests): the batch's longest sequence sets the decode time. 0: off
    straggler: float = 2.0
    # the greedy body decoded beside the N samples (one more sequence of the same batch): a candidate whose group
    # it joins, and the first among equals: where the tests do not tell candidates apart, the answer is greedy's
    greedy: bool = True
    test_tokens: int = 192  # per test-writing sequence
    test_seconds: float = 1.0  # per test, in the sandbox
    tests_budget_seconds: float = 8.0  # all tests of one candidate (a loop in C code ignores the per-test timer)
    define_seconds: float = 3.0  # running the candidate's module
    memory_mb: int = 512
    workers: int = 2  # sandbox processes at once

    @classmethod
    def from_config(cls, c) -> "CheckOptions":
        """From a ``config.CheckConfig`` (the CLI flags, the config file, the environment)."""
        return cls(candidates=c.candidates, tests=c.check_tests, temperature=c.check_temperature,
                   top_p=c.check_top_p, seed=c.check_seed, max_tokens=c.check_max_tokens,
                   straggler=c.check_straggler, greedy=c.check_greedy)

    def validate(self) -> None:
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise InvalidRequest(f"candidates must be 1..{MAX_CANDIDATES}, got {self.candidates}", param="candidates")
        if not 0 <= self.tests <= MAX_TESTS:
            raise InvalidRequest(f"check_tests must be 0..{MAX_TESTS}, got {self.tests}", param="check_tests")
        if not 0 <= self.temperature <= 2:
            raise InvalidRequest("temperature must be in [0, 2]", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if not 1 <= self.max_tokens <= 4096:
            raise InvalidRequest("max_tokens must be 1..4096 for checked completions", param="max_tokens")
        if self.straggler != 0 and not 1 <= self.straggler <= 100:
            raise InvalidRequest("check_straggler must be 0 (off) or 1..100", param="check_straggler")


# ---- where the cursor is -------------------------------------------------------------------------


def is_python(language: str | None, path: str | None) -> bool:
    if language:
        return language.lower() in ("python", "py", "python3")
    return path is None or path.endswith((".py", ".pyi", ".pyw"))


def function_at_cursor(prefix: str, suffix: str) -> FunctionAt | None:
    """The Python function whose body holds the cursor (not its signature), or None."""
    line = prefix.count("\n")
    fn = find_function(prefix + suffix, line)
    if fn is None or line < fn.body_line:
        return None
    return fn


def require_function(prefix: str, suffix: str) -> FunctionAt:
    fn = function_at_cursor(prefix, suffix)
    if fn is None:
        raise InvalidRequest("checked completion needs the cursor in a Python function body (after its "
                             "signature, e.g. below the docstring)", param="position")
    return fn


def _function_node(prefix: str, fn: FunctionAt) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    lines = prefix.split("\n")[fn.def_line:]
    code = textwrap.dedent("\n".join(lines)).rstrip() + "\n"
    body_indent = " " * 4 if not fn.indent else fn.indent[len(lines[0]) - len(lines[0].lstrip()):] or "    "
    for attempt in (code + body_indent + "pass\n", code):
        try:
            tree = ast.parse(attempt)
        except (SyntaxError, ValueError):
            continue
        node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
        if node is not None:
            return node
    return None


def docstring_of(prefix: str, fn: FunctionAt) -> str | None:
    """The function's docstring, read from the text before the cursor."""
    node = _function_node(prefix, fn)
    if node is not None:
        return ast.get_docstring(node)
    code = textwrap.dedent("\n".join(prefix.split("\n")[fn.def_line:]))
    m = re.search(r'("""|\'\'\')(.*?)\1', code, re.S)
    return textwrap.dedent(m.group(2)) if m else None


def parameters_of(prefix: str, fn: FunctionAt) -> list[str]:
    node = _function_node(prefix, fn)
    if node is None:
        return []
    a = node.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]


# ---- tests ---------------------------------------------------------------------------------------


@dataclass
class Test:
    __test__ = False  # not a pytest class
    id: str
    kind: str  # doctest | example | generated
    code: str  # an assert statement, or a doctest example's source
    want: str | None = None  # doctest: the expected output
    setup: str = ""  # doctest: earlier examples without output
    flags: int = 0  # doctest option flags (ELLIPSIS, NORMALIZE_WHITESPACE)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "code": self.code}
        if self.want is not None:
            out["want"] = self.want
        return out


def _doctest_examples(doc: str) -> list[doctest.Example]:
    """The ``>>>`` examples; where the whole docstring does not parse as doctest (a string literal with
    a real newline in it, a missing ``...``), each example block is parsed on its own and the broken
    ones are left out."""
    parser = doctest.DocTestParser()
    try:
        return parser.get_examples(doc)
    except ValueError:
        pass
    examples: list[doctest.Example] = []
    for block in re.split(r"\n(?=[ \t]*>>>)", doc):
        try:
            examples += parser.get_examples(textwrap.dedent(block))
        except ValueError:
            continue
    return examples


def doctests(doc: str | None, name: str | None = None) -> list[Test]:
    """The docstring's ``>>>`` examples, as written. An example without output is setup for the next,
    unless it is a comparison of a call of ``name`` (``>>> f(1) == 2`` written as an assertion), which
    becomes one."""
    if not doc:
        return []
    out, setup = [], []
    for ex in _doctest_examples(doc):
        if not ex.want.strip():
            code = f"assert {ex.source.strip()}"
            if name and _is_call_comparison(ex.source, name) and _parses(code):
                out.append(Test(f"doctest{len(out) + 1}", "example", code))
            else:
                setup.append(ex.source)
            continue
        flags = sum(f for f, on in ex.options.items() if on)
        out.append(Test(f"doctest{len(out) + 1}", "doctest", ex.source.rstrip("\n"), ex.want, "".join(setup), flags))
    return out


def _is_call_comparison(source: str, name: str) -> bool:
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return False
    return (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq)
            and any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name
                    for n in (node.left, node.comparators[0])))


# How docstrings write "this call gives that": longest first, so ``==>`` is not read as ``==``.
_ARROWS = ("==>", "=>", "==", "➞", "->", "→", "should return", "should be", "returns", "return", "gives", "=")
_BULLET = re.compile(r"^(?:[*\-•]\s+|\d+[.)]\s+|>>>\s*)")
_FOR = re.compile(r"^for\s+(?P<args>.+?),?\s+the\s+(?:output|result|answer|return value)\s+"
                  r"(?:should\s+be|will\s+be|is)\s*:?\s*(?P<value>.+)$", re.I)


def _call_end(line: str, start: int) -> int | None:
    depth, quote = 0, ""
    for i in range(start, len(line)):
        ch = line[i]
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _is_expr(text: str) -> bool:
    try:
        ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    return True


def _value(text: str) -> str | None:
    """The expected value as written after the arrow: the whole rest, without a closing full stop, or
    the result after a worked ``=`` (``-> 19 - 5 - 6 = 8``), or the part before a comment or a
    double-spaced remark."""
    text = text.strip()
    tries = [text.rstrip(".,;:"), text]
    if "=" in text:
        tries.append(text.rsplit("=", 1)[1].strip().rstrip(".,;:"))
    for cut in ("  ", " #", " (", " because ", " since "):
        if cut in text:
            tries.append(text.split(cut, 1)[0].strip().rstrip(".,;:"))
    tries = [_JS_CONSTANTS.get(t, t) for t in tries]
    return next((t for t in tries if t and _is_expr(t)), None)


def _keyword_call(name: str, args: str, params: Sequence[str]) -> str | None:
    """``name(x=.., y=..)`` from ``x = .., y = ..`` (trailing prose after a comma left out) when the
    keywords are the function's parameters."""
    parts = args.split(",")
    for k in range(len(parts), 0, -1):
        call = f"{name}({','.join(parts[:k])})"
        try:
            node = ast.parse(call, mode="eval").body
        except (SyntaxError, ValueError):
            continue
        if (isinstance(node, ast.Call) and not node.args and node.keywords
                and all(kw.arg in params for kw in node.keywords)):
            return ast.unparse(node)
    return None


_JS_CONSTANTS = {"true": "True", "false": "False", "null": "None"}
_EXAMPLE_CHARS = 2000


def _closed(code: str, name: str) -> bool:
    """The assertion names nothing but the function and builtins: ``f(n) == f(n-1) + 1`` is a
    definition, not an example."""
    return all(n.id == name or hasattr(builtins, n.id)
               for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name))


def example_lines(doc: str | None, name: str, params: Sequence[str] = ()) -> list[Test]:
    """The docstring's examples written as prose, as assertions: ``name(args)`` followed by ``==``,
    ``==>``, ``=>``, ``->``, ``➞``, ``=``, ``returns``, ``should return``... and a value (bullets,
    ``#`` before the arrow and a closing full stop allowed), and ``For x = 1, y = 2 the output should
    be 3`` when ``x`` and ``y`` are among ``params``. Lines that do not parse are left out."""
    out: list[Test] = []
    seen: set[str] = set()
    for raw in (doc or "").splitlines():
        line = _BULLET.sub("", raw.strip())
        if len(line) > _EXAMPLE_CHARS:  # not an example anyone reads; and parsing it piece by piece is quadratic
            continue
        code = None
        if line.startswith(name + "("):
            end = _call_end(line, len(name))
            if end is None:
                continue
            rest = line[end + 1:].strip().lstrip("#").strip()
            arrow = next((a for a in _ARROWS if rest.lower().startswith(a)), None)
            value = _value(rest[len(arrow):]) if arrow else None
            if value is not None:
                code = f"assert {line[: end + 1]} == {value}"
        elif params and (m := _FOR.match(line)):
            call, value = _keyword_call(name, m["args"], params), _value(m["value"])
            if call and value is not None:
                code = f"assert {call} == {value}"
        if code and _parses(code) and _closed(code, name) and code not in seen:
            seen.add(code)
            out.append(Test(f"example{len(out) + 1}", "example", code))
    return out


def written_tests(doc: str | None, name: str, params: Sequence[str] = ()) -> list[Test]:
    """The tests the docstring writes itself: its doctests and its example lines, each once."""
    out: list[Test] = []
    seen: set[str] = set()
    for t in doctests(doc, name) + example_lines(doc, name, params):
        key = t.code if t.kind == "doctest" else ast.dump(ast.parse(t.code))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _parses(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert)


def tests_prompt_prefix(prefix: str, fn: FunctionAt) -> str:
    """The text the model continues to write assertions: the code up to the cursor, the body
    stubbed with ``pass``, then CodeT's instruction line."""
    body = prefix if prefix.endswith("\n") else prefix + "\n"
    return f"{body}{fn.indent}pass\n\n\n# check the correctness of {fn.name}\nassert {fn.name}("


def parse_generated(texts: Sequence[str], name: str, limit: int, seen: set[str]) -> tuple[list[Test], dict[str, int]]:
    """Assertions from generated continuations of ``assert name(`` (the first line continues it),
    taken round-robin across the sequences (the first line of each, then the second...) so that the
    kept ``limit`` come from as many samples as possible. Returns the kept tests and counts of
    discarded ones (unparsable, duplicates)."""
    tests: list[Test] = []
    counts = {"unparsable": 0, "duplicates": 0}
    bad: set[str] = set()
    per_text: list[list[str]] = []
    for text in texts:
        kept: list[str] = []
        for line in f"assert {name}({text}".split("\n"):
            line = line.rstrip()
            if not line.strip():
                continue
            if not line.startswith("assert"):
                break
            kept.append(line)
        per_text.append(kept)
    for row in range(max((len(k) for k in per_text), default=0)):
        for kept in per_text:
            if row >= len(kept):
                continue
            line = kept[row]
            if not _parses(line) or f"{name}(" not in line:
                if line not in bad:  # the same broken line from several sequences counts once
                    bad.add(line)
                    counts["unparsable"] += 1
                continue
            key = ast.dump(ast.parse(line))
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            if len(tests) < limit:
                tests.append(Test(f"gen{len(tests) + 1}", "generated", line))
    return tests, counts


# ---- sampling ------------------------------------------------------------------------------------


def sample_groups(engine, groups: Sequence[SampleGroup], cancel: CancelToken,
                  on_done: Callable[[int, int], None] = lambda k, done: None, adapter: int | None = None
                  ) -> tuple[list[list[list[int]]], Timings, bool]:
    """Every group's continuations: in one batched decode where the engine has ``sample_groups``
    (llama.cpp: the sequences of all groups step together, so the groups' decode times do not add
    up), else one request per sequence, group after group (seed ``sampling.seed + i`` for sequence i
    of a group). ``on_done(k, done)``: ``done`` sequences of group k have finished; ``adapter``: the
    specialist adapter they run under (``Completer.route``). Returns (token lists per group, timings of
    the whole call, batched)."""
    many = getattr(engine, "sample_groups", None)
    if many is not None:
        counted = [replace(g, stop=_counting(g.stop, lambda done, k=k: on_done(k, done)))
                   for k, g in enumerate(groups)]
        outs, timings = many(counted, cancel=cancel, **({"adapter": adapter} if adapter is not None else {}))
        return outs, timings, True
    total = Timings()
    outs = [_sample_one_by_one(engine, g, cancel, total, lambda done, k=k: on_done(k, done), adapter)
            for k, g in enumerate(groups)]
    return outs, total, False


def _counting(stop: StopFn | None, on_done: Callable[[int], None]) -> StopFn:
    """``stop``, also reporting how many distinct sequences it has stopped so far."""
    finished: set[int] = set()

    def counted(i: int, toks: list[int]) -> bool:
        done = stop is not None and stop(i, toks)
        if done and i not in finished:
            finished.add(i)
            on_done(len(finished))
        return done

    return counted


def _sample_one_by_one(engine, group: SampleGroup, cancel: CancelToken, total: Timings,
                       on_done: Callable[[int], None], adapter: int | None = None) -> list[list[int]]:
    """The fallback of ``sample_groups`` for one group: a ``generate`` request per sequence (seed
    ``sampling.seed + i``), its timings added to ``total``."""
    sampling, outs = group.sampling, []
    for i in range(group.n):
        if cancel.cancelled:
            total.cancelled = True
            outs.append([])
            continue
        s = Sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed + i)
        stream = engine.generate(GenerationRequest(list(group.prompt), group.max_tokens, s, group.stop_token_ids,
                                                   cancel, adapter=adapter))
        toks: list[int] = []
        try:
            for tok in stream:
                toks.append(tok)
                if group.stop is not None and group.stop(i, toks):
                    break
        finally:
            stream.close()
        t = stream.timings
        total.prompt_n += t.prompt_n
        total.cached_n += t.cached_n
        total.prompt_ms += t.prompt_ms
        total.predicted_n += t.predicted_n
        total.predicted_ms += t.predicted_ms
        total.cancelled = total.cancelled or t.cancelled
        outs.append(toks)
        on_done(i + 1)
    return outs


class _Texts:
    """Incremental UTF-8 text of each sequence (stop rules look at text, the engine gives tokens)."""

    def __init__(self, tokenizer, n: int):
        self.tok = tokenizer
        self.dec = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(n)]
        self.text = [""] * n
        self.seen = [0] * n
        self.cut: set[int] = set()  # sequences stopped as stragglers (candidates_group)

    def update(self, i: int, toks: list[int]) -> str:
        for t in toks[self.seen[i]:]:
            self.text[i] += self.dec[i].decode(self.tok.token_bytes(t))
        self.seen[i] = len(toks)
        return self.text[i]


def _prompt(completer, req: InfillRequest) -> list[int]:
    """The FIM prompt without token healing (the N sequences share one unconstrained start)."""
    healing, completer.token_healing = completer.token_healing, False
    try:
        ids, _ = completer.prompt(req)
    finally:
        completer.token_healing = healing
    return list(ids)


@dataclass
class Candidate:
    text: str
    samples: int  # how many of the N samples produced this text (the greedy body is not counted here)
    index: int  # first sample that produced it
    define: str = "not run"  # the candidate's module ran: passed | error: ... | timeout
    results: dict[str, str] = field(default_factory=dict)  # test id -> passed | failed... | error: ...
    score: int = 0  # CodeT: (samples in its group) × (tests the group passes)
    written: int = 0  # how many of the docstring's own tests (doctests, example lines) it passes
    passed: tuple[str, ...] = ()
    greedy: bool = False  # the greedy body is this text


def candidates_group(completer, req: InfillRequest, opts: CheckOptions
                     ) -> tuple[SampleGroup, SampleGroup | None, _Texts, StopRules]:
    """The N candidate bodies to sample (FIM prompt in multi-line mode, the completion's stop rules) and the
    greedy body's group of one (None when ``opts.greedy`` is off), with the texts and rules that
    ``merge_candidates`` finishes them with (the greedy body's text is the last)."""
    engine = completer.engine
    rules = StopRules("multi", req.prefix, req.suffix, tuple(req.stop), req.indent,
                      getattr(completer, "string_scope", False))
    texts = _Texts(engine.tokenizer, opts.candidates + opts.greedy)  # the greedy body, when wanted, is the last

    lengths: dict[int, int] = {}  # tokens of each candidate when it was last seen
    ended: set[int] = set()  # ended by the stop rules

    def stop(i: int, toks: list[int]) -> bool:
        n = len(toks)
        lengths[i] = n
        if rules.check(texts.update(i, toks)) is not None:
            ended.add(i)
            return True
        if opts.straggler <= 0 or n < STRAGGLER_MIN_TOKENS or i >= opts.candidates:  # the greedy body is never cut
            return False
        # finished: ended by a rule, or not seen at the last step (a stop token or its own limit ended it;
        # batched sequences advance one token per step, sequential ones are seen only once they start)
        done = [m for j, m in lengths.items() if j != i and (j in ended or m < n - 1)]
        if 2 * len(done) >= opts.candidates and n > opts.straggler * max(done):
            texts.cut.add(i)
            return True
        return False

    ids = _prompt(completer, InfillRequest(req.prefix, req.suffix, req.snippets, req.path, req.repo, req.language,
                                           "multi", opts.max_tokens, budget=req.budget, order=req.order))
    sampling = Sampling(opts.temperature, opts.top_k, opts.top_p, opts.seed)
    stop_ids = completer.format.stop_ids(engine.tokenizer)
    group = SampleGroup(ids, opts.candidates, sampling, opts.max_tokens, stop, stop_ids)
    greedy = SampleGroup(ids, 1, Sampling(0.0, opts.top_k, 1.0, opts.seed), opts.max_tokens,
                         lambda i, toks: stop(opts.candidates, toks), stop_ids) if opts.greedy else None
    return group, greedy, texts, rules


def merge_candidates(outs: list[list[int]], texts: _Texts, rules: StopRules, greedy: list[int] | None = None
                     ) -> tuple[list[Candidate], list[str]]:
    """Distinct candidates (with sample counts) and every sample's final text, in order. ``greedy``: the
    greedy body's tokens; its text is marked ``greedy`` (a candidate of its own, with 0 samples, when no
    sample wrote it); ``rank`` weighs it as one sample, but it is not one (pass@k counts samples only)."""
    def final(i: int, toks: list[int]) -> str:
        text = texts.update(i, toks)
        hit = rules.check(text, final=True)
        return rules.finish(text[: hit[0]] if hit is not None else text)

    finals = [final(i, toks) for i, toks in enumerate(outs)]
    merged: dict[str, Candidate] = {}
    for i, text in enumerate(finals):
        if text in merged:
            merged[text].samples += 1
        else:
            merged[text] = Candidate(text, 1, i)
    if greedy is not None:
        text = final(len(outs), greedy)
        if text not in merged:
            merged[text] = Candidate(text, 0, len(outs))
        merged[text].greedy = True
    return list(merged.values()), finals


def tests_group(completer, req: InfillRequest, fn: FunctionAt,
                opts: CheckOptions) -> tuple[SampleGroup, _Texts] | None:
    """The sequences that write up to ``opts.tests`` assertions, or None where none are wanted (M = 0,
    a method or nested function). Their prompt starts with the candidates' prefix text, so
    ``sample_groups`` evaluates the shared part once."""
    if opts.tests <= 0 or prefix_def_indent(req.prefix, fn):
        return None
    engine = completer.engine
    # M/2 sequences decoded together, each ending after its share of assertions plus one (some are
    # discarded later): a batch of 4 x 3 short lines costs a fraction of 3 sequences x 8 lines
    n = max(1, math.ceil(opts.tests / 2))
    per = math.ceil(opts.tests / n) + 1
    texts = _Texts(engine.tokenizer, n)

    def stop(i: int, toks: list[int]) -> bool:
        all_lines = f"assert x({texts.update(i, toks)}".split("\n")
        if len(all_lines[-1]) > MAX_ASSERT_CHARS:  # a runaway line (it is dropped: only complete lines count)
            return True
        body = [line for line in all_lines[:-1] if line.strip()]  # complete lines only
        return any(not line.startswith("assert") for line in body) or len(body) >= per

    ids = _prompt(completer, InfillRequest(tests_prompt_prefix(req.prefix, fn), "", mode="multi",
                                           max_tokens=opts.test_tokens, budget=req.budget))
    sampling = Sampling(max(opts.temperature, 0.2), opts.top_k, opts.top_p, opts.seed + 1000)
    group = SampleGroup(ids, n, sampling, opts.test_tokens, stop, completer.format.stop_ids(engine.tokenizer))
    return group, texts


def prefix_def_indent(prefix: str, fn: FunctionAt) -> bool:
    """True for a method or nested function (its name is not callable at module level)."""
    line = prefix.split("\n")[fn.def_line] if fn.def_line < prefix.count("\n") + 1 else ""
    return bool(line[: len(line) - len(line.lstrip())])


# ---- execution -----------------------------------------------------------------------------------

_HARDEN = r'''
import builtins as _hb, io as _hio, os as _hos, sys as _hsys
_root = _hos.path.realpath(_hos.getcwd())
def _inside(p):
    try:
        p = _hos.fspath(p)
    except TypeError:
        return True
    if isinstance(p, bytes):
        p = p.decode("utf-8", "replace")
    r = _hos.path.realpath(p)
    return r == _root or r.startswith(_root + _hos.sep)
_open0, _oopen0 = _hio.open, _hos.open
def _open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError("writing outside the sandbox directory is disabled")
    return _open0(file, mode, *a, **k)
def _oopen(path, flags, *a, **k):
    if flags & (_hos.O_WRONLY | _hos.O_RDWR | _hos.O_CREAT | _hos.O_TRUNC | _hos.O_APPEND) and not _inside(path):
        raise PermissionError("writing outside the sandbox directory is disabled")
    return _oopen0(path, flags, *a, **k)
_hb.open = _hio.open = _open
_hos.open = _oopen
for _n in ("rename", "renames", "replace", "link", "symlink", "truncate", "chmod", "chown", "lchown", "popen",
           "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "spawnv", "spawnve", "spawnl",
           "posix_spawn", "posix_spawnp", "forkpty", "fork", "system", "abort", "_exit", "setsid"):
    if hasattr(_hos, _n):
        setattr(_hos, _n, _deny)
for _m in ("posix", "_posixsubprocess", "_socket", "socket", "ctypes", "_ctypes", "multiprocessing",
           "_multiprocessing", "signal", "_signal", "subprocess", "asyncio", "pty"):
    _hsys.modules[_m] = None
del _hb, _hio, _n, _m
'''

_HARNESS = r'''
import json as _json, signal as _signal, sys as _sys, io as _io2, ast as _ast
_spec = _json.load(open("spec.json", encoding="utf-8"))
_out = open("results.jsonl", "w", encoding="utf-8", buffering=1)
%(harden)s
class _Sink(_io2.TextIOBase):
    def __init__(self, cap=0):
        self.parts, self.n, self.cap = [], 0, cap
    def writable(self):
        return True
    def write(self, s):
        s = str(s)
        if self.n < self.cap:
            self.parts.append(s[: self.cap - self.n])
        self.n += len(s)
        return len(s)
    def value(self):
        return "".join(self.parts)
_sys.stdout = _sys.stderr = _Sink()
class _Timeout(BaseException):
    pass
def _alarm(*a):
    raise _Timeout()
_signal.signal(_signal.SIGALRM, _alarm)
def _report(key, detail):
    _out.write(_json.dumps([key, detail]) + "\n")
def _run(code, ns, limit, mode="exec"):
    _signal.setitimer(_signal.ITIMER_REAL, limit)
    try:
        return eval(compile(code, "<candidate>", mode), ns)
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
def _why(e):
    if isinstance(e, _Timeout):
        return "timeout"
    if isinstance(e, AssertionError):
        return "failed"
    return "error: %%s: %%s" %% (type(e).__name__, str(e)[:160])
def _same(got, want, flags, value, is_expr):
    if got == want or " ".join(got.split()) == " ".join(want.split()):
        return True
    if flags & 8:  # doctest.ELLIPSIS
        pos = 0
        for part in want.split("..."):
            i = got.find(part, pos)
            if i < 0:
                return False
            pos = i + len(part)
        return True
    if is_expr:
        try:
            return _ast.literal_eval(want.strip()) == value
        except Exception:
            return False
    return False
def _doctest(t, g):
    cap, old = _Sink(1 << 16), _sys.stdout
    _sys.stdout = cap
    try:
        if t["setup"]:
            _run(t["setup"], g, _spec["test_s"])
        try:
            compile(t["code"], "<doctest>", "eval")
            is_expr = True
        except SyntaxError:
            is_expr = False
        value = _run(t["code"], g, _spec["test_s"], "eval" if is_expr else "exec")
    finally:
        _sys.stdout = old
    got = cap.value() + (repr(value) + "\n" if is_expr and value is not None else "")
    if _same(got, t["want"], t["flags"], value, is_expr):
        return "passed"
    return "failed: expected %%r, got %%r" %% (t["want"].strip()[:80], got.strip()[:80])
_ns = {"__name__": "__main__"}
try:
    _run(_spec["program"], _ns, _spec["define_s"])
    _report("define", "passed")
except BaseException as _e:
    _report("define", _why(_e))
    raise SystemExit(0)
for _t in _spec["tests"]:
    _g = dict(_ns)
    try:
        if _t["want"] is None:
            _run(_t["code"], _g, _spec["test_s"])
            _report(_t["id"], "passed")
        else:
            _report(_t["id"], _doctest(_t, _g))
    except BaseException as _e:
        _report(_t["id"], _why(_e))
'''

_NETNS: list[str] | None = None


def _sandbox_prefix() -> list[str]:
    global _NETNS
    if _NETNS is None:
        from localcoder.eval.sandbox import _netns_prefix

        _NETNS = _netns_prefix()
    return _NETNS


def run_candidate(program: str, tests: Sequence[Test], opts: CheckOptions, cancel: CancelToken | None = None
                  ) -> tuple[str, dict[str, str]]:
    """Run ``program`` then each test in one sandboxed process: (define detail, test id -> detail).
    A test the process never reached (the whole run timed out, was cancelled or crashed) is
    ``timeout`` / ``cancelled`` / ``crashed``."""
    from localcoder.eval.sandbox import _GUARD, _limits

    # wall-clock backstop (per-test timers run inside); +3 s for interpreter start-up on a busy machine
    budget = opts.define_seconds + min(opts.test_seconds * len(tests), opts.tests_budget_seconds) + 3.0
    spec = {"program": program, "define_s": opts.define_seconds, "test_s": opts.test_seconds,
            "tests": [{"id": t.id, "code": t.code, "want": t.want, "setup": t.setup, "flags": t.flags} for t in tests]}
    with tempfile.TemporaryDirectory(prefix="localcoder-checked-") as tmp:
        with open(os.path.join(tmp, "spec.json"), "w", encoding="utf-8") as fh:
            json.dump(spec, fh)
        with open(os.path.join(tmp, "harness.py"), "w", encoding="utf-8") as fh:
            fh.write(_GUARD + "\n" + _HARNESS % {"harden": _HARDEN})
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "HOME": tmp, "LANG": "C.UTF-8", "TMPDIR": tmp}
        cmd = _sandbox_prefix() + [sys.executable, "-I", "-S", "harness.py"]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                                preexec_fn=_limits(opts.memory_mb, int(budget) + 1))
        deadline, why = time.monotonic() + budget, "crashed"
        try:
            while proc.poll() is None:
                if cancel is not None and cancel.cancelled:
                    why = "cancelled"
                    break
                if time.monotonic() > deadline:
                    why = "timeout"
                    break
                time.sleep(0.01)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the process and anything it forked
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        if proc.returncode is not None and proc.returncode < 0 and why == "crashed":
            why = "timeout" if -proc.returncode in (signal.SIGXCPU, signal.SIGKILL) else f"killed by signal {-proc.returncode}"
        results: dict[str, str] = {}
        try:
            with open(os.path.join(tmp, "results.jsonl"), encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        key, detail = json.loads(line)
                    except (ValueError, TypeError):
                        continue
                    if isinstance(key, str) and isinstance(detail, str):
                        results.setdefault(key, detail)
        except OSError:
            pass
    define = results.pop("define", why)
    if define != "passed":
        return define, {t.id: "not run" for t in tests}
    return define, {t.id: results.get(t.id, why) for t in tests}


def execute(candidates: Sequence[Candidate], program_of: Callable[[str], str], tests: Sequence[Test],
            opts: CheckOptions, cancel: CancelToken, progress: Progress) -> None:
    """Fill each candidate's ``define`` and ``results`` (``opts.workers`` processes at a time)."""
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
        futures = [(c, pool.submit(run_candidate, program_of(c.text), tests, opts, cancel)) for c in candidates]
        for c, fut in futures:
            c.define, c.results = fut.result()
            done += 1
            progress("runs", done, len(candidates))


# ---- ranking -------------------------------------------------------------------------------------


def rank(candidates: list[Candidate], tests: list[Test]) -> tuple[list[Candidate], list[Test], int]:
    """Execution filtering on the docstring's own examples, then CodeT's dual agreement. Generated tests
    that no candidate passes are dropped (their count is returned); the docstring's tests stay.
    Candidates sorted by how many of the docstring's tests they pass (the user's spec, as written:
    AlphaCode-style filtering), then by CodeT score, then the greedy body first among equals, then
    samples, then order."""
    def passes(c: Candidate, t: Test) -> bool:
        return c.define == "passed" and c.results.get(t.id) == "passed"

    kept = [t for t in tests if t.kind != "generated" or any(passes(c, t) for c in candidates)]
    dropped = len(tests) - len(kept)
    groups: dict[tuple[str, ...], int] = {}
    for c in candidates:
        c.passed = tuple(t.id for t in kept if passes(c, t))
        c.written = sum(t.kind != "generated" and passes(c, t) for t in kept)
        groups[c.passed] = groups.get(c.passed, 0) + c.samples + c.greedy  # the greedy body weighs as one sample
    for c in candidates:
        c.score = groups[c.passed] * len(c.passed)
    ordered = sorted(candidates, key=codet_key)
    ordered.sort(key=lambda c: -c.written)  # stable: CodeT order within the same examples passed
    return ordered, kept, dropped


def codet_key(c: Candidate) -> tuple:
    """CodeT's order alone (score, then greedy, samples, sample order): what ``rank`` does within
    candidates that pass the same number of the docstring's tests."""
    return (-c.score, not c.greedy, -c.samples, c.index)


# ---- the whole request ---------------------------------------------------------------------------


@dataclass
class CheckOutcome:
    candidates: list[Candidate]  # ranked (or in sample order when unranked)
    samples: list[str]  # every sample's text, in order (duplicates included)
    tests: list[Test]  # the tests that count
    evidence: dict[str, Any]
    cancelled: bool = False


def _program(prefix: str, suffix: str) -> Callable[[str], str]:
    def program(middle: str) -> str:
        mid = middle if middle.endswith("\n") or suffix.startswith("\n") else middle + "\n"
        return prefix + mid + suffix
    return program


def check(completer, req: InfillRequest, opts: CheckOptions, cancel: CancelToken | None = None,
          progress: Progress | None = None, key: str | None = None) -> CheckOutcome:
    """Sample candidates and test-writing sequences in one shared decode, execute and rank (see the
    module docstring). ``key``: the client's key for the document (``Completer.route``)."""
    cancel = cancel or CancelToken()
    progress = progress or (lambda what, done, total: None)
    t0 = time.perf_counter()
    python = is_python(req.language, req.path)
    fn = require_function(req.prefix, req.suffix) if python else None
    cand_group, greedy_group, cand_texts, rules = candidates_group(completer, req, opts)
    writing = tests_group(completer, req, fn, opts) if fn is not None else None
    groups = [cand_group] + ([writing[0]] if writing is not None else []) + ([greedy_group] if greedy_group else [])

    def done(k: int, finished: int) -> None:
        if k == 0:
            progress("candidates", finished, opts.candidates)

    t_sample = time.perf_counter()
    adapter, route_ms = completer.route(req, key)
    outs, decode_t, batched = sample_groups(completer.engine, groups, cancel, done, adapter)
    completer.label(decode_t, adapter, route_ms)
    t_sampled = time.perf_counter()
    cands, samples = merge_candidates(outs[0], cand_texts, rules, outs[-1][0] if greedy_group else None)
    progress("candidates", opts.candidates, opts.candidates)
    t_cand = time.perf_counter()
    evidence: dict[str, Any] = {"language": "python" if python else (req.language or "unknown"),
                                "batched_decode": batched, "n_samples": len(samples),
                                "stragglers_cut": sorted(cand_texts.cut)}
    timings: dict[str, Any] = {
        "sampling_ms": round((t_sampled - t_sample) * 1000, 1), "candidates_ms": round((t_cand - t0) * 1000, 1),
        "decode": decode_t.to_dict(), "sampled_tokens": {"candidates": sum(map(len, outs[0])),
                                                         "tests": sum(map(len, outs[1])) if writing else 0}}
    if fn is None or cancel.cancelled:
        cands.sort(key=lambda c: (not c.greedy, c.index))
        evidence.update(ranked=False, note="not executed: only Python candidates are run and ranked; "
                        "these are the candidates unranked: the greedy body first, then the samples in sample order"
                        if fn is None else "cancelled")
        evidence["candidates"] = [_cand_json(c, i + 1) for i, c in enumerate(cands)]
        evidence["timings"] = timings
        return CheckOutcome(cands, samples, [], evidence, cancel.cancelled)
    doc = docstring_of(req.prefix, fn)
    written = written_tests(doc, fn.name, parameters_of(req.prefix, fn))
    seen = {ast.dump(ast.parse(t.code)) for t in written if t.kind == "example"}
    generated, counts = ([], {"unparsable": 0, "duplicates": 0}) if writing is None else parse_generated(
        [writing[1].update(i, toks) for i, toks in enumerate(outs[1])], fn.name, opts.tests, seen)
    progress("tests", len(written) + len(generated), len(written) + len(generated))
    t_tests = time.perf_counter()
    tests = written + generated
    if not cancel.cancelled:
        execute(cands, _program(req.prefix, req.suffix), tests, opts, cancel, progress)
    t_exec = time.perf_counter()
    ranked, kept, failing = rank(cands, tests)
    any_pass = any(c.score > 0 for c in ranked)
    note = None
    if not tests:
        note = "no tests: the greedy body first, then by how often each candidate was sampled"
    elif not any_pass:
        note = "no candidate passed any test: the greedy body first, then by how often each candidate was sampled"
    timings.update(tests_ms=round((t_tests - t_cand) * 1000, 1), exec_ms=round((t_exec - t_tests) * 1000, 1),
                   total_ms=round((t_exec - t0) * 1000, 1))
    evidence.update(
        ranked=True, note=note, cancelled=cancel.cancelled, function=fn.name,
        candidates=[_cand_json(c, i + 1) for i, c in enumerate(ranked)],
        tests=[t.to_json() for t in kept],
        discarded={"unparsable": counts["unparsable"], "duplicates": counts["duplicates"],
                   "failing_everywhere": failing, "failing_everywhere_tests": [t.code for t in tests if t not in kept]},
        timings=timings)
    return CheckOutcome(ranked, samples, kept, evidence, cancel.cancelled)


def _cand_json(c: Candidate, rank_no: int) -> dict[str, Any]:
    return {"rank": rank_no, "text": c.text, "samples": c.samples, "greedy": c.greedy, "score": c.score,
            "docstring_tests_passed": c.written,
            "passed": list(c.passed),
            "failed": {k: v for k, v in c.results.items() if v != "passed"},
            "error": None if c.define in ("passed", "not run") else c.define}


# ---- as a completion request (every surface) -------------------------------------------------------


@dataclass
class CheckedRequest(InfillRequest):
    """An ``InfillRequest`` answered by ``check``; ``Completer.stream`` dispatches on ``check``."""

    check: CheckOptions = field(default_factory=CheckOptions)
    progress: Progress | None = None

    def validate(self) -> None:
        super().validate()
        self.check.validate()
        if is_python(self.language, self.path):
            require_function(self.prefix, self.suffix)


@dataclass
class CheckedResult(CompletionResult):
    checked: dict[str, Any] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)


def checked_request(req: InfillRequest, opts: CheckOptions, progress: Progress | None = None) -> CheckedRequest:
    fields = {k: v for k, v in req.__dict__.items() if k not in ("check", "progress")}
    return CheckedRequest(**fields, check=opts, progress=progress)


def checked_stream(completer, req: CheckedRequest, cancel: CancelToken | None = None, key: str | None = None
                   ) -> CompletionStream:
    """The top-ranked candidate as one delta; ``result`` is a ``CheckedResult`` with the evidence."""
    req.validate()
    cancel = cancel or CancelToken()
    holder = CompletionStream(iter(()))

    def run():
        outcome = check(completer, req, req.check, cancel, req.progress, key)
        top = outcome.candidates[0].text if outcome.candidates and not outcome.cancelled else ""
        t = outcome.evidence.get("timings", {})
        timings = Timings(cancelled=outcome.cancelled)
        if "decode" in t:
            d = t["decode"]
            timings.prompt_n, timings.cached_n = d["prompt_n"] + d["cache_n"], d["cache_n"]
            timings.prompt_ms, timings.predicted_n, timings.predicted_ms = d["prompt_ms"], d["predicted_n"], d["predicted_ms"]
            timings.specialist = d.get("specialist")
            timings.route_ms, timings.adapter_switch_ms = d.get("route_ms", 0.0), d.get("adapter_switch_ms", 0.0)
        holder.result = CheckedResult(top, "cancelled" if outcome.cancelled else "checked", "multi", timings, False,
                                      timings.prompt_n, checked=outcome.evidence, candidates=outcome.candidates)
        if top:
            yield top

    holder._run = run()
    return holder


def evidence_markdown(evidence: dict[str, Any], limit: int = 5) -> str:
    """The evidence as Markdown (the LSP's documentation and messages)."""
    lines = []
    if evidence.get("note"):
        lines.append(f"*{evidence['note']}*")
    tests = {t["id"]: t for t in evidence.get("tests", [])}
    if evidence.get("ranked"):
        d = evidence.get("discarded", {})
        lines.append(f"{len(tests)} tests; discarded: {d.get('unparsable', 0)} unparsable, "
                     f"{d.get('failing_everywhere', 0)} failing on every candidate")
    for c in evidence.get("candidates", [])[:limit]:
        own = sum(t["kind"] != "generated" for t in tests.values())
        head = f"**#{c['rank']}** score {c['score']}, {c['samples']} sample(s), passes {len(c['passed'])}/{len(tests)}"
        if own:
            head += f" ({c.get('docstring_tests_passed', 0)}/{own} of the docstring's)"
        if c.get("error"):
            head += f" — {c['error']}"
        lines.append(head)
        for tid, why in list(c.get("failed", {}).items())[:3]:
            code = tests.get(tid, {}).get("code", tid)
            lines.append(f"  - `{code[:80]}`: {why}")
    return "\n\n".join(lines)


def run_cli(completer, req: InfillRequest, check_cfg, *, as_json: bool) -> int:
    """``localcoder complete ... --check tests``: progress on stderr, Ctrl-C stops decoding and the
    sandbox processes; prints the top candidate (or the whole evidence with ``--json``)."""
    import threading

    cancel = CancelToken()

    def progress(what: str, done: int, total: int) -> None:
        label = {"candidates": "candidates decoded", "tests": "tests written", "runs": "candidates run"}[what]
        print(f"\r{label}: {done}/{total}   ", end="" if what != "tests" else "\n", file=sys.stderr, flush=True)

    creq = checked_request(req, CheckOptions.from_config(check_cfg), progress)
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = completer.complete(creq, cancel)
        except BaseException as exc:  # re-raised on the main thread (typed errors -> exit 2)
            box["error"] = exc

    worker = threading.Thread(target=work, name="localcoder-checked", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        cancel.cancel()  # decoding stops between steps, sandbox processes are killed
        worker.join(10)
        raise
    print(file=sys.stderr)
    if "error" in box:
        raise box["error"]
    result: CheckedResult = box["result"]
    if as_json:
        print(json.dumps({"text": result.text, "stop_type": result.stop_type, "checked": result.checked}, indent=2))
    else:
        if result.checked.get("note"):
            print(f"note: {result.checked['note']}", file=sys.stderr)
        top = (result.checked.get("candidates") or [{}])[0]
        if top:
            print(f"top candidate: score {top.get('score')}, passes {len(top.get('passed', []))}/"
                  f"{len(result.checked.get('tests', []))} tests", file=sys.stderr)
        print(result.text)
    return 0

"""Held-out FIM cases sampled deterministically from any directory of source files (any language).

Kinds: ``line`` (one whole non-trivial line is the hole; single-line mode), ``partial`` (a line typed
up to a uniform point inside it, often inside a word: the hole is the rest of the line, as when a
user pauses mid-line; single-line mode) and ``block`` (2-6 consecutive lines; multi-line mode). Prefix and suffix are cut at line boundaries to at most
``max_prefix_chars`` / ``max_suffix_chars`` around the hole, so cases stay small; the completer's
token budget trims further.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Sequence

from localcoder.errors import InputFileError
from localcoder.eval.tasks import FimCase

EXTENSIONS = {".py": "python", ".js": "javascript", ".ts": "typescript", ".go": "go", ".rs": "rust",
              ".java": "java", ".c": "c", ".h": "c", ".cpp": "cpp", ".cc": "cpp", ".rb": "ruby",
              ".lua": "lua", ".sh": "shell", ".cs": "csharp", ".kt": "kotlin", ".php": "php"}
MAX_FILE_BYTES = 400_000


def source_files(paths: Iterable[str | Path], extensions: Sequence[str] | None = None) -> list[Path]:
    exts = set(extensions or EXTENSIONS)
    out: list[Path] = []
    for root in map(Path, paths):
        if not root.exists():
            raise InputFileError(f"{root}: no such file or directory")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out += [p for p in files if p.suffix in exts and 0 < p.stat().st_size <= MAX_FILE_BYTES]
    return sorted(set(out))


def _read(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:4096]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _good_line(line: str) -> bool:
    s = line.strip()
    return len(s) >= 6 and not s.startswith(("#", "//", "/*", "*", '"""', "'''")) and len(line) < 200


def sample_cases(paths: Iterable[str | Path], n: int, seed: int = 0, kinds: Sequence[str] = ("line",),
                 max_prefix_chars: int = 6000, max_suffix_chars: int = 2000) -> list[FimCase]:
    files = source_files(paths)
    if not files:
        raise InputFileError("no source files found to sample held-out cases from")
    rng = random.Random(seed)
    cases: list[FimCase] = []
    seen: set[tuple[str, int]] = set()
    attempts = 0
    while len(cases) < n and attempts < n * 50:
        attempts += 1
        path = files[rng.randrange(len(files))]
        text = _read(path)
        if not text:
            continue
        lines = text.splitlines(keepends=True)
        kind = kinds[rng.randrange(len(kinds))]
        span = 1 if kind in ("line", "partial") else rng.randint(2, 6)
        i = rng.randrange(len(lines))
        if (str(path), i) in seen or i + span > len(lines) or not _good_line(lines[i]):
            continue
        if not all(line.endswith("\n") for line in lines[i:i + span]):
            continue
        seen.add((str(path), i))
        prefix = "".join(lines[:i])
        suffix = "".join(lines[i + span:])
        reference = "".join(lines[i:i + span])
        if kind == "partial":  # the typed part of the line joins the prefix; the rest of it is the answer
            body = lines[i].rstrip("\n").lstrip()
            typed = lines[i][: len(lines[i]) - len(lines[i].lstrip())] + body[: rng.randrange(len(body))]
            prefix, reference = prefix + typed, lines[i].rstrip("\n")[len(typed):]
        cut = prefix.find("\n", max(0, len(prefix) - max_prefix_chars)) + 1 if len(prefix) > max_prefix_chars else 0
        end = suffix.rfind("\n", 0, max_suffix_chars) + 1 if len(suffix) > max_suffix_chars else len(suffix)
        cases.append(FimCase(
            id=f"{path.name}:{i + 1}:{kind}", prefix=prefix[cut:], suffix=suffix[:end],
            reference=reference, mode="multi" if kind == "block" else "single",
            language=EXTENSIONS.get(path.suffix, "text"), path=str(path)))
    return cases

"""Docstring generation cases: real documented Python functions from held-out files, their
docstring removed; the model infills it between the quotes (the LSP's "Generate docstring"
action, same prompt) and is scored with BLEU against the original."""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Iterable

from localcoder.docstring import docstring_request, find_function
from localcoder.errors import InputFileError
from localcoder.eval.heldout import _read, source_files
from localcoder.eval.tasks import FimCase


def _documented_functions(text: str) -> list[tuple[int, int, int, str]]:
    """(def line, docstring first line, line after the docstring, docstring) per documented function
    (0-based lines)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            doc = ast.get_docstring(node, clean=True)
            if doc and isinstance(first, ast.Expr) and len(node.body) > 1 and 10 <= len(doc) <= 400:
                out.append((node.lineno - 1, first.lineno - 1, first.end_lineno, doc))  # type: ignore[arg-type]
    return out


def sample_cases(paths: Iterable[str | Path], n: int, seed: int = 0) -> list[FimCase]:
    files = [p for p in source_files(paths, [".py"])]
    if not files:
        raise InputFileError("no Python files found to sample documented functions from")
    rng = random.Random(seed)
    rng.shuffle(files)
    cases: list[FimCase] = []
    for path in files:
        text = _read(path)
        if not text:
            continue
        for def_line, doc_start, doc_end, doc in _documented_functions(text)[:2]:  # spread over files
            lines = text.splitlines(keepends=True)
            stripped = "".join(lines[:doc_start] + lines[doc_end:])  # the file without this docstring
            fn = find_function(stripped, def_line)
            if fn is None or fn.has_docstring:
                continue
            req = docstring_request(stripped, fn, path=str(path))
            cases.append(FimCase(id=f"{path.name}:{def_line + 1}:{fn.name}", prefix=req.prefix[-6000:],
                                 suffix=req.suffix[:2000], reference=doc, mode="multi", path=str(path),
                                 metric="bleu"))
            if len(cases) >= n:
                return cases
    return cases

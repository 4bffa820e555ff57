"""Generate a docstring by FIM (the LSP code action and the docstring BLEU eval share it).

The prompt is the file with the cursor between the opening and closing quotes of an empty
docstring right after the signature::

    def area(w, h):
        \"\"\"<cursor>\"\"\"
        return w * h

so the model sees the signature before and the body after, which is exactly what FIM is good at.
``docstring_request`` is also what the docstring BLEU evaluation runs on held-out functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from localcoder.completion import InfillRequest

_DEF = re.compile(r"^([ \t]*)(?:async[ \t]+)?def[ \t]+([A-Za-z_]\w*)")
QUOTES = '"""'


@dataclass(frozen=True)
class FunctionAt:
    name: str
    def_line: int  # line of `def`
    body_line: int  # first line after the signature
    indent: str  # indentation of the body
    has_docstring: bool


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _signature_end(lines: list[str], start: int) -> int | None:
    """Line where the signature starting at ``start`` ends with its ``:`` (brackets balanced)."""
    depth = 0
    for i in range(start, min(len(lines), start + 50)):
        code = lines[i].split("#", 1)[0]
        depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
        if depth <= 0 and code.rstrip().endswith(":"):
            return i
    return None


def _body_indent(lines: list[str], body_line: int, def_indent: str) -> tuple[str, int | None]:
    """The body's indentation and its first non-blank line (None when the body is empty)."""
    for i in range(body_line, len(lines)):
        if lines[i].strip():
            ind = _indent(lines[i])
            if len(ind) > len(def_indent):
                return ind, i
            break
    return def_indent + ("\t" if def_indent.startswith("\t") else "    "), None


def _contains(lines: list[str], def_line: int, sig_end: int, line: int, def_indent: str) -> bool:
    if def_line <= line <= sig_end:
        return True
    for i in range(sig_end + 1, line + 1):
        if lines[i].strip() and len(_indent(lines[i])) <= len(def_indent):
            return False
    return line > sig_end


def find_function(text: str, line: int) -> FunctionAt | None:
    """The innermost Python function whose signature or body holds ``line``."""
    lines = [s.rstrip("\r") for s in text.split("\n")]
    if not 0 <= line < len(lines):
        return None
    for i in range(line, -1, -1):
        m = _DEF.match(lines[i])
        if not m:
            continue
        sig_end = _signature_end(lines, i)
        if sig_end is None or not _contains(lines, i, sig_end, line, m.group(1)):
            continue
        indent, first = _body_indent(lines, sig_end + 1, m.group(1))
        has_doc = first is not None and lines[first].lstrip().startswith(('"""', "'''", 'r"""', "r'''"))
        return FunctionAt(m.group(2), i, sig_end + 1, indent, has_doc)
    return None


def _offset_of_line(text: str, line: int) -> int:
    pos = 0
    for _ in range(line):
        nl = text.find("\n", pos)
        if nl < 0:
            return len(text)
        pos = nl + 1
    return pos


def docstring_request(text: str, fn: FunctionAt, *, path: str | None = None, max_tokens: int = 96) -> InfillRequest:
    at = _offset_of_line(text, fn.body_line)
    before = text[:at] if text[:at].endswith("\n") or at == 0 else text[:at] + "\n"
    prefix = f"{before}{fn.indent}{QUOTES}"
    suffix = f"{QUOTES}\n{text[at:]}"
    return InfillRequest(prefix, suffix, path=path, language="python", mode="multi", max_tokens=max_tokens,
                         stop=(QUOTES,))


def format_docstring(generated: str, indent: str) -> str | None:
    """The lines to insert (quotes included), or None when the model produced nothing usable."""
    body = generated.split(QUOTES, 1)[0].rstrip()
    if not body.strip():
        return None
    body = body.lstrip("\n")
    if "\n" in body:
        return f"{indent}{QUOTES}{body}\n{indent}{QUOTES}\n"
    return f"{indent}{QUOTES}{body.strip()}{QUOTES}\n"

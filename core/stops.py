"""Stop rules and clean-up for generated middles: the one place they live.

``StopRules.check(text)`` says where to cut the text generated so far (or that generation may go
on); ``visible(text)`` is how much of it is already final and can be streamed; ``finish(text)``
is the cleaned result that inserts correctly at the cursor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPENERS = {"(": ")", "[": "]", "{": "}"}
CLOSERS = {v: k for k, v in OPENERS.items()}
BLOCK_OPENER_ENDINGS = (":", "{", "(", "[", "=>", "->", " do", " then")
_WS = re.compile(r"[ \t]*")
_TRIPLE = re.compile(r'"""|\'\'\'')
_LINE_COMMENT_OPEN = re.compile(r"^[ \t]*/\*", re.M)


def indent_width(line: str) -> int:
    lead = _WS.match(line).group(0)  # type: ignore[union-attr]
    return len(lead.expandtabs(4))


def bracket_depth(text: str) -> int:
    """Openers minus closers, outside string literals (a light lexer: quotes and escapes)."""
    depth, quote, escaped = 0, "", False
    for ch in text:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"`":
            quote = ch
        elif ch in OPENERS:
            depth += 1
        elif ch in CLOSERS:
            depth -= 1
    return depth


def open_block_closer(prefix: str) -> str:
    """The delimiter that closes the string or comment block the cursor sits in: a triple-quoted
    string (Python's docstrings) or a ``/*`` comment opened at the start of a line; "" in code.
    A light scan (no full lexer): triple quotes pair up in order, a comment opens only at a line's
    start (so ``"src/**/*.py"`` in a string opens nothing)."""
    quote, pos = "", 0
    while True:
        if quote:  # inside a string: find its end
            i = prefix.find(quote, pos)
            if i < 0:
                return quote
            quote, pos = "", i + 3
        else:
            m = _TRIPLE.search(prefix, pos)
            if m is None:
                break
            quote, pos = m.group(0), m.end()
    opened = [m.start() for m in _LINE_COMMENT_OPEN.finditer(prefix)]
    if opened and prefix.find("*/", opened[-1] + 2) < 0:
        return "*/"
    return ""


def decide_mode(prefix: str, suffix: str) -> str:
    """'single' when the cursor line continues after the cursor or is mid-statement;
    'multi' on an empty line or right after a block opener."""
    before = prefix.rsplit("\n", 1)[-1]
    after = suffix.split("\n", 1)[0]
    if after.strip():
        return "single"
    if not before.strip():
        return "multi"
    if before.rstrip().endswith(BLOCK_OPENER_ENDINGS):
        return "multi"
    return "single"


@dataclass
class StopRules:
    mode: str  # single | multi (already resolved)
    prefix: str
    suffix: str
    stop_words: tuple[str, ...] = ()
    indent: int | None = None  # the cursor line's indentation (llama.cpp's n_indent)
    string_scope: bool = False  # CompletionConfig.string_scope

    def __post_init__(self) -> None:
        self.before = self.prefix.rsplit("\n", 1)[-1]  # cursor line, left of the cursor
        self.line_suffix = self.suffix.split("\n", 1)[0].strip()
        # The suffix line a generation must not repeat: the first non-blank line after the cursor
        # line (or the cursor line's rest itself when nothing precedes the cursor on its line).
        below = self.suffix.split("\n")[0 if not self.before.strip() else 1:]
        self.next_line = next((line.strip() for line in below if line.strip()), "")
        self.opener = bool(self.before.strip()) and self.before.rstrip().endswith(BLOCK_OPENER_ENDINGS)
        self.stop_words = tuple(w for w in self.stop_words if w)
        # the cursor sits after the indentation of its line (nothing else typed): a middle that starts
        # with that same indentation again would indent the line twice (see drop_repeated_indent)
        self.repeated_indent = self.before if self.before and not self.before.strip(" \t") else ""
        # string_scope: inside a docstring or a block comment, a multi-line middle ends with the line that
        # closes it; what a model writes after that (the function's code) is another suggestion, often cut
        # off by max_tokens. Opt-in: measured, it shortens such middles but costs ES (docs/latency.md,
        # "The tail of a keystroke")
        self.closer = open_block_closer(self.prefix) if self.string_scope else ""

    def drop_repeated_indent(self, text: str) -> tuple[str, bool]:
        """(text, settled): the generated text without a repeat of the cursor line's indentation at its
        start, and whether that is decided (False while the text is still only a prefix of it). Models
        taught an append-only layout write the line's indentation again (the 1,024-token layout adapter
        did so on HumanEval typing cases: 35 of the 200 that plain PSM passed failed with it)."""
        ind = self.repeated_indent
        if not ind:
            return text, True
        if ind.startswith(text):
            return text, False
        if text.startswith(ind):
            return text[len(ind):], True
        return text, True

    # ---- deciding where to stop ---------------------------------------------------------------
    def check(self, text: str, final: bool = False) -> tuple[int, str] | None:
        """(cut position, reason) if the text must end, else None."""
        cuts: list[tuple[int, str]] = []
        for word in self.stop_words:
            i = text.find(word)
            if i >= 0:
                cuts.append((i, "word"))
        if self.mode == "single":
            i = self._first_content_newline(text)
            line = text if i is None and final else (text[:i] if i is not None else None)
            if line is not None and self.next_line and line.strip() == self.next_line:
                cuts.append((0, "suffix"))  # the line already follows the cursor: nothing to add
            elif i is not None:
                cuts.append((i, "line"))
        else:
            cuts += self._block_cuts(text, final)
        return min(cuts) if cuts else None

    def _first_content_newline(self, text: str) -> int | None:
        start = 0
        while True:
            i = text.find("\n", start)
            if i < 0:
                return None
            if text[:i].strip():
                return i
            start = i + 1

    def _base_indent(self, text: str) -> int:
        if self.indent is not None:
            return self.indent
        if self.before.strip():
            return indent_width(self.before)
        return indent_width(self.before + text.split("\n", 1)[0])

    def _block_cuts(self, text: str, final: bool) -> list[tuple[int, str]]:
        lines = text.split("\n")
        base = self._base_indent(text)
        cuts: list[tuple[int, str]] = []
        pos = 0
        for j, line in enumerate(lines):
            complete = j < len(lines) - 1 or final
            start = pos - 1 if j > 0 else 0  # cut before the newline that opens this line
            stripped = line.strip()
            if j > 0 and stripped:
                width = indent_width(line)
                if width < base or (self.opener and width <= base):
                    cuts.append((start, "block"))
                    break
            if complete and stripped and self.next_line and stripped == self.next_line:
                if j > 0 or not self.before.strip():
                    cuts.append((start, "suffix"))
                    break
            pos += len(line) + 1
        depth_cut = self._bracket_cut(text)
        if depth_cut is not None:
            cuts.append((depth_cut, "brackets"))
        if self.closer:
            i = text.find(self.closer)
            end = text.find("\n", i + len(self.closer)) if i >= 0 else -1
            if end >= 0:
                cuts.append((end, "string"))
        return cuts

    def _bracket_cut(self, text: str) -> int | None:
        """Cut before a closer that closes a bracket opened before the cursor when the suffix
        on the cursor line already holds that closer."""
        if not self.line_suffix or self.line_suffix[0] not in CLOSERS:
            return None
        for i, ch in enumerate(text):
            if ch == self.line_suffix[0] and bracket_depth(text[: i + 1]) < 0:
                return i
        return None

    # ---- what may be shown, and the final clean-up ---------------------------------------------
    def visible(self, text: str) -> str:
        """The part of ``text`` that no later token can change: trailing whitespace, a partial stop
        word and a possible overlap with the cursor line's suffix are held back."""
        hold = max((len(w) - 1 for w in self.stop_words), default=0)
        hold = max(hold, len(self.line_suffix))
        body = text.rstrip()
        if hold and len(body) > len(text) - hold:
            body = text[: max(0, len(text) - hold)].rstrip()
        return _clean_lines(body)

    def finish(self, text: str) -> str:
        text = _clean_lines(text).rstrip()
        ls = self.line_suffix
        if ls and "\n" not in text and text.endswith(ls) and bracket_depth(text) < 0:
            candidate = text[: -len(ls)].rstrip()
            if bracket_depth(candidate) >= bracket_depth(text):
                text = candidate
        if self.mode == "single" and not text.strip():
            return ""
        return text


def _clean_lines(text: str) -> str:
    """Trailing spaces/tabs removed from every complete line."""
    if "\n" not in text:
        return text
    lines = text.split("\n")
    return "\n".join([line.rstrip() for line in lines[:-1]] + [lines[-1]])

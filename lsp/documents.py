"""Open documents: incremental sync and LSP positions done right.

- Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` only (the LSP's definition). ``str.splitlines`` would also
  split at form feeds, ``\\v`` and U+2028, which Python sources may contain; we never use it.
- A position's ``character`` counts code units of the negotiated encoding: UTF-16 (the default),
  UTF-8 or UTF-32. An emoji is 2 UTF-16 units; a tab is 1. A position inside a surrogate pair snaps
  to the start of its character.
- A ``character`` past the end of its line means the end of the line (the spec says so). A ``line``
  past the end of the document is an error for requests (``strict``); edits clamp it to the end
  (clients such as Neovim address "after the last line" when appending).
- A change is all or nothing: an invalid range (end before start, negative numbers) leaves the
  document as it was. Lone surrogates in text become U+FFFD (``localcoder.text.clean``), which
  keeps every offset.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from localcoder.errors import InvalidRequest
from localcoder.text import clean

_EOL = re.compile(r"\r\n|\r|\n")
UTF16, UTF8, UTF32 = "utf-16", "utf-8", "utf-32"


class Pos(Protocol):
    line: int
    character: int


@dataclass(frozen=True)
class Edit:
    """One applied change, in code-point offsets of the text after the change."""

    start: int
    end: int  # start + len(inserted text)
    removed: int  # code points removed
    at: float  # time.monotonic()


def line_starts(text: str) -> list[int]:
    """Code-point offset where each line begins; one entry more than the number of line breaks."""
    return [0] + [m.end() for m in _EOL.finditer(text)]


def _line_end(text: str, starts: list[int], line: int) -> int:
    """Offset of the end of ``line``'s content (before its line break)."""
    if line + 1 < len(starts):
        end = starts[line + 1]
        return end - 2 if text[end - 2 : end] == "\r\n" else end - 1
    return len(text)


def _units(ch: str, encoding: str) -> int:
    if encoding == UTF16:
        return 2 if ord(ch) > 0xFFFF else 1
    if encoding == UTF8:
        return len(ch.encode("utf-8", "surrogatepass"))
    return 1


def units_to_chars(line_text: str, units: int, encoding: str = UTF16) -> int:
    """Code points in ``line_text`` covered by ``units`` code units (clamped to the line)."""
    if encoding == UTF32:
        return min(units, len(line_text))
    used = 0
    for i, ch in enumerate(line_text):
        used += _units(ch, encoding)
        if used > units:
            return i
    return len(line_text)


def chars_to_units(line_text: str, chars: int, encoding: str = UTF16) -> int:
    if encoding == UTF32:
        return chars
    return sum(_units(ch, encoding) for ch in line_text[:chars])


def normalize_encoding(encoding: object) -> str:
    """'utf-8' | 'utf-16' | 'utf-32' from a PositionEncodingKind (an Enum) or a string; UTF-16 if unknown."""
    value = str(getattr(encoding, "value", encoding) or "").lower()
    return value if value in (UTF8, UTF16, UTF32) else UTF16


def check_position(pos: Pos) -> None:
    line, character = getattr(pos, "line", None), getattr(pos, "character", None)
    if not isinstance(line, int) or not isinstance(character, int) or line < 0 or character < 0:
        raise InvalidRequest("position must have non-negative integer line and character", param="position")


@dataclass
class Document:
    uri: str
    text: str
    language_id: str = ""
    version: int = 0
    encoding: str = UTF16
    opened_at: float = field(default_factory=time.monotonic)
    edits: list[Edit] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._starts = line_starts(self.text)

    @property
    def line_count(self) -> int:
        return len(self._starts)

    def line(self, n: int) -> str:
        return self.text[self._starts[n] : _line_end(self.text, self._starts, n)]

    def offset_at(self, pos: Pos, *, strict: bool = True) -> int:
        """Code-point offset of an LSP position. ``strict``: a line past the end is an error."""
        check_position(pos)
        if pos.line >= self.line_count:
            if strict:
                raise InvalidRequest(
                    f"position line {pos.line} is past the end of {self.uri} ({self.line_count} lines)",
                    param="position")
            return len(self.text)
        start = self._starts[pos.line]
        return start + units_to_chars(self.line(pos.line), pos.character, self.encoding)

    def position_at(self, offset: int) -> tuple[int, int]:
        """(line, character in code units) of a code-point offset."""
        offset = max(0, min(offset, len(self.text)))
        line = bisect_right(self._starts, offset) - 1
        # An offset between \r and \n belongs to the end of that line.
        line_text = self.line(line)
        col = min(offset - self._starts[line], len(line_text))
        return line, chars_to_units(line_text, col, self.encoding)

    def apply(self, start: Pos | None, end: Pos | None, new_text: str, version: int | None = None) -> None:
        """Apply one content change: a range edit, or a full replacement when ``start`` is None."""
        if start is None or end is None:
            self.text, a, b = new_text, 0, len(self.text)
            removed = b
        else:
            a, b = self.offset_at(start, strict=False), self.offset_at(end, strict=False)
            if b < a:
                raise InvalidRequest(f"the range {start.line}:{start.character}-{end.line}:{end.character} ends "
                                     "before it starts", param="contentChanges")
            removed = b - a
            self.text = self.text[:a] + new_text + self.text[b:]
        self._starts = line_starts(self.text)
        self._shift_edits(b, len(new_text) - removed)
        self.edits.append(Edit(a, a + len(new_text), removed, time.monotonic()))
        del self.edits[:-64]
        if version is not None:
            self.version = version

    def _shift_edits(self, after: int, delta: int) -> None:
        """Keep earlier edits pointing at the same text when a change lands before them."""
        self.edits = [Edit(e.start + delta, e.end + delta, e.removed, e.at) if e.start >= after else e
                      for e in self.edits]

    def split(self, offset: int) -> tuple[str, str]:
        return self.text[:offset], self.text[offset:]


class DocumentStore:
    """The documents the client has opened, by URI."""

    def __init__(self) -> None:
        self._docs: dict[str, Document] = {}
        self.encoding = UTF16

    def open(self, uri: str, text: str, language_id: str = "", version: int = 0) -> Document:
        doc = Document(uri, clean(text), language_id, version, self.encoding)
        self._docs[uri] = doc
        return doc

    def find(self, uri: str) -> Document | None:
        return self._docs.get(uri)

    def close(self, uri: str) -> None:
        self._docs.pop(uri, None)

    def get(self, uri: str) -> Document:
        if not isinstance(uri, str):
            raise InvalidRequest("textDocument.uri must be a string", param="textDocument")
        doc = self._docs.get(uri)
        if doc is None:
            raise InvalidRequest(f"unknown document {uri}: it was never opened (textDocument/didOpen)",
                                 param="textDocument")
        return doc

    def change(self, uri: str, changes: Iterable[object], version: int | None) -> Document:
        """Apply all of a didChange or none of it: on an invalid change the document is unchanged."""
        doc = self.get(uri)
        saved = (doc.text, doc._starts, list(doc.edits), doc.version)
        try:
            for i, ch in enumerate(changes):
                rng = getattr(ch, "range", None)
                text = getattr(ch, "text", None)
                if not isinstance(text, str):
                    raise InvalidRequest(f"contentChanges[{i}].text must be a string", param="contentChanges")
                try:
                    doc.apply(rng.start if rng else None, rng.end if rng else None, clean(text))
                except InvalidRequest as exc:
                    raise InvalidRequest(f"contentChanges[{i}]: {exc.message}", param="contentChanges") from None
        except InvalidRequest:
            doc.text, doc._starts, doc.edits, doc.version = saved
            raise
        if version is not None:
            doc.version = version
        return doc

    def others(self, uri: str) -> list[Document]:
        return [d for u, d in self._docs.items() if u != uri]

    def __contains__(self, uri: str) -> bool:
        return uri in self._docs

    def __len__(self) -> int:
        return len(self._docs)

"""Positions in UTF-16 code units and incremental sync (lsp/documents.py)."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from localcoder.errors import InvalidRequest
from localcoder.lsp.documents import UTF8, UTF32, Document, DocumentStore, line_starts


def P(line: int, character: int):
    return NS(line=line, character=character)


def change(sl, sc, el, ec, text):
    return NS(range=NS(start=P(sl, sc), end=P(el, ec)), text=text)


def test_line_breaks_are_only_lf_crlf_cr():
    text = "a\r\nb\rc\nd\x0ce\u2028f\x0bg"
    assert line_starts(text) == [0, 3, 5, 7]
    doc = Document("file:///x", text)
    assert doc.line_count == 4
    assert doc.line(0) == "a" and doc.line(1) == "b" and doc.line(2) == "c"
    assert doc.line(3) == "d\x0ce\u2028f\x0bg"  # form feed, U+2028, \v do not end LSP lines


def test_emoji_counts_two_utf16_units():
    doc = Document("file:///x", "s = '😀x'\n")
    # 😀 is one code point, two UTF-16 code units: 'x' sits at UTF-16 column 7.
    assert doc.text[doc.offset_at(P(0, 7))] == "x"
    assert doc.position_at(doc.text.index("x")) == (0, 7)
    # a position inside the surrogate pair snaps to the emoji's start
    assert doc.offset_at(P(0, 6)) == doc.text.index("😀")


@pytest.mark.parametrize("encoding,col", [(UTF8, 9), (UTF32, 6)])
def test_other_negotiated_encodings(encoding, col):
    doc = Document("file:///x", "s = '😀x'", encoding=encoding)
    assert doc.text[doc.offset_at(P(0, col))] == "x"
    assert doc.position_at(doc.text.index("x")) == (0, col)


def test_tabs_and_non_ascii_are_one_unit():
    doc = Document("file:///x", "\tdéf f():\n\t\treturn 'ü'\n")
    assert doc.offset_at(P(1, 2)) == doc.text.index("return")
    assert doc.position_at(doc.text.index("ü")) == (1, 10)


def test_character_past_line_end_clamps_and_line_past_end_is_an_error():
    doc = Document("file:///x", "ab\r\ncd\r\n")
    assert doc.offset_at(P(0, 99)) == 2  # end of line 0, before \r\n
    assert doc.offset_at(P(2, 0)) == len(doc.text)  # the empty last line exists
    with pytest.raises(InvalidRequest) as err:
        doc.offset_at(P(3, 0))
    assert err.value.param == "position"
    assert doc.offset_at(P(3, 0), strict=False) == len(doc.text)
    with pytest.raises(InvalidRequest):
        doc.offset_at(P(-1, 0))


def test_incremental_changes_with_crlf_and_emoji():
    store = DocumentStore()
    store.open("file:///a.py", "x = '😀'\r\ny = 1\r\n", "python", 1)
    # type "z" after the emoji (UTF-16 column 7), then replace "1" on line 1 by "2 + 3"
    store.change("file:///a.py", [change(0, 7, 0, 7, "z")], 2)
    store.change("file:///a.py", [change(1, 4, 1, 5, "2 + 3")], 3)
    doc = store.get("file:///a.py")
    assert doc.text == "x = '😀z'\r\ny = 2 + 3\r\n" and doc.version == 3
    # join lines by deleting the CRLF, then split again with a lone LF
    store.change("file:///a.py", [change(0, 9, 1, 0, "")], 4)
    assert doc.text == "x = '😀z'y = 2 + 3\r\n"
    store.change("file:///a.py", [change(0, 9, 0, 9, "\n")], 5)
    assert doc.line(1) == "y = 2 + 3"


def test_appending_after_the_last_line_like_neovim():
    store = DocumentStore()
    store.open("file:///a.py", "a\nb\n")
    store.change("file:///a.py", [change(3, 0, 3, 0, "c\n")], 2)  # line == line count: clamp
    assert store.get("file:///a.py").text == "a\nb\nc\n"


def test_full_replacement_and_several_changes_in_one_notification():
    store = DocumentStore()
    store.open("file:///a.py", "old")
    store.change("file:///a.py", [NS(range=None, text="abc"), change(0, 3, 0, 3, "d"), change(0, 0, 0, 1, "")], 2)
    assert store.get("file:///a.py").text == "bcd"


def test_unknown_document_names_it():
    with pytest.raises(InvalidRequest) as err:
        DocumentStore().get("file:///nope.py")
    assert "file:///nope.py" in str(err.value) and err.value.param == "textDocument"


def test_edits_are_tracked_and_shift_with_later_changes():
    doc = Document("file:///x", "line0\nline1\nline2\n")
    doc.apply(P(2, 0), P(2, 0), "NEW")
    doc.apply(P(0, 0), P(0, 0), "ab")  # before the first edit: it moves by 2
    first, second = doc.edits
    assert doc.text[first.start:first.end] == "NEW"
    assert doc.text[second.start:second.end] == "ab"

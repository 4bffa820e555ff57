"""Text as it enters completion: every string a client sends passes through ``clean`` once.

JSON can carry lone UTF-16 surrogates (``"\\ud800"``); Python keeps them in ``str`` but they
cannot be encoded as UTF-8, so a tokenizer (or an HTTP client) raises on them. Editors replace
them with U+FFFD (the replacement character); so do we. The replacement keeps every offset: one
code point, one UTF-16 unit, three UTF-8 bytes, as the surrogate was.
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(s: str) -> str:
    """``s`` with each lone surrogate replaced by U+FFFD (``s`` itself when it has none)."""
    if s.isascii():
        return s
    return _SURROGATE.sub(REPLACEMENT, s)

"""Command-line flags generated from a config dataclass: one convention for every subcommand.

``add_dataclass_arguments(parser, cls)`` adds one flag per field of ``cls``:

- name ``--field-name`` (dest ``field_name``); ``flags`` overrides it (``("--model", "-m")``);
- help: the field's ``metadata["help"]``, else its ``# comment`` in the class source, with the
  dataclass default appended (``(default: 64)``);
- type from the annotation: ``Literal[...]`` gives ``choices``, ``bool`` gives ``--x/--no-x``
  (``argparse.BooleanOptionalAction``; ``action="store_true"`` where only ``--x`` may exist),
  ``list``/``Sequence`` gives ``nargs="+"``, ``int | None`` parses as ``int``;
- default ``None``: a flag the user did not give stays ``None``, so it never overrides the config
  file or the environment (``values_from_args`` drops it).

Per-field exceptions come from ``metadata["cli"]`` (a dict of ``add_argument`` keywords, plus
``flags``) on classes the caller owns, or from the ``overrides`` argument. The value itself is
validated once, where the config is built (``localcoder.config._coerce`` for ``Config``).
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Iterable, Literal


def add_dataclass_arguments(parser: Any, cls: type, fields: Iterable[str] | None = None, *,
                            exclude: Iterable[str] = (), overrides: dict[str, dict[str, Any]] | None = None
                            ) -> list[str]:
    """Add a flag per field of ``cls`` to ``parser`` (a parser or an argument group); returns the dests."""
    wanted = set(fields) if fields is not None else None
    skip = set(exclude)
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or (wanted is not None and f.name not in wanted):
            continue
        spec = {**f.metadata.get("cli", {}), **(overrides or {}).get(f.name, {})}
        flags = spec.pop("flags", None) or ("--" + f.name.replace("_", "-"),)
        kwargs = {**argument_kwargs(hints[f.name]), "default": None, "dest": f.name}
        text = spec.pop("help", None) or f.metadata.get("help") or comments.get(f.name) or f.name.replace("_", " ")
        kwargs["help"] = with_default(text, spec.pop("show_default", _default(f)))
        kwargs.update(spec)
        if kwargs.get("action") in ("store_true", "store_false"):
            kwargs.pop("type", None), kwargs.pop("choices", None), kwargs.pop("metavar", None)
        parser.add_argument(*flags, **kwargs)
        added.append(f.name)
    return added


def values_from_args(args: argparse.Namespace, cls: type, fields: Iterable[str] | None = None) -> dict[str, Any]:
    """The fields of ``cls`` the user gave on the command line (flags left at ``None`` are absent)."""
    names = set(fields) if fields is not None else None
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if (names is None or f.name in names) and getattr(args, f.name, None) is not None}


def argument_kwargs(typ: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a field annotation."""
    typ = _strip_none(typ)
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        return {"choices": choices, "type": type(choices[0])}
    if typ is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin in (list, tuple, collections.abc.Sequence):
        item = next((a for a in typing.get_args(typ) if a is not Ellipsis), str)
        return {"nargs": "+", "type": item}
    if typ in (int, float, str):
        return {"type": typ}
    return {}


def with_default(text: str, default: Any) -> str:
    """``text (default: X)``, escaped for argparse's %-formatting; no suffix for an empty default."""
    text = text.replace("%", "%%")
    if default in (None, "", (), []) or "default" in text:
        return text
    if isinstance(default, (list, tuple)):
        default = " ".join(map(str, default))
    return f"{text} (default: {str(default).replace('%', '%%')})"


def field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` after each field in the class source (where fields without metadata are documented)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.+)$", src, re.M)}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _strip_none(typ: Any) -> Any:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return typ

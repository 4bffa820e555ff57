"""Fill-in-the-middle prompt formats: one entry per model family, one registry.

Prompts are built as token ids, never as a string that is re-tokenized: the FIM markers are the
vocabulary's special-token ids and the user's text is tokenized with special-token parsing off,
so a file that contains ``<|fim_prefix|>`` cannot inject a marker.

Orders (Bavarian et al. 2022):
- PSM: <PRE> prefix <SUF> suffix <MID>      (every family)
- SPM: <SUF> suffix <PRE> prefix <MID>      (KV-cache friendly: typing at the cursor only appends
  to the prefix, which is last). Only families trained on it list it in ``trained_orders``; our
  own distilled students can be trained in SPM whatever the teacher knows.
- SPM v2 (``spm2``, StarCoder's form): <PRE> <SUF> suffix <MID> prefix   (append-only as well).
An order the model was not trained for collapses (the stock Qwen 0.5B in ``spm``: ES 0.41 vs 0.82 in
PSM), so ``resolve_order`` refuses it unless the model declares it (a layout adapter's registry entry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from localcoder.engines.base import Tokenizer
from localcoder.errors import InvalidRequest, NotFimCapable


@dataclass(frozen=True)
class Snippet:
    """Text from another file (neighbouring buffer, recently edited region, declaration)."""

    path: str
    text: str


@dataclass(frozen=True)
class FimFormat:
    name: str
    families: tuple[str, ...]
    prefix: str
    suffix: str
    middle: str
    stop: tuple[str, ...]  # special tokens that end a middle, besides the tokenizer's EOS
    trained_orders: tuple[str, ...] = ("psm",)
    repo_name: str | None = None  # token opening a repository name (multi-file context)
    file_sep: str | None = None  # token before each file's path
    # CodeLlama-style formats put a space before the prefix text and after <SUF>/<MID> markers.
    space_after_markers: bool = False
    default_repo: str = "repo"
    aliases: tuple[str, ...] = field(default=())

    # ---- building prompts -------------------------------------------------------------------
    def ids(self, tok: Tokenizer) -> dict[str, int]:
        """Ids of this format's markers in ``tok``; NotFimCapable if any is missing."""
        out: dict[str, int] = {}
        for role, text in (("prefix", self.prefix), ("suffix", self.suffix), ("middle", self.middle)):
            tid = special_id(tok, text)
            if tid is None:
                raise NotFimCapable(
                    f"the model's vocabulary has no {text!r} token: it cannot do fill-in-the-middle "
                    f"with the {self.name!r} format",
                    hint="pick a FIM-capable code model or another --fim-format",
                )
            out[role] = tid
        return out

    def stop_ids(self, tok: Tokenizer) -> frozenset[int]:
        ids = {special_id(tok, s) for s in self.stop}
        return frozenset(i for i in ids if i is not None) | tok.eos_token_ids

    def build(self, tok: Tokenizer, prefix_ids: Sequence[int], suffix_ids: Sequence[int], *,
              order: str = "psm", context_ids: Sequence[int] = ()) -> list[int]:
        """Assemble the prompt. ``context_ids`` (from ``context_prelude``) go first."""
        m = self.ids(tok)
        pre, suf, mid = [m["prefix"]], [m["suffix"]], [m["middle"]]
        if self.space_after_markers:
            pre = pre + tok.tokenize(" ")
        if order == "psm":
            body = pre + list(prefix_ids) + suf + list(suffix_ids) + mid
        elif order == "spm":
            body = suf + list(suffix_ids) + pre + list(prefix_ids) + mid
        elif order == "spm2":
            body = pre + suf + list(suffix_ids) + mid + list(prefix_ids)
        else:
            raise InvalidRequest(f"unknown FIM order {order!r} ({', '.join(ORDERS)})", param="fim_order")
        return list(context_ids) + body

    def split_psm(self, text: str) -> tuple[str, str] | None:
        """(prefix, suffix) of a prompt written as text with this format's PSM markers (what Continue
        sends with a model template); None when it is not exactly such a prompt."""
        if not (text.startswith(self.prefix) and text.endswith(self.middle) and text.count(self.suffix) == 1):
            return None
        prefix, suffix = text[len(self.prefix): -len(self.middle)].split(self.suffix)
        if any(m in prefix + suffix for m in (self.prefix, self.middle)):
            return None
        return prefix, suffix

    def context_prelude(self, tok: Tokenizer, snippets: Sequence[Snippet], path: str | None,
                        repo: str | None) -> list[int]:
        """Tokens for repository name, other files' snippets and the current file's path.

        Families with file-separator tokens use them (Qwen2.5-Coder, StarCoder2, CodeGemma);
        the others get the snippets as commented text at the top of the prefix.
        """
        if not snippets and not path:
            return []
        sep = tok.special_token_id(self.file_sep) if self.file_sep else None
        if sep is None:
            text = "".join(_commented(s.path, s.text) for s in snippets)
            return tok.tokenize(text) if text else []
        ids: list[int] = []
        repo_tok = tok.special_token_id(self.repo_name) if self.repo_name else None
        if repo_tok is not None:
            ids += [repo_tok] + tok.tokenize(f"{repo or self.default_repo}\n")
        for s in snippets:
            body = s.text if s.text.endswith("\n") else s.text + "\n"
            ids += [sep] + tok.tokenize(f"{s.path}\n{body}")
        ids += [sep] + tok.tokenize(f"{path or 'untitled'}\n")
        return ids


def special_id(tok: Tokenizer, text: str) -> int | None:
    """Special-token id, trying SentencePiece spellings (``▁<PRE>`` is `` <PRE>`` in GGUF vocabs)."""
    for variant in (text, " " + text[1:], text[1:]) if text.startswith("▁") else (text,):
        tid = tok.special_token_id(variant)
        if tid is not None:
            return tid
    return None


def _commented(path: str, text: str) -> str:
    hash_langs = (".py", ".sh", ".rb", ".pl", ".r", ".yaml", ".yml", ".toml", ".jl", ".nim")
    mark = "#" if path.lower().endswith(hash_langs) else "//"
    body = text if text.endswith("\n") else text + "\n"
    return f"{mark} {path}\n{body}\n"


ORDERS = ("psm", "spm", "spm2")

QWEN_STOPS = ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|fim_prefix|>",
              "<|fim_suffix|>", "<|fim_middle|>", "<|im_end|>")

FORMATS: dict[str, FimFormat] = {
    f.name: f
    for f in [
        FimFormat("qwen", ("qwen2.5-coder", "qwen3-coder"), "<|fim_prefix|>", "<|fim_suffix|>",
                  "<|fim_middle|>", QWEN_STOPS, ("psm",), "<|repo_name|>", "<|file_sep|>",
                  aliases=("qwen2.5-coder", "qwen-coder")),
        FimFormat("codegemma", ("codegemma",), "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
                  ("<|file_separator|>", "<eos>", "<end_of_turn>"), ("psm", "spm"), None,
                  "<|file_separator|>"),
        FimFormat("starcoder", ("starcoder", "starcoder2", "starcoderbase"), "<fim_prefix>",
                  "<fim_suffix>", "<fim_middle>", ("<|endoftext|>", "<file_sep>", "<fim_pad>"),
                  ("psm", "spm"), "<repo_name>", "<file_sep>", aliases=("starcoder2",)),
        FimFormat("santacoder", ("santacoder",), "<fim-prefix>", "<fim-suffix>", "<fim-middle>",
                  ("<|endoftext|>", "<fim-pad>"), ("psm",)),
        FimFormat("deepseek", ("deepseek-coder",), "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜fim▁hole｜>",
                  ("<|EOT|>", "<｜end▁of▁sentence｜>"), ("psm",), aliases=("deepseek-coder",)),
        FimFormat("codellama", ("codellama",), "▁<PRE>", "▁<SUF>", "▁<MID>", ("▁<EOT>",),
                  ("psm", "spm"), space_after_markers=True),
    ]
}

# DeepSeek's PSM is <begin> prefix <hole> suffix <end>: the "suffix" marker role is the hole and the
# "middle" role is <end>, which is how the table above lists them.
_ALIASES = {alias: f.name for f in FORMATS.values() for alias in f.aliases}
# Detection order: the most specific marker sets first (CodeGemma vs Qwen share FIM tokens).
_DETECT_ORDER = ["qwen", "codegemma", "starcoder", "santacoder", "deepseek", "codellama"]


def get_format(name: str) -> FimFormat:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise InvalidRequest(f"unknown FIM format {name!r}; known: {', '.join(FORMATS)}", param="fim_format")
    return FORMATS[key]


def detect_format(tok: Tokenizer) -> FimFormat:
    """The format whose markers all exist as special tokens in ``tok``."""
    for name in _DETECT_ORDER:
        f = FORMATS[name]
        if not all(special_id(tok, t) is not None for t in (f.prefix, f.suffix, f.middle)):
            continue
        if name == "qwen" and tok.special_token_id("<|repo_name|>") is None:
            continue  # CodeGemma shares the markers but has <|file_separator|>, not <|repo_name|>
        return f
    raise NotFimCapable(
        "the model has no fill-in-the-middle tokens (none of the known FIM formats match its vocabulary)",
        hint="use a FIM-trained code model such as Qwen2.5-Coder, StarCoder2, CodeLlama or DeepSeek-Coder",
    )


def resolve_order(fmt: FimFormat, requested: str, declared: Sequence[str] = ()) -> str:
    """The order to build prompts in: ``auto`` is the first order the model ``declared`` (a layout
    adapter taught it), else the format's first trained order; an explicit one must be trained for
    (the format's ``trained_orders``) or declared."""
    if requested in ("", "auto"):
        return declared[0] if declared and declared[0] in ORDERS else fmt.trained_orders[0]
    if requested not in ORDERS:
        raise InvalidRequest(f"fim_order must be {', '.join(ORDERS)} or auto, got {requested!r}", param="fim_order")
    if requested not in fmt.trained_orders and requested not in declared:
        raise InvalidRequest(
            f"fim_order {requested!r}: the model ({fmt.name} format) was trained for "
            f"{', '.join(fmt.trained_orders)} only; an untrained order collapses (stock Qwen 0.5B in spm: "
            f"ES 0.41 vs 0.82 in psm). Use psm/auto, or a model whose registry entry declares {requested!r} "
            f"(a layout adapter trained for it)", param="fim_order")
    return requested

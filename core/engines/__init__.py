"""Engine factory: pick a backend for a resolved model. Heavy libraries load inside each backend."""

from __future__ import annotations

from localcoder.config import ModelConfig
from localcoder.engines.base import CancelToken, Engine, GenerationRequest, Sampling, Timings, TokenStream
from localcoder.errors import InvalidRequest
from localcoder.models import ResolvedModel

ENGINES = ("llama", "torch", "onnx", "fake", "remote")
_DEFAULT_FOR_KIND = {"gguf": "llama", "hf": "torch", "onnx": "onnx", "fake": "fake"}


def engine_for_kind(kind: str, requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in ENGINES:
            raise InvalidRequest(f"unknown engine {requested!r}; choose from {', '.join(ENGINES)}", param="engine")
        return requested
    return _DEFAULT_FOR_KIND[kind]


def load_engine(model: ResolvedModel, cfg: ModelConfig | None = None) -> Engine:
    cfg = cfg or ModelConfig()
    name = engine_for_kind(model.kind, cfg.engine)
    if name == "remote":  # the model gives the tokenizer; a server elsewhere runs it
        from localcoder.engines.remote import RemoteEngine

        return RemoteEngine.from_config(model, cfg)
    if name == "fake" or model.kind == "fake":
        from localcoder.engines.fake import FakeEngine

        return FakeEngine()
    if name == "llama":
        if model.kind != "gguf":
            raise InvalidRequest(f"the llama engine needs a GGUF file; {model.name} is {model.kind}", param="engine")
        from localcoder.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine.from_config(model, cfg)  # slots, speculation and its draft model included
    if name == "torch":
        from localcoder.engines.torch import TorchEngine

        return TorchEngine.from_resolved(model, cfg)
    from localcoder.engines.onnx import OnnxEngine

    return OnnxEngine.from_resolved(model, cfg)


__all__ = ["CancelToken", "Engine", "GenerationRequest", "Sampling", "Timings", "TokenStream", "load_engine",
           "engine_for_kind", "ENGINES"]

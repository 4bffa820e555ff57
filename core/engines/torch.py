"""torch backend (transformers): CPU or CUDA, optional bitsandbytes 8-/4-bit on CUDA.

Keeps ``past_key_values`` between requests and crops it to the longest common token prefix, so a
request that extends the previous prompt evaluates only the new tokens. Also converts packaged
GGUF models to a cached safetensors directory once (transformers dequantizes GGUF in ~50 s; the
converted copy reloads in seconds).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from localcoder.config import ModelConfig
from localcoder.engines.base import GenerationRequest, Timings, TokenStream, check_request, run_tokens
from localcoder.engines.kvcache import PrefixCache
from localcoder.errors import BackendUnavailable, InvalidRequest, ModelCorrupt
from localcoder.models import BUILTIN, ResolvedModel, hf_cache_path, home


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendUnavailable("the torch engine needs torch and transformers",
                                 hint="pip install 'localcoder[torch]'") from exc
    return torch, transformers


# ---- GGUF -> safetensors, cached ----------------------------------------------------------------------
def converted_dir(model: ResolvedModel) -> Path:
    if model.name in BUILTIN:
        return hf_cache_path(model.name)
    assert model.path is not None
    st = model.path.stat()
    key = hashlib.sha256(f"{model.path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return home() / "converted" / f"{model.path.stem}-{key}"


def convert_gguf_to_hf(model: ResolvedModel, *, force: bool = False, tokenizer_only: bool = False) -> Path:
    """Dequantize a GGUF into an HF directory (fp32 safetensors + tokenizer); reuse it afterwards."""
    if model.kind != "gguf" or model.path is None:
        raise InvalidRequest(f"{model.name} is not a GGUF model", param="model")
    out = converted_dir(model)
    done = out / ("tokenizer_config.json" if tokenizer_only else "model.safetensors")
    if done.exists() and not force and (tokenizer_only or (out / "config.json").exists()):
        return out
    torch, transformers = _import_torch()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        gguf = dict(gguf_file=model.path.name)
        tok = transformers.AutoTokenizer.from_pretrained(str(model.path.parent), **gguf)
        restore_special_tokens(tok, model.path)
        tok.save_pretrained(str(tmp))
        if not tokenizer_only:
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(model.path.parent), dtype=torch.float32, **gguf)
            hf.hf_quantizer = None  # saving refuses GGUF-quantized models; the weights are dequantized
            if hasattr(hf.config, "quantization_config"):
                del hf.config.quantization_config
            hf.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="20GB")
        if out.exists():
            for item in tmp.iterdir():
                os.replace(item, out / item.name)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def restore_special_tokens(tok, gguf_path: Path) -> int:
    """transformers' GGUF tokenizer conversion keeps only BOS/EOS as special; the FIM markers and
    the other control / user-defined tokens would be tokenized as text. Re-add them (same ids)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken

    fields = GGUFReader(str(gguf_path)).fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    control, user_defined = 3, 4
    specials = [bytes(tokens.parts[tokens.data[i]]).decode("utf-8")
                for i, part in enumerate(types.data) if int(types.parts[part][0]) in (control, user_defined)]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    vocab = tok.get_vocab()
    missing = [t for t in specials if t not in vocab]
    if missing:
        raise ModelCorrupt(f"{gguf_path.name}: special tokens {missing[:3]} are not in the converted vocabulary")
    return len(specials)


# ---- tokenizer ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HFTokenizer:
    def __init__(self, tok) -> None:
        self.tok = tok
        self._added = {t.content: i for i, t in tok.added_tokens_decoder.items()}
        self._byte_level = "Ġ" in tok.get_vocab() or "Ċ" in tok.get_vocab()
        self.prompt_start: list[int] = (
            [tok.bos_token_id] if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None else [])
        eos = {tok.eos_token_id} | {self._added.get(t) for t in ("<|endoftext|>", "<|im_end|>", "<|EOT|>")}
        self._eos = frozenset(i for i in eos if i is not None)
        self.token_bytes = lru_cache(maxsize=None)(self._piece)

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        if not text:
            return []
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=not special)

    def _piece(self, token_id: int) -> bytes:
        piece = self.tok.convert_ids_to_tokens(token_id)
        if piece in self._added:
            return piece.encode("utf-8")
        if self._byte_level:
            dec = _byte_decoder()
            return bytes(dec[c] for c in piece if c in dec)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode("utf-8")

    def special_token_id(self, text: str) -> int | None:
        return self._added.get(text)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos


# ---- engine ---------------------------------------------------------------------------------------------------
def pick_device(requested: str) -> str:
    torch, _ = _import_torch()
    if requested in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda was asked for but torch sees no CUDA device")
    if requested not in ("cpu", "cuda"):
        raise InvalidRequest(f"device must be auto, cpu or cuda, got {requested!r}", param="device")
    return requested


def bnb_config(quantization: str, device: str):
    """bitsandbytes 8-bit / 4-bit (NF4) config for the CUDA path; a clear error elsewhere."""
    if quantization in ("", "none"):
        return None
    if quantization not in ("int8", "nf4"):
        raise InvalidRequest(f"quantization must be none, int8 or nf4, got {quantization!r}", param="quantization")
    if device != "cuda":
        raise BackendUnavailable(f"bitsandbytes {quantization} needs a CUDA GPU; this machine runs torch on {device}",
                                 hint="use the llama.cpp engine with a GGUF quantization on CPU")
    try:
        import bitsandbytes  # noqa: F401
        import torch
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise BackendUnavailable("bitsandbytes is not installed", hint="pip install 'localcoder[gpu]'") from exc
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


def _check_saved_quantization(path: Path, device: str) -> None:
    """A directory saved with a bitsandbytes config (``localcoder quantize --to bnb``) loads on CUDA only."""
    import json

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        return
    q = json.loads(cfg_file.read_text(encoding="utf-8")).get("quantization_config") or {}
    if q.get("quant_method") == "bitsandbytes" and device != "cuda":
        raise BackendUnavailable(f"{path} is saved with a bitsandbytes 8-/4-bit config, which needs a CUDA GPU",
                                 hint="serve the GGUF or ONNX export of this model on CPU")


class TorchEngine:
    name = "torch"

    def __init__(self, model_dir: str | os.PathLike, *, device: str = "auto", n_ctx: int = 4096, n_threads: int = 0,
                 n_batch: int = 512, quantization: str = "none", model_name: str | None = None, model=None,
                 tokenizer=None):
        torch, transformers = _import_torch()
        self.torch = torch
        if n_threads:
            torch.set_num_threads(n_threads)
        self.device = pick_device(device)
        path = Path(model_dir)
        try:
            tok = tokenizer or transformers.AutoTokenizer.from_pretrained(str(path))
            if model is None:
                _check_saved_quantization(path, self.device)
                qcfg = bnb_config(quantization, self.device)
                dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(path), dtype=dtype, quantization_config=qcfg,
                    device_map=self.device if qcfg is not None else None)
                if qcfg is None:
                    model.to(self.device)
        except (OSError, ValueError) as exc:
            raise ModelCorrupt(f"transformers could not load {path}: {exc}") from exc
        self.model = model.eval()
        self.tokenizer = HFTokenizer(tok)
        self.model_name = model_name or path.name
        from localcoder.models import hf_declared_orders

        self.declared_orders = hf_declared_orders(path)  # a distilled student's trained FIM order (localcoder.json)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.cache = PrefixCache()
        self.past = None

    @classmethod
    def from_resolved(cls, model: ResolvedModel, cfg: ModelConfig) -> "TorchEngine":
        path = convert_gguf_to_hf(model) if model.kind == "gguf" else model.path
        return cls(path, device=cfg.device, n_ctx=cfg.ctx, n_threads=cfg.threads, n_batch=cfg.batch,
                   quantization=cfg.quantization, model_name=model.name)

    def generate(self, request: GenerationRequest) -> TokenStream:
        check_request(request, self.n_ctx)
        return TokenStream(lambda timings: self._run(request, timings))

    def _forward(self, ids: list[int]):
        """Evaluate ``ids`` after the cached tokens; returns (V,) logits of the last position."""
        torch = self.torch
        from transformers import DynamicCache

        if self.past is None:
            self.past = DynamicCache()
        x = torch.tensor([ids], device=self.model.device)  # (1, T)
        out = self.model(input_ids=x, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.cache.extend(ids)
        return out.logits[0, -1].float().cpu().numpy()  # (V,)

    def _run(self, request: GenerationRequest, timings: Timings) -> Iterator[int]:
        keep = self.cache.plan(request.tokens) if request.cache_prompt else 0
        if self.past is not None:
            if keep == 0:
                self.past = None
            else:
                self.past.crop(keep)
        self.cache.truncate(keep)
        with self.torch.inference_mode():
            yield from run_tokens(request, timings, keep, self.n_batch, self._forward, self.reset_cache)

    def reset_cache(self) -> None:
        self.past = None
        self.cache.clear()

    def close(self) -> None:
        self.reset_cache()

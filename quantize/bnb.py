"""bitsandbytes 8-bit (LLM.int8) and 4-bit (NF4) configurations for the torch engine on CUDA.

bitsandbytes quantizes at load time on a CUDA GPU; what we ship is an HF model directory whose
``config.json`` carries the ``quantization_config`` (the standard transformers place), so
``localcoder serve --engine torch --device cuda`` (or ``from_pretrained``) loads it quantized.
Writing the configuration needs neither CUDA nor bitsandbytes; *using* it needs both, and on a
machine without them the user gets one clear message, not a stack trace.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from localcoder.errors import BackendUnavailable, InvalidRequest

BNB_TYPES = ("int8", "nf4")


def bnb_quantization_config(type: str) -> dict:
    """The ``quantization_config`` dict transformers' BitsAndBytesConfig serialises to (and the
    torch engine's own ``bnb_config`` uses: NF4 with double quantization and bf16 compute)."""
    if type == "int8":
        return {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
                "llm_int8_threshold": 6.0, "llm_int8_skip_modules": ["lm_head"]}
    if type == "nf4":
        return {"quant_method": "bitsandbytes", "load_in_8bit": False, "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "bfloat16", "llm_int8_skip_modules": ["lm_head"]}
    raise InvalidRequest(f"bitsandbytes type must be int8 or nf4, got {type!r}", param="type")


def cuda_status() -> str | None:
    """None when bitsandbytes can run here, else the reason why not (one sentence)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "bitsandbytes 8-bit/4-bit runs on CUDA GPUs only and torch sees no CUDA device on this machine"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (pip install 'localcoder[gpu]')"
    return None


def require_cuda() -> None:
    reason = cuda_status()
    if reason:
        raise BackendUnavailable(reason, hint="on CPU use a GGUF (llama.cpp) or ONNX int8/int4 export instead")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_bnb(model_dir: str | os.PathLike, out: str | os.PathLike, type: str) -> Path:
    """A copy of ``model_dir`` (weights hard-linked when possible) whose config.json asks
    transformers to load it with bitsandbytes ``type`` (int8 | nf4)."""
    qcfg = bnb_quantization_config(type)
    src, out = Path(model_dir), Path(out)
    if not (src / "config.json").exists():
        raise InvalidRequest(f"{src} is not an HF model directory", param="model")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            dst = out / f.name
            dst.unlink(missing_ok=True)
            _link_or_copy(f, dst)
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return out

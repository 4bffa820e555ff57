"""LoRA mode (``--lora-rank N``): train low-rank adapters (peft) on every attention and MLP projection
instead of the blocks themselves; the export merges them back into a plain HF model."""

from __future__ import annotations

from localcoder.quantize.gguf import LORA_TARGETS

TARGETS = list(LORA_TARGETS)
ALPHA_PER_RANK = 2  # lora_alpha = 2 x rank; llama.cpp and PEFT both scale the update by alpha / rank


def with_lora(model, rank: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        from localcoder.errors import BackendUnavailable

        raise BackendUnavailable("LoRA needs peft", hint="pip install 'localcoder[train]'") from exc
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=ALPHA_PER_RANK * rank, lora_dropout=0.0, target_modules=TARGETS))


def merged(model, rank: int):
    """The model to export: adapters merged into the base weights (LoRA mode), else the model itself."""
    return model.merge_and_unload() if rank else model


def adapter_path(setting: str, student: str):
    """The GGUF LoRA ``DistillConfig.init_adapter`` names: ``auto`` = the adapter shipped for ``student``."""
    from pathlib import Path

    from localcoder.errors import InvalidRequest, ModelNotFound
    from localcoder.models import shipped_adapter

    if setting == "auto":
        path = shipped_adapter(student)
        if path is None:
            raise InvalidRequest(f"no layout adapter ships for the student {student!r}; --init-adapter auto needs one",
                                 param="init_adapter", hint="pass a GGUF LoRA path, or --init-adapter '' to start from zero")
        return path
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ModelNotFound(f"--init-adapter {path} does not exist", hint="pass a GGUF LoRA written by localcoder distill")
    return path


def load_adapter(model, path, rank: int) -> int:
    """Copy a GGUF LoRA adapter's A/B matrices (as ``localcoder.quantize.gguf.write_lora_gguf`` wrote them)
    into the PEFT ``model``'s LoRA weights, so training continues from it. Every LoRA module must find
    its pair, of rank ``rank``; returns the number of modules loaded."""
    import gguf
    import numpy as np
    import torch

    from localcoder.errors import InvalidRequest, ModelCorrupt
    from localcoder.quantize.gguf import ARCHS

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ModelCorrupt(f"{path} is not a readable GGUF LoRA adapter: {exc}") from exc
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    cfg = model.config
    arch = next((ARCHS[a] for a in (cfg.architectures or []) if a in ARCHS), None)
    if arch != "qwen2":  # llama's export permutes q/k rows (write_lora_gguf); reading them back is not done
        raise InvalidRequest(f"--init-adapter supports Qwen2 students; this one is {cfg.architectures}",
                             param="init_adapter")
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    loaded = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
                continue
            hf = name.removeprefix("base_model.model.") + ".weight"
            gname = names.get_name(hf, try_suffixes=(".weight",))
            a, b = tensors.get(f"{gname}.lora_a"), tensors.get(f"{gname}.lora_b")
            if a is None or b is None:
                raise ModelCorrupt(f"{path} has no LoRA pair for {hf} ({gname}): made for another base model?")
            want_a, want_b = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, in), (out, r)
            if a.shape != tuple(want_a.shape) or b.shape != tuple(want_b.shape):
                raise InvalidRequest(f"{path}: {hf} has LoRA shapes {a.shape} / {b.shape}, the run wants "
                                     f"{tuple(want_a.shape)} / {tuple(want_b.shape)} (rank {rank})",
                                     param="init_adapter", hint="use the adapter's rank for --lora-rank")
            want_a.copy_(torch.from_numpy(a))
            want_b.copy_(torch.from_numpy(b))
            loaded += 1
    if not loaded:
        raise ModelCorrupt(f"{path}: no LoRA module of the student matched the adapter")
    return loaded

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

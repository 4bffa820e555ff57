"""The adapter a LoRA run leaves (``--preset layout``): its trained LoRA tensors, from the run's newest
checkpoint, written as a llama.cpp GGUF LoRA (``out/adapter.gguf``) with the metadata that serving reads:
``localcoder.fim_orders`` (the order it teaches; ``auto`` picks it), the base model and its sha256,
the teacher and its order, steps, data fingerprint.

Serve it with ``localcoder serve --adapter out/adapter.gguf`` (the base GGUF as ``--model``); the
packaged models' adapters ship in ``core/adapters/<model>.gguf`` and load by default (``--adapter auto``).
"""

from __future__ import annotations

import json
from pathlib import Path

from localcoder.distill.config import DistillConfig
from localcoder.distill.lora import ALPHA_PER_RANK as LORA_ALPHA_PER_RANK
from localcoder.errors import InvalidRequest, ModelCorrupt


def adapter_meta(cfg: DistillConfig, out: Path, steps: int) -> dict[str, str]:
    from localcoder.models import BUILTIN

    base = BUILTIN.get(cfg.student)
    prov = {}
    prov_file = out / "model" / "localcoder.json"
    if prov_file.exists():
        prov = json.loads(prov_file.read_text(encoding="utf-8"))
    return {"fim_orders": cfg.fim_order, "base_model": cfg.student, "base_sha256": base.sha256 if base else "",
            "teacher": cfg.teacher, "teacher_order": cfg.teacher_order, "lora_rank": str(cfg.lora_rank),
            "steps": str(steps), "preset": cfg.preset,
            "data_fingerprint": str(prov.get("data", {}).get("fingerprint", "")),
            "recipe": json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ("out", "cache_dir", "data")})}


def export_adapter(cfg: DistillConfig, out: str | Path, dest: str | Path | None = None, init_dir: Path | None = None):
    """Write the run's LoRA adapter (newest checkpoint) as a GGUF LoRA; returns the GgufResult. ``init_dir``:
    where the student's init config lives (default ``out/init``; a specialist's is its run's)."""
    import torch

    from localcoder.distill.checkpoint import CKPT_DIR
    from localcoder.quantize.gguf import write_lora_gguf

    out = Path(out)
    if cfg.lora_rank <= 0:
        raise InvalidRequest("only a LoRA run (--lora-rank > 0) has an adapter to export", param="lora_rank")
    root = out / CKPT_DIR
    latest = root / "latest"
    if not latest.exists():
        raise ModelCorrupt(f"{out} has no checkpoint to export the adapter from")
    ck = root / latest.read_text().strip()
    blob = torch.load(ck / "state.pt", map_location="cpu", weights_only=False)
    steps = json.loads((ck / "run.json").read_text())["step"]
    base_config = json.loads(((init_dir or out / "init") / "config.json").read_text(encoding="utf-8"))
    return write_lora_gguf(blob["model"], dest or out / "adapter.gguf", alpha=LORA_ALPHA_PER_RANK * cfg.lora_rank,
                           base_config=base_config, name=f"{cfg.student} layout adapter ({cfg.fim_order})",
                           meta=adapter_meta(cfg, out, steps))

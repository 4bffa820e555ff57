"""Student initialisation — never random.

(a) depth: keep N of the teacher's blocks chosen by measured importance on calibration code
    (``localcoder.quantize.prune.layer_importance``: 1 - cos(h_in, h_out)), or evenly spaced;
(b) width: drop attention heads / MLP channels by activation importance (``prune_width``);
(c) any HF model that shares the teacher's tokenizer (e.g. the 0.5B as the 1.5B's student).
Checks here: identical vocabularies, student no larger than its teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from localcoder.errors import InvalidRequest, ModelCorrupt


@dataclass
class StudentInit:
    method: str  # depth-importance | depth-uniform | width | given
    source: str
    layers_kept: list[int] = field(default_factory=list)
    importance: list[float] = field(default_factory=list)
    heads_keep: float = 1.0
    mlp_keep: float = 1.0


def load_causal_lm(path: str | Path, dtype=torch.float32):
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelCorrupt(f"could not load a causal LM from {path}: {exc}") from exc
    return model, tok


def n_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def count_params(model, *, blocks_only: bool = False) -> int:
    if not blocks_only:
        return sum(p.numel() for p in model.parameters())
    from localcoder.quantize.prune import decoder_layers

    return sum(p.numel() for p in decoder_layers(model).parameters())


def check_tokenizers(teacher_tok, student_tok) -> None:
    """Logit distillation needs the *same* vocabulary (ids and pieces) on both sides."""
    from localcoder.distill.fim_transform import tokenizer_hash

    a, b = tokenizer_hash(teacher_tok), tokenizer_hash(student_tok)
    if a != b:
        na, nb = len(teacher_tok.get_vocab()), len(student_tok.get_vocab())
        raise InvalidRequest(
            f"teacher and student tokenizers differ (vocabularies {na:,} vs {nb:,} entries, hashes {a} vs {b}): "
            "per-token logit distillation needs identical token ids",
            param="student", hint="pick a student of the same family, or use --student-layers to prune the teacher")


def check_not_larger(teacher, student) -> None:
    t, s = count_params(teacher, blocks_only=True), count_params(student, blocks_only=True)
    if s > t:
        raise InvalidRequest(
            f"the student ({s / 1e6:.0f}M block parameters, {n_layers(student)} layers) is larger than the teacher "
            f"({t / 1e6:.0f}M, {n_layers(teacher)} layers): distillation compresses, it does not grow a model",
            param="student", hint="swap --teacher and --student, or prune with --student-layers N")


def choose_layers(importance: Sequence[float], n_keep: int, selection: str) -> list[int]:
    from localcoder.quantize.prune import select_layers

    n = len(importance)
    if selection == "uniform":
        return sorted({round(i * (n - 1) / max(n_keep - 1, 1)) for i in range(n_keep)})
    if selection == "importance":
        return select_layers(importance, n_keep)
    raise InvalidRequest(f"layer selection must be importance or uniform, got {selection!r}", param="layer_selection")


def depth_pruned(teacher_dir: str | Path, n_keep: int, calib: torch.Tensor, *, selection: str = "importance",
                 heads_keep: float = 1.0, mlp_keep: float = 1.0, progress: bool = False):
    """A fresh copy of the teacher cut to ``n_keep`` blocks (then optionally narrowed). calib: (N, L) ids."""
    from localcoder.quantize.prune import layer_importance, prune_depth, prune_width

    model, tok = load_causal_lm(teacher_dir)
    total = n_layers(model)
    if not 1 <= n_keep <= total:
        raise InvalidRequest(f"--student-layers must be between 1 and the teacher's {total} layers, got {n_keep}",
                             param="student_layers")
    model.eval()
    imp = layer_importance(model, calib, progress=progress)
    keep = choose_layers(imp, n_keep, selection)
    prune_depth(model, keep)
    if heads_keep < 1.0 or mlp_keep < 1.0:
        prune_width(model, heads_keep, mlp_keep, calib, progress=progress)
    method = f"depth-{selection}" + ("+width" if heads_keep < 1.0 or mlp_keep < 1.0 else "")
    return model, tok, StudentInit(method, str(teacher_dir), keep, [round(x, 5) for x in imp], heads_keep, mlp_keep)


def given_student(path: str | Path):
    model, tok = load_causal_lm(path)
    return model, tok, StudentInit("given", str(path), list(range(n_layers(model))))


def freeze_embeddings(model) -> int:
    """Freeze input embeddings and the output head (V x H each: most of a small student's weights and
    the slowest part of its backward pass); returns how many parameters stay trainable."""
    for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
        if mod is not None:
            for p in mod.parameters():
                p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

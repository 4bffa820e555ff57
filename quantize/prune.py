"""Structured pruning (depth: whole blocks; width: attention heads and MLP channels) and
unstructured magnitude sparsity, for the decoder-only families we support (qwen2, llama/mistral,
starcoder2: any HF model with ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and an MLP with
``gate_proj/up_proj/down_proj`` or ``c_fc/c_proj``).

Everything here edits a transformers model *in place* and keeps its config consistent, so the result
saves with ``save_pretrained`` and reloads as an ordinary (smaller) model that ``localcoder distill``
can heal. Importance is measured on calibration code (token ids), never on weights alone:

- depth: importance of block i = 1 - mean cos(h_in, h_out) over calibration tokens (a block that
  barely turns the residual stream matters least; ShortGPT / Minitron "block importance");
- width: importance of an attention head = mean L2 norm of its output (the slice of ``o_proj``'s
  input that belongs to it); of an MLP channel = mean |activation| entering ``down_proj``.

Public API (also used by ``localcoder.distill`` for its pruned student initialisation)::

    imp = layer_importance(model, calib_ids)          # list[float], one per block
    keep = select_layers(imp, n_keep)                 # sorted block indices
    prune_depth(model, keep)
    prune_width(model, heads_keep_ratio=0.75, mlp_keep_ratio=0.5, calib=calib_ids)
    report = magnitude_sparsify(model, 0.5)           # zeros only: dense formats do not shrink
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

CalibIds = torch.Tensor | Sequence[Sequence[int]]


# ---- model anatomy ----------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of an HF causal LM (``model.model.layers``)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers ModuleList; pruning supports "
                        "qwen2 / llama / mistral / starcoder2-style decoders")
    return layers


def _mlp_linears(mlp: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    """(linears whose *output* rows are MLP channels, the linear whose *input* columns are channels)."""
    if hasattr(mlp, "gate_proj"):
        return [mlp.gate_proj, mlp.up_proj], mlp.down_proj
    if hasattr(mlp, "c_fc"):
        return [mlp.c_fc], mlp.c_proj
    raise TypeError(f"unsupported MLP {type(mlp).__name__}: expected gate/up/down_proj or c_fc/c_proj")


def _as_batches(calib: CalibIds, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield (B, T) long tensors; ragged lists are fed one sequence at a time (no padding noise)."""
    if isinstance(calib, torch.Tensor):
        ids = calib if calib.dim() == 2 else calib[None]
        for i in range(0, ids.shape[0], batch_size):
            yield ids[i: i + batch_size].long()
        return
    seqs = [list(s) for s in calib if len(s) > 0]
    same = len({len(s) for s in seqs}) == 1
    step = batch_size if same else 1
    for i in range(0, len(seqs), step):
        yield torch.tensor(seqs[i: i + step], dtype=torch.long)


def _first_tensor(x) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _progress(it, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(it, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# ---- depth -------------------------------------------------------------------------------------------------
@torch.inference_mode()
def layer_importance(model: nn.Module, calib_ids: CalibIds, *, batch_size: int = 4,
                     progress: bool = False) -> list[float]:
    """Importance of each block: 1 - mean cosine(h_in, h_out) over all calibration tokens.

    calib_ids: (N, T) tensor or N lists of token ids. Returns one float per block (higher = keep).
    """
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_mod, args, kwargs):
            inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, H)
        return hook

    def post(i):
        def hook(_mod, _args, _kwargs, output):
            h_in, h_out = inputs.pop(i).float(), _first_tensor(output).float()  # (B, T, H)
            sums[i] += float((1.0 - nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum())
        return hook

    handles = [h for i, layer in enumerate(layers)
               for h in (layer.register_forward_pre_hook(pre(i), with_kwargs=True),
                         layer.register_forward_hook(post(i), with_kwargs=True))]
    device = next(model.parameters()).device
    with _hooks(handles):
        for ids in _progress(list(_as_batches(calib_ids, batch_size)), "layer importance", progress):
            model(input_ids=ids.to(device), use_cache=False)
            count += ids.numel()
    if count == 0:
        raise ValueError("layer_importance needs at least one calibration token")
    return [s / count for s in sums]


def select_layers(importance: Sequence[float], n_keep: int, *, protect: Sequence[int] = (0, -1)) -> list[int]:
    """The ``n_keep`` most important block indices (sorted), always including ``protect``
    (by default the first and the last block: the embedding interface and the head interface)."""
    n = len(importance)
    if not 1 <= n_keep <= n:
        raise ValueError(f"n_keep must be in 1..{n}, got {n_keep}")
    forced = sorted({p % n for p in protect})[:n_keep]
    rest = sorted((i for i in range(n) if i not in forced), key=lambda i: importance[i], reverse=True)
    return sorted(forced + rest[: n_keep - len(forced)])


def prune_depth(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only blocks ``keep`` (in their order); renumber ``layer_idx`` and fix the config."""
    layers = decoder_layers(model)
    keep = sorted(set(int(i) for i in keep))
    if not keep or keep[0] < 0 or keep[-1] >= len(layers):
        raise ValueError(f"keep must be non-empty indices in 0..{len(layers) - 1}, got {keep}")
    cfg = model.config
    kept = [layers[i] for i in keep]
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx  # KV cache slot
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    base = getattr(model, "model", model)
    base.layers = nn.ModuleList(kept)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    if hasattr(cfg, "max_window_layers"):
        cfg.max_window_layers = min(cfg.max_window_layers, len(keep))
    cfg.num_hidden_layers = len(keep)
    return model


# ---- width -------------------------------------------------------------------------------------------------
@dataclass
class WidthImportance:
    heads: list[torch.Tensor]  # per block: (n_heads,) mean L2 norm of each head's output
    channels: list[torch.Tensor]  # per block: (intermediate,) mean |activation| entering the down projection


@torch.inference_mode()
def width_importance(model: nn.Module, calib_ids: CalibIds, *, batch_size: int = 4,
                     progress: bool = False) -> WidthImportance:
    layers = decoder_layers(model)
    head_dim = _head_dim(model)
    heads: list[torch.Tensor | float] = [0.0] * len(layers)
    chans: list[torch.Tensor | float] = [0.0] * len(layers)
    count = 0

    def on_o_proj(i):
        def hook(_mod, args):
            x = args[0].float()  # (B, T, n_heads * head_dim)
            per_head = x.reshape(*x.shape[:-1], -1, head_dim).norm(dim=-1)  # (B, T, n_heads)
            heads[i] = heads[i] + per_head.sum(dim=(0, 1)).cpu()
        return hook

    def on_down(i):
        def hook(_mod, args):
            chans[i] = chans[i] + args[0].float().abs().sum(dim=(0, 1)).cpu()  # (I,)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        handles.append(_mlp_linears(layer.mlp)[1].register_forward_pre_hook(on_down(i)))
    device = next(model.parameters()).device
    with _hooks(handles):
        for ids in _progress(list(_as_batches(calib_ids, batch_size)), "width importance", progress):
            model(input_ids=ids.to(device), use_cache=False)
            count += ids.numel()
    if count == 0:
        raise ValueError("width_importance needs at least one calibration token")
    return WidthImportance([h / count for h in heads], [c / count for c in chans])


def _head_dim(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _keep_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    """Keep output features ``rows`` of ``lin`` (weight (out, in), bias (out,))."""
    lin.weight = nn.Parameter(lin.weight.data[rows].clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data[rows].clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features = int(rows.numel())


def _keep_cols(lin: nn.Linear, cols: torch.Tensor) -> None:
    """Keep input features ``cols`` of ``lin`` (weight (out, in)); the bias is untouched."""
    lin.weight = nn.Parameter(lin.weight.data[:, cols].clone(), requires_grad=lin.weight.requires_grad)
    lin.in_features = int(cols.numel())


def _heads_to_keep(score: torch.Tensor, n_kv: int, per_group: int) -> torch.Tensor:
    """Query heads to keep: the ``per_group`` best of each KV group (GQA groups stay intact and equal).

    score: (n_heads,) with heads of group g at [g * group_size, (g + 1) * group_size).
    """
    group_size = score.numel() // n_kv
    kept = []
    for g in range(n_kv):
        s = score[g * group_size: (g + 1) * group_size]
        best = torch.topk(s, per_group).indices.sort().values + g * group_size
        kept.append(best)
    return torch.cat(kept)


def _prune_heads(attn: nn.Module, heads: torch.Tensor, head_dim: int) -> None:
    rows = (heads[:, None] * head_dim + torch.arange(head_dim)[None]).reshape(-1)  # (kept * head_dim,)
    _keep_rows(attn.q_proj, rows)
    _keep_cols(attn.o_proj, rows)


def _prune_channels(mlp: nn.Module, channels: torch.Tensor) -> None:
    ups, down = _mlp_linears(mlp)
    for lin in ups:
        _keep_rows(lin, channels)
    _keep_cols(down, channels)


def prune_width(model: nn.Module, heads_keep_ratio: float = 1.0, mlp_keep_ratio: float = 1.0,
                calib: CalibIds | WidthImportance | None = None, *, progress: bool = False) -> nn.Module:
    """Remove the least important query heads and MLP channels of every block.

    Query heads are removed per KV group (the same number from each group, so grouped-query
    attention stays regular and the KV cache keeps its shape); head_dim is pinned in the config so
    ``hidden_size / num_attention_heads`` no longer has to hold. Every block keeps the same counts
    (HF configs are uniform) but chooses *which* heads/channels by its own importance.
    """
    for name, r in (("heads_keep_ratio", heads_keep_ratio), ("mlp_keep_ratio", mlp_keep_ratio)):
        if not 0.0 < r <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {r}")
    if heads_keep_ratio == 1.0 and mlp_keep_ratio == 1.0:
        return model
    if calib is None:
        raise ValueError("width pruning needs calibration ids (or a WidthImportance)")
    imp = calib if isinstance(calib, WidthImportance) else width_importance(model, calib, progress=progress)
    cfg = model.config
    head_dim = _head_dim(model)
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    per_group = max(1, round(n_heads // n_kv * heads_keep_ratio))
    n_chan = max(1, round(cfg.intermediate_size * mlp_keep_ratio))
    for i, layer in enumerate(decoder_layers(model)):
        if per_group * n_kv < n_heads:
            _prune_heads(layer.self_attn, _heads_to_keep(imp.heads[i], n_kv, per_group), head_dim)
            layer.self_attn.num_key_value_groups = per_group
            if hasattr(layer.self_attn, "num_heads"):
                layer.self_attn.num_heads = per_group * n_kv
        if n_chan < cfg.intermediate_size:
            _prune_channels(layer.mlp, torch.topk(imp.channels[i], n_chan).indices.sort().values)
    cfg.head_dim = head_dim
    cfg.num_attention_heads = per_group * n_kv
    cfg.intermediate_size = n_chan
    return model


# ---- unstructured sparsity -------------------------------------------------------------------------------
@dataclass
class SparsityReport:
    target: float  # requested fraction of zeros in the pruned matrices
    achieved: float  # measured fraction of zeros in those matrices
    pruned_params: int  # weights in the matrices that were sparsified
    total_params: int  # all parameters of the model
    dense_bytes: int  # bytes of the model as stored densely (unchanged by sparsity)
    zlib_bytes_before: int  # compressed size of the pruned matrices (fp16) before/after: the only
    zlib_bytes_after: int  # size win a dense format can get, and only on disk/in transit
    note: str = ("unstructured zeros do not shrink dense GGUF/ONNX/safetensors files nor speed up their "
                 "dense matmul kernels; they only compress better. Use structured pruning for speed.")

    def to_dict(self) -> dict:
        return asdict(self)


def _zlib_size(weights: list[torch.Tensor]) -> int:
    import zlib

    return sum(len(zlib.compress(w.detach().to(torch.float16).numpy().tobytes(), 1)) for w in weights)


@torch.no_grad()
def magnitude_sparsify(model: nn.Module, sparsity: float, *, measure_compression: bool = True) -> SparsityReport:
    """Zero the ``sparsity`` fraction of smallest-|w| weights in every block linear (per matrix);
    embeddings, norms and the output head are left alone. Reports what actually changes."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    mats = [m.weight for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear)]
    before = _zlib_size(mats) if measure_compression else 0
    for w in mats:
        k = int(math.floor(sparsity * w.numel()))
        if k == 0:
            continue
        thresh = w.abs().flatten().kthvalue(k).values
        w.masked_fill_(w.abs() <= thresh, 0.0)
    zeros = sum(int((w == 0).sum()) for w in mats)
    pruned = sum(w.numel() for w in mats)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    return SparsityReport(
        target=sparsity, achieved=zeros / max(pruned, 1), pruned_params=pruned,
        total_params=sum(p.numel() for p in model.parameters()), dense_bytes=dense,
        zlib_bytes_before=before, zlib_bytes_after=_zlib_size(mats) if measure_compression else 0)


# ---- one-call plan (CLI --prune) ---------------------------------------------------------------------------
@dataclass
class PrunePlan:
    """What ``--prune`` asks for. ``layers``: blocks to keep (count) or 0 = all."""

    layers: int = 0
    heads: float = 1.0
    mlp: float = 1.0
    sparsity: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> "PrunePlan":
        """``layers=12,heads=0.75,mlp=0.5,sparsity=0.5`` (any subset; ``layers`` may be a fraction)."""
        plan = cls()
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, value = part.partition("=")
            if key not in ("layers", "heads", "mlp", "sparsity") or not value:
                raise ValueError(f"bad --prune item {part!r}; use layers=N|FRACTION, heads=R, mlp=R, sparsity=S")
            setattr(plan, key, float(value))
        return plan

    def n_layers(self, total: int) -> int:
        if self.layers <= 0:
            return total
        return max(1, round(self.layers * total)) if self.layers < 1 else min(total, int(self.layers))


@dataclass
class PruneResult:
    layers_before: int
    layers_kept: list[int]
    importance: list[float]
    params_before: int
    params_after: int
    sparsity: SparsityReport | None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = self.sparsity.to_dict() if self.sparsity else None
        return d


def apply_plan(model: nn.Module, plan: PrunePlan, calib: CalibIds, *, progress: bool = True) -> PruneResult:
    """Depth first (importance measured on the full model), then width, then sparsity."""
    n_before = len(decoder_layers(model))
    params_before = sum(p.numel() for p in model.parameters())
    imp = layer_importance(model, calib, progress=progress)
    keep = select_layers(imp, plan.n_layers(n_before))
    if len(keep) < n_before:
        prune_depth(model, keep)
    prune_width(model, plan.heads, plan.mlp, calib, progress=progress)
    sparse = magnitude_sparsify(model, plan.sparsity) if plan.sparsity > 0 else None
    return PruneResult(n_before, keep, imp, params_before, sum(p.numel() for p in model.parameters()), sparse)

"""Where the teacher's targets come from.

- online: the teacher runs beside the student every step (full-vocabulary targets; ~2x the cost of a
  step on a CPU);
- cached top-k: the teacher runs once over the rows training will read and stores, per position,
  its top-k logits, their ids and the logsumexp of all logits (exact top-k probabilities + a "rest"
  bucket, see ``losses.sparse_pair``). Memory-mapped files, reused across epochs and across runs
  (CE / KD / other students share them), filled in any order and resumable (a ``done`` flag per row);
- sequence-level KD (Kim & Rush 2016): the teacher writes the middles (``teacher_middles``);
- on-policy (GKD): the student samples middles, the teacher scores them (``onpolicy_rows``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from localcoder.errors import ModelCorrupt


class TopKCache:
    """vals (N, L, K) float16 · idx (N, L, K) int32 · lse (N, L) float32 · done (N,) uint8, as .npy memmaps."""

    def __init__(self, root: Path, n_rows: int, seq_len: int, k: int):
        self.root, self.k = Path(root), k
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"n_rows": n_rows, "seq_len": seq_len, "k": k}
        meta_file = self.root / "meta.json"
        if meta_file.exists() and json.loads(meta_file.read_text()) != meta:
            raise ModelCorrupt(f"teacher cache {self.root} was built for {meta_file.read_text()}, not {meta}",
                               hint="delete the directory to rebuild it")
        shapes = {"vals": ((n_rows, seq_len, k), np.float16), "idx": ((n_rows, seq_len, k), np.int32),
                  "lse": ((n_rows, seq_len), np.float32), "done": ((n_rows,), np.uint8)}
        self.arrays = {name: self._open(name, shape, dtype) for name, (shape, dtype) in shapes.items()}
        if not meta_file.exists():
            meta_file.write_text(json.dumps(meta))

    def _open(self, name: str, shape, dtype) -> np.ndarray:
        path = self.root / f"{name}.npy"
        if path.exists():
            arr = np.load(path, mmap_mode="r+")
            if arr.shape != shape or arr.dtype != dtype:
                raise ModelCorrupt(f"teacher cache file {path} has shape {arr.shape}, expected {shape}",
                                   hint="delete the teacher cache directory to rebuild it")
            return arr
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def missing(self, rows: Sequence[int]) -> list[int]:
        done = self.arrays["done"]
        return sorted({int(r) for r in rows if not done[int(r)]})

    @torch.inference_mode()
    def fill(self, teacher, teacher_ids: np.ndarray, rows: Sequence[int], *, batch_size: int = 4,
             progress: bool = True, desc: str = "teacher top-k", lockstep: bool = False, write: bool = True,
             autocast=contextlib.nullcontext) -> int:
        """Run the teacher over the rows not yet stored; returns how many rows were computed.
        ``lockstep`` (a sharded FSDP teacher: every rank must run the same forwards): ``rows`` is the agreed
        to-do list, computed as given; only the ranks with ``write`` store the results."""
        from tqdm import tqdm

        todo = list(rows) if lockstep else self.missing(rows)
        device = next(teacher.parameters()).device
        with tqdm(total=len(todo), desc=desc, unit="row", disable=not progress, dynamic_ncols=True) as bar:
            for i in range(0, len(todo), batch_size):
                chunk = todo[i: i + batch_size]
                ids = torch.as_tensor(teacher_ids[chunk], device=device).long()  # (b, L)
                with autocast():
                    logits = teacher(input_ids=ids, use_cache=False).logits.float()  # (b, L, V)
                if not write:  # a lockstep rank: its forward is needed for the shard gathers, not its output
                    bar.update(len(chunk))
                    continue
                vals, idx = logits.topk(self.k, dim=-1)  # (b, L, K)
                lse = torch.logsumexp(logits, -1)  # (b, L)
                self.arrays["vals"][chunk] = vals.cpu().numpy().astype(np.float16)
                self.arrays["idx"][chunk] = idx.cpu().numpy().astype(np.int32)
                self.arrays["lse"][chunk] = lse.cpu().numpy()
                for name in ("vals", "idx", "lse"):
                    self.arrays[name].flush()
                self.arrays["done"][chunk] = 1  # only after the data is on disk
                self.arrays["done"].flush()
                bar.update(len(chunk))
        return len(todo)

    def get(self, rows: Sequence[int], t_index: torch.Tensor):
        """Targets aligned to student positions. t_index (B, L) -> vals, idx (B, L, K), lse (B, L)."""
        missing = self.missing(rows)
        if missing:
            raise ModelCorrupt(f"teacher cache lacks rows {missing[:5]}: it was not filled for this schedule")
        r = np.asarray(rows)
        g = t_index.long()
        vals = torch.from_numpy(np.ascontiguousarray(self.arrays["vals"][r])).gather(
            1, g[..., None].expand(-1, -1, self.k))
        idx = torch.from_numpy(np.ascontiguousarray(self.arrays["idx"][r])).gather(
            1, g[..., None].expand(-1, -1, self.k))
        lse = torch.from_numpy(np.ascontiguousarray(self.arrays["lse"][r])).gather(1, g)
        return vals, idx, lse


@torch.inference_mode()
def online_logits(teacher, teacher_ids: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
    """teacher_ids (B, L), t_index (B, L) -> teacher logits aligned to student positions (B, L, V)."""
    logits = teacher(input_ids=teacher_ids, use_cache=False).logits  # (B, L, V)
    return logits.gather(1, t_index.long()[..., None].expand(-1, -1, logits.shape[-1]))


# ---- sequence-level KD -----------------------------------------------------------------------------------------
@torch.inference_mode()
def teacher_middles(teacher, tok, fmt, triples: Sequence[tuple[str, str, str]], *, order: str = "psm",
                    max_new: int = 64) -> list[str]:
    """The teacher's greedy middle for each (prefix, middle, suffix): the sequence-KD target text."""
    stop = fmt.stop_ids(tok)
    device = next(teacher.parameters()).device
    out = []
    for prefix, middle, suffix in triples:
        prompt = fmt.build(tok, tok.tokenize(prefix), tok.tokenize(suffix), order=order)
        ids = torch.tensor([prompt], device=device)
        limit = min(max_new, len(tok.tokenize(middle)) + 16)
        gen = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit,
                               do_sample=False, eos_token_id=sorted(stop), pad_token_id=sorted(stop)[0])
        new = [t for t in gen[0, len(prompt):].tolist() if t not in stop]
        out.append(b"".join(tok.token_bytes(t) for t in new).decode("utf-8", errors="replace"))
    return out


# ---- on-policy (GKD) ---------------------------------------------------------------------------------------------
@torch.no_grad()
def onpolicy_rows(student, student_ids: torch.Tensor, middle_id: int, pad_id: int, *, new_tokens: int = 16,
                  temperature: float = 1.0, generator: torch.Generator | None = None):
    """Replace each row's first FIM middle by a student sample (teacher and student order must match).

    student_ids (B, L) -> (ids (B, L'), mask (B, L')) where mask marks the sampled positions'
    predecessors (the positions whose next-token distribution the divergence compares)."""
    rows, masks = [], []
    for row in student_ids.tolist():
        if middle_id not in row:
            continue
        cut = row.index(middle_id) + 1
        ids = torch.tensor([row[:cut]], device=student_ids.device)
        for _ in range(new_tokens):  # ancestral sampling, no KV cache needed for 16 tokens
            logits = student(input_ids=ids, use_cache=False).logits[0, -1].float() / max(temperature, 1e-5)
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            ids = torch.cat([ids, nxt[None]], 1)
        rows.append(ids[0])
        m = torch.zeros(ids.shape[1], dtype=torch.uint8)
        m[cut - 1: ids.shape[1] - 1] = 1
        masks.append(m)
    if not rows:
        return None, None
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.uint8)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : r.numel()] = r
        mask[i, : m.numel()] = m
    return ids, mask


def cache_dir_for(base: Path, teacher_name: str, data_key: str, k: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in teacher_name)
    return Path(base) / f"teacher-{safe}-{data_key}-k{k}"

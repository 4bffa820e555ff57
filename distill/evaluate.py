"""Measurements a distillation run needs in-process, on a torch model (no engine round trip):

- token_metrics: CE on the real tokens, KL(teacher || student) and top-1 agreement with the teacher,
  over packed rows (cheap: one forward per row batch);
- fim_generate: batched greedy infilling of FimCases (left padding), cut like single-line serving
  (first newline) or at a blank line for multi-line, scored with localcoder.eval.metrics EM/ES;
- speed: prefill and decode tokens/s of a model (batch 1, KV cache), for the teacher-vs-student table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from localcoder.distill.losses import dense_pair, forward_kl_sum, sparse_pair


@torch.inference_mode()
def token_metrics(student, rows, *, teacher=None, cache=None, row_ids=None, batch_size: int = 4,
                  positions: str = "all") -> dict[str, float]:
    """rows: fim_transform.Packed. Teacher targets from ``teacher`` (online) or ``cache`` (TopKCache with
    ``row_ids``); without either only CE is reported."""
    device = next(student.parameters()).device
    ce_sum = kl_sum = agree = count = 0.0
    for i in range(0, len(rows), batch_size):
        b = rows.rows(slice(i, i + batch_size))
        s_ids = torch.as_tensor(b.student_ids, device=device).long()  # (B, L)
        mask = torch.as_tensor(b.loss_mask if positions == "all" else b.mid_mask, device=device).float()
        mask[:, -1] = 0
        t_index = torch.as_tensor(b.t_index, device=device).long()
        logits = student(input_ids=s_ids, use_cache=False).logits.float()  # (B, L, V)
        targets = torch.roll(s_ids, -1, 1)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        ce_sum += float((nll * mask).sum())
        count += float(mask.sum())
        if teacher is not None:
            t_logits = teacher(input_ids=torch.as_tensor(b.teacher_ids, device=device).long(), use_cache=False).logits
            t_logits = t_logits.float().gather(1, t_index[..., None].expand(-1, -1, t_logits.shape[-1]))
            s_lp, t_lp = dense_pair(logits, t_logits)
            kl_sum += float(forward_kl_sum(s_lp, t_lp, mask))
            agree += float(((logits.argmax(-1) == t_logits.argmax(-1)).float() * mask).sum())
        elif cache is not None:
            ids = row_ids[i: i + batch_size]
            vals, idx, lse = (x.to(device) for x in cache.get(ids, t_index.cpu()))
            s_lp, t_lp = sparse_pair(logits, vals, idx, lse)
            kl_sum += float(forward_kl_sum(s_lp, t_lp, mask))
            agree += float(((logits.argmax(-1) == idx[..., 0].long()).float() * mask).sum())
    out = {"ce": ce_sum / max(count, 1), "tokens": int(count)}
    if teacher is not None or cache is not None:
        out |= {"kl": kl_sum / max(count, 1), "top1_agree": agree / max(count, 1)}
    return out


def _cut(text: str, mode: str) -> str:
    if mode == "single":
        return text.split("\n", 1)[0] + ("\n" if "\n" in text else "")
    end = text.find("\n\n")
    return text if end < 0 else text[: end + 1]


def _newline_mask(tok, vocab_size: int) -> torch.Tensor:
    """(V,) bool: the token's bytes contain a newline."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tok.tok))):
        mask[i] = b"\n" in tok.token_bytes(i)
    return mask


def _newline_stop(mask: torch.Tensor, start: int):
    """A StoppingCriteria that ends a row once it has produced a newline (single-line cases are cut at the
    first newline anyway; stopping there saves the remaining batched decode steps)."""
    from transformers import StoppingCriteria

    class NewlineStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # -> (B,) bool: this row is done
            return mask[input_ids[:, start:].cpu()].any(-1).to(input_ids.device)

    return NewlineStop()


@dataclass
class FimResult:
    texts: list[str]
    em: list[float]
    es: list[float]
    seconds: float


@torch.inference_mode()
def fim_generate(model, tok, fmt, cases: Sequence, *, order: str = "psm", max_prefix_tokens: int = 192,
                 max_suffix_tokens: int = 64, max_new: int = 24, batch_size: int = 8) -> FimResult:
    """Greedy FIM completions for ``cases`` (FimCase: prefix, suffix, reference, mode); tok: HFTokenizer."""
    from localcoder.eval.metrics import edit_similarity, exact_match

    device = next(model.parameters()).device
    stop = fmt.stop_ids(tok)
    pad = sorted(stop)[0]
    t0 = time.perf_counter()
    texts: list[str] = []
    nl_mask = _newline_mask(tok, model.config.vocab_size) if any(c.mode == "single" for c in cases) else None
    for i in range(0, len(cases), batch_size):
        batch = cases[i: i + batch_size]
        prompts = [fmt.build(tok, tok.tokenize(c.prefix)[-max_prefix_tokens:],
                             tok.tokenize(c.suffix)[:max_suffix_tokens], order=order) for c in batch]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding: every prompt ends at the same column
            ids[r, width - len(p):] = torch.tensor(p)
            attn[r, width - len(p):] = 1
        extra = {}
        if all(c.mode == "single" for c in batch):
            extra["stopping_criteria"] = [_newline_stop(nl_mask, width)]
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=sorted(stop), pad_token_id=pad, **extra)
        for r, c in enumerate(batch):
            new = []
            for t in gen[r, width:].tolist():
                if t in stop:
                    break
                new.append(t)
            raw = b"".join(tok.token_bytes(t) for t in new).decode("utf-8", errors="replace")
            texts.append(_cut(raw, c.mode))
    refs = [c.reference for c in cases]
    return FimResult(texts, [exact_match(t, r) for t, r in zip(texts, refs)],
                     [edit_similarity(t, r) for t, r in zip(texts, refs)], time.perf_counter() - t0)


@torch.inference_mode()
def speed(model, *, prompt_len: int = 256, decode: int = 32, vocab: int = 1000, repeats: int = 1) -> dict[str, float]:
    """Prefill and decode tokens/s at batch 1 with a KV cache (random ids; speed does not depend on them)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)
    best_p = best_d = float("inf")
    for _ in range(repeats):
        past = DynamicCache()
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(decode):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
    return {"prefill_tok_s": prompt_len / best_p, "decode_tok_s": decode / best_d}

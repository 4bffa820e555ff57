"""HF model directory -> GGUF, written from Python with the ``gguf`` package; K-quants via llama.cpp.

Families: qwen2, llama (incl. mistral-style configs) and starcoder2, with a GPT-2-style byte-level
BPE tokenizer (Qwen, StarCoder, DeepSeek-Coder, Llama 3). The file carries everything the llama.cpp
engine and llama.vim need: weights, hyper-parameters, the full vocabulary with token types (special
and FIM tokens as CONTROL, so they are never produced from plain text), merges, BOS/EOS/PAD ids,
the explicit FIM token ids, the chat template, and provenance metadata.

Types written directly: F32, F16, BF16, Q8_0 (numpy quantizers of gguf-py). K-quants (Q4_K_M,
Q5_K_M, Q6_K, ...) are produced from an F16 intermediate by llama.cpp's own quantizer
(``llama_cpp.llama_model_quantize``): gguf-py has no K-quant encoder.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localcoder.errors import InvalidRequest, ModelCorrupt

PY_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by gguf-py
K_TYPES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q4_0", "q5_0", "q3_k_m", "q2_k")  # by llama.cpp
GGUF_TYPES = PY_TYPES + K_TYPES

ARCHS = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
         "Starcoder2ForCausalLM": "starcoder2"}

# FIM spellings per tokenizer family -> GGUF keys (llama.cpp also auto-detects by text; explicit is safer)
FIM_TOKENS = {
    "fim_pre": ("<|fim_prefix|>", "<fim_prefix>", "<｜fim▁begin｜>"),
    "fim_suf": ("<|fim_suffix|>", "<fim_suffix>", "<｜fim▁hole｜>"),
    "fim_mid": ("<|fim_middle|>", "<fim_middle>", "<｜fim▁end｜>"),
    "fim_pad": ("<|fim_pad|>", "<fim_pad>"),
    "fim_rep": ("<|repo_name|>", "<reponame>"),
    "fim_sep": ("<|file_sep|>", "<file_sep>"),
}


@dataclass
class GgufResult:
    path: Path
    type: str
    arch: str
    n_tensors: int
    size: int


# ---- tokenizer ------------------------------------------------------------------------------------------
def _looks_special(text: str) -> bool:
    return bool(re.fullmatch(r"<\|.*\|>|<｜.*｜>|<[a-z_]+>|<\|[a-z_]+>", text))


def pre_tokenizer_name(tokenizer_json: dict, arch: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` (which regex splits text before BPE), from the HF regex."""
    pretok = json.dumps(tokenizer_json.get("pre_tokenizer") or {})
    if "\\\\p{N}{1,3}" in pretok or "\\p{N}{1,3}" in pretok:
        return "llama-bpe"
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pretok and "\\\\p{N}|" in pretok.replace("\\\\p{N}+", ""):
        return "qwen2"
    if '"Digits"' in pretok and '"individual_digits": true' in pretok:
        return "starcoder" if arch == "starcoder2" else "deepseek-coder"
    return {"qwen2": "qwen2", "starcoder2": "starcoder"}.get(arch, "gpt-2")


def vocab_entries(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1, following llama.cpp's convert_hf_to_gguf:
    normal BPE pieces, added special-looking tokens CONTROL, other added tokens USER_DEFINED,
    ids the tokenizer does not use (padding rows of the embedding) UNUSED ``[PADn]``."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder  # id -> AddedToken
    if max(reverse) >= vocab_size:
        raise ModelCorrupt(f"tokenizer has id {max(reverse)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = added[i].content
            tokens.append(text)
            special = added[i].special or _looks_special(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def add_tokenizer(writer, model_dir: Path, arch: str, vocab_size: int) -> dict[str, int]:
    """Write vocabulary, merges, special ids, FIM ids and chat template. Returns the FIM ids found."""
    import gguf

    tj_path = model_dir / "tokenizer.json"
    if not tj_path.exists():
        raise InvalidRequest(f"{model_dir} has no tokenizer.json (a fast byte-level BPE tokenizer is needed)",
                             param="model")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    if tj["model"]["type"] != "BPE" or tj["model"].get("byte_fallback"):
        raise InvalidRequest("only byte-level BPE tokenizers (Qwen, StarCoder, DeepSeek-Coder, Llama 3) are "
                             "supported for GGUF export", param="model")
    tokens, types = vocab_entries(model_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tj, arch))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    index = {t: i for i, t in enumerate(tokens)}
    fim = {}
    for key, spellings in FIM_TOKENS.items():
        tid = next((index[s] for s in spellings if s in index), None)
        if tid is not None:
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", tid)
            fim[key] = tid
    return fim


# ---- hyper-parameters --------------------------------------------------------------------------------------
def add_hparams(writer, cfg: dict, arch: str) -> None:
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    writer.add_context_length(cfg.get("max_position_embeddings", 4096))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(cfg.get("num_key_value_heads", n_head))
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != cfg["hidden_size"]:  # width-pruned heads: head_dim no longer hidden / heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "starcoder2":
        writer.add_layer_norm_eps(cfg.get("norm_epsilon", 1e-5))
    else:
        writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(cfg["vocab_size"])


# ---- tensors ----------------------------------------------------------------------------------------------
def _permute_for_llama(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF llama q/k rows are in rotate-half order; llama.cpp's llama arch wants interleaved pairs.
    w: (n_head * head_dim, hidden) -> same shape, rows permuted within each head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_qtype(name: str, data: np.ndarray, wanted: str):
    """Storage type of one tensor: 1-D tensors (norms, biases) stay F32; Q8_0 needs rows % 32 == 0."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim < 2 or wanted == "f32":
        return T.F32
    if wanted == "q8_0":
        return T.Q8_0 if data.shape[-1] % 32 == 0 else T.F16
    return {"f16": T.F16, "bf16": T.BF16}[wanted]


def iter_hf_tensors(model_dir: Path):
    """(name, float32 numpy array) for every tensor of the safetensors shards of ``model_dir``."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelCorrupt(f"{model_dir} has no .safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def add_tensors(writer, model_dir: Path, cfg: dict, arch: str, wanted: str, *, progress: bool) -> int:
    import gguf
    from tqdm import tqdm

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg["num_hidden_layers"])
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    n = 0
    for hf_name, data in tqdm(iter_hf_tensors(model_dir), desc=f"gguf {wanted}", disable=not progress,
                              file=sys.stderr, leave=False):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # llama.cpp reuses token_embd as the output head
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InvalidRequest(f"tensor {hf_name} has no GGUF name for {arch}", param="model")
        if arch == "llama" and (hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias")):
            data = _permute_for_llama(data, n_head)
        elif arch == "llama" and (hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias")):
            data = _permute_for_llama(data, n_kv)
        qtype = tensor_qtype(new, data, wanted)
        writer.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        n += 1
    return n


# ---- entry points -------------------------------------------------------------------------------------------
def _file_type(wanted: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[wanted]


def read_config(model_dir: Path) -> tuple[dict, str]:
    """(config.json, llama.cpp architecture). A qwen2 model whose heads were pruned is written as
    ``llama`` (same blocks; llama.cpp's llama loader takes the optional q/k/v biases and any
    head_dim, its qwen2 loader insists on head_dim * heads == hidden)."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or []
    arch = next((ARCHS[a] for a in archs if a in ARCHS), None)
    if arch is None:
        raise InvalidRequest(f"GGUF export supports {', '.join(ARCHS)}; {model_dir.name} is {archs or 'unknown'}",
                             param="model")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if arch == "qwen2" and head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        arch = "llama"
    return cfg, arch


@contextmanager
def _gguf_file(out: Path, arch: str):
    """A GGUFWriter onto a temporary file beside ``out``: written and renamed into place when the
    block ends normally, removed otherwise (a killed export never leaves a half file at ``out``)."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, type: str = "f16", *, name: str | None = None,
               progress: bool = True) -> GgufResult:
    """Write ``model_dir`` (HF safetensors + tokenizer) as a GGUF of type f32 | f16 | bf16 | q8_0."""
    import gguf

    if type not in PY_TYPES:
        raise InvalidRequest(f"write_gguf writes {', '.join(PY_TYPES)}; use export_gguf for {type}", param="type")
    model_dir, out = Path(model_dir), Path(out)
    cfg, arch = read_config(model_dir)
    with _gguf_file(out, arch) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or model_dir.name)
        writer.add_description(f"exported by localcoder quantize from {model_dir.name} ({type})")
        writer.add_file_type(_file_type(type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hparams(writer, cfg, arch)
        add_tokenizer(writer, model_dir, arch, cfg["vocab_size"])
        for key, value in student_meta(model_dir).items():  # a distilled student: its order and provenance
            writer.add_string(f"localcoder.{key}", value)
        n = add_tensors(writer, model_dir, cfg, arch, type, progress=progress)
    return GgufResult(out, type, arch, n, out.stat().st_size)


def student_meta(model_dir: Path) -> dict[str, str]:
    """What a distilled student's ``localcoder.json`` tells serving, as GGUF strings: ``fim_orders`` (the order it
    was trained for; the llama engine's ``auto`` picks it; llama.cpp's quantize keeps the key, so K-quants of
    the export declare it too), the teacher and the data it learned from (roots, fingerprint)."""
    from localcoder.models import hf_declared_orders

    try:
        prov = json.loads((model_dir / "localcoder.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {"fim_orders": ",".join(hf_declared_orders(model_dir))}
    if isinstance(prov, dict):
        data = prov.get("data") or {}
        out |= {"teacher": str(prov.get("teacher", "")), "data_fingerprint": str(data.get("fingerprint", "")),
                "data_roots": json.dumps(data.get("roots", []))}
    return {k: v for k, v in out.items() if v}


def llama_quantize(src: str | os.PathLike, dst: str | os.PathLike, type: str, *, threads: int = 0) -> None:
    """GGUF -> GGUF requantisation with llama.cpp (K-quants and the legacy types)."""
    from localcoder.engines.native import import_llama

    llama_cpp = import_llama()  # BackendUnavailable when llama-cpp-python is not installed
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type.upper()}", None)
    if ftype is None:
        raise InvalidRequest(f"llama.cpp has no quantization type {type!r}", param="type")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or (os.cpu_count() or 1)
    params.allow_requantize = False
    with _captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise ModelCorrupt(f"llama.cpp quantize {type} of {Path(src).name} failed (code {rc}): {tail}")


@contextmanager
def _captured_stderr():
    """llama.cpp prints one line per tensor to fd 2; keep it in a file (shown only on failure)."""
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "llama_quantize.log"
        sys.stderr.flush()
        saved = os.dup(2)
        with log.open("wb") as fh:
            os.dup2(fh.fileno(), 2)
            try:
                yield log
            finally:
                os.dup2(saved, 2)
                os.close(saved)


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, type: str = "q8_0", *,
                name: str | None = None, threads: int = 0, progress: bool = True) -> GgufResult:
    """Any supported type: gguf-py types directly, K-quants from an F16 intermediate via llama.cpp."""
    type = type.lower()
    if type not in GGUF_TYPES:
        raise InvalidRequest(f"unknown GGUF type {type!r}; choose from {', '.join(GGUF_TYPES)}", param="type")
    if type in PY_TYPES:
        return write_gguf(model_dir, out, type, name=name, progress=progress)
    out = Path(out)
    f16 = out.with_name(f".{out.stem}.f16-{os.getpid()}.gguf")
    try:
        res = write_gguf(model_dir, f16, "f16", name=name, progress=progress)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            llama_quantize(f16, tmp, type, threads=threads)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        f16.unlink(missing_ok=True)
    return GgufResult(out, type, res.arch, res.n_tensors, out.stat().st_size)


# ---- LoRA adapters ---------------------------------------------------------------------------------------------
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_pairs(tensors) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{hf weight name: (A [r, in], B [out, r])}`` from PEFT-named tensors, as PEFT saves them
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) or as a training checkpoint
    holds them (``...lora_A.default.weight``)."""
    a, b = {}, {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if m is None:
            continue
        data = t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float32)
        (a if m.group(2) == "A" else b)[m.group(1) + ".weight"] = data
    if not a or set(a) != set(b):
        raise ModelCorrupt(f"no complete LoRA A/B pairs among {len(tensors)} tensors "
                           f"({len(a)} A, {len(b)} B)")
    return {name: (a[name], b[name]) for name in sorted(a)}


def write_lora_gguf(tensors, out: str | os.PathLike, *, alpha: float, base_config: dict, name: str,
                    meta: dict[str, str] | None = None) -> GgufResult:
    """A llama.cpp GGUF LoRA adapter (``general.type`` adapter, ``adapter.lora.alpha``; tensors
    ``blk.N.attn_q.weight.lora_a`` [in, r] / ``.lora_b`` [r, out] in GGUF order, F16), loadable next
    to the base GGUF (``--lora`` / ``llama_adapter_lora_init``). llama.cpp scales by alpha / rank, as
    PEFT does. ``meta``: string keys written as ``localcoder.<key>`` (the layout it teaches...)."""
    import gguf

    out = Path(out)
    archs = base_config.get("architectures") or []
    arch = next((ARCHS[a] for a in archs if a in ARCHS), None)
    if arch is None:
        raise InvalidRequest(f"LoRA export supports {', '.join(ARCHS)}; the base is {archs or 'unknown'}", param="model")
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, base_config["num_hidden_layers"])
    n_head = base_config["num_attention_heads"]
    n_kv = base_config.get("num_key_value_heads", n_head)
    pairs = lora_pairs(tensors)
    with _gguf_file(out, arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for key, value in (meta or {}).items():
            writer.add_string(f"localcoder.{key}", str(value))
        for hf_name, (lora_a, lora_b) in pairs.items():
            new = names.get_name(hf_name, try_suffixes=(".weight",))
            if new is None:
                raise InvalidRequest(f"LoRA tensor {hf_name} has no GGUF name for {arch}", param="model")
            if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):  # rows as the base's
                lora_b = _permute_for_llama(lora_b, n_head if "q_proj" in hf_name else n_kv)
            for suffix, data in ((".lora_a", lora_a), (".lora_b", lora_b)):
                writer.add_tensor(new + suffix, data.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
    return GgufResult(out, "f16", arch, 2 * len(pairs), out.stat().st_size)

"""HF model directory -> ONNX (with KV cache) -> fp16 / int8 / int4 weight quantization.

The fp32 graph comes from onnxruntime-genai's model builder for the architectures it knows (Qwen2, Llama,
Mistral, Qwen3: ``BUILDER_ARCHS``): one fused graph per model, GroupQueryAttention with rotary embedding
inside, fused QKV projection, SkipSimplifiedLayerNormalization; the same I/O as optimum's export minus
``position_ids`` (GroupQueryAttention derives positions from the attention mask). Measured on the packaged
0.5B (docs/quantize.md): logits identical to optimum's graph (KL 0), and after the same int8 quantization
1.1x the prefill and 1.7x the decode in one interleaved run. ``--onnx-graph optimum`` (optimum-onnx ``text-generation-with-past``,
op by op) remains for other architectures.

Why weight-only quantization: a naive whole-model ``quantize_dynamic`` was measured to break FIM output
(DESIGN.md), and so did a per-channel ``quantize_dynamic`` of the block MatMuls only: its per-tensor
uint8 *activations* (Qwen's activations have outlier channels) dropped the 0.5B's FIM ES from 0.742 to
0.496 on 72 cases while KL on plain code looked harmless (0.10). int8 and int4 are therefore
``MatMulNBits`` (block-wise weights, one fp32 scale — and with ``symmetric=False`` a zero point — per
``block_size`` input rows), made by onnxruntime's own ``MatMulNBitsQuantizer`` with one of its
algorithms (``OnnxQuantConfig.algorithm``):

- ``default``: round to nearest in onnxruntime's blockwise quantizer (int8 or int4);
- ``rtn`` / ``k_quant``: the neural-compressor round-to-nearest / k-quant scale search shipped in
  onnxruntime (per-node bits; measured far too slow on CPU for the 0.5B, see docs/quantize.md);
- ``hqq``: half-quadratic quantization (int4, no calibration data);
- ``gptq``: GPTQ on ``gptq_seqs`` calibration windows of ``localcoder.quantize.calib`` (int4/int8).

Mixed precision (``eight_bit``, int4 only): the nodes it names are quantized at 8 bits; with ``default``/``hqq``
by a first 8-bit pass over just those nodes, with the neural-compressor algorithms through their per-node bits.

``accuracy_level`` picks the MatMulNBits compute type (0 = unset = fp32, 4 = int8 activations per block,
onnxruntime's fast CPU kernels). Only the MatMuls *inside the transformer blocks* are quantized by default;
the embedding (a Gather, never touched) and the output head (``/lm_head/MatMul``) stay fp32 while
``keep`` names them, and any block named in ``keep`` stays fp32 too. ``--keep ''`` quantizes the head.
The quality gate decides whether the result is good enough.

``fp16`` (meant for ``--device cuda``): every float tensor, KV cache included, converted by onnxruntime's
``float16`` converter.

Every export is written into a hidden temporary directory holding an ``INCOMPLETE`` marker and renamed
into place at the end, after a manifest of its files and sizes (``localcoder-onnx.json``) is written;
the engine refuses a directory with the marker and checks the manifest before loading.

Exported graph I/O is documented in ``localcoder.engines.onnx``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from localcoder.engines.onnx import INCOMPLETE, MANIFEST
from localcoder.errors import BackendUnavailable, InvalidRequest, ModelCorrupt

ONNX_TYPES = ("fp32", "fp16", "int8", "int4")
BLOCK_MATMUL = re.compile(r"^/model/layers\.(\d+)/.*MatMul$")
# Defaults per type, chosen on the packaged 0.5B's 72-case gate (docs/quantize.md). Both quantize the head (no
# node kept fp32 unless --keep names it) and compute with int8 activations per block (accuracy level 4):
# - int8: round to nearest, head at 8 bits: ES -1.1 points (CI -0.0..+2.6), decode 1.4x an fp32 head's;
# - int4: k-quant with llama.cpp Q4_K_M's mixed precision (head and the sensitive blocks' QKV/down at 8 bits):
#   ES +1.5 (CI -0.6..+4.1); round to nearest with an 8-bit head lost 10.2 points.
DEFAULT_KEEP = {"int8": (), "int4": ()}
DEFAULT_ALGORITHM = {"int8": "default", "int4": "k_quant"}
DEFAULT_EIGHT_BIT = {"int8": (), "int4": ("sensitive",)}
# Larger blocks decode faster (fewer scales per row: int8 b128 35.1 vs b32 27.8 tok/s) and passed the gate for
# int8 (ES -0.5, CI -0.2..+1.5); int4 k-quant at 64 lost 2.5 points (FAIL), at 32 it passed.
DEFAULT_BLOCK = {"int8": 128, "int4": 32}
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GB limit: larger models keep weights in model.onnx_data
Algorithm = Literal["default", "rtn", "k_quant", "hqq", "gptq"]


@dataclass
class OnnxQuantConfig:
    # `localcoder quantize --to onnx` makes its --onnx-* flags from these fields (localcoder.cliargs).
    algorithm: Algorithm | None = field(default=None, metadata={
        "help": "onnxruntime quantizer algorithm: default (blockwise round-to-nearest) | rtn | k_quant | hqq (int4) "
                "| gptq (calibrated) (default: default for int8, k_quant for int4)",
        "cli": {"flags": ("--onnx-algorithm",)}})
    accuracy_level: int | None = field(default=None, metadata={
        "help": "MatMulNBits compute: 0 unset (fp32), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations per block "
                "(default: 4; 0 measured 2-3x slower decode on CPU)", "cli": {"flags": ("--onnx-accuracy-level",),
                                                               "choices": (0, 1, 2, 3, 4)}})
    block_size: int | None = field(default=None, metadata={
        "help": "input rows per quantization scale (16, 32, 64, 128, 256) (default: 128 for int8, 32 for int4)",
        "cli": {"flags": ("--onnx-block-size",)}})
    symmetric: bool = field(default=True, metadata={
        "help": "symmetric weights (--no-onnx-symmetric: asymmetric, with zero points)",
        "cli": {"flags": ("--onnx-symmetric",)}})
    eight_bit: Sequence[str] | None = field(default=None, metadata={
        "help": "int4: node-name patterns quantized at 8 bits instead (e.g. lm_head layers.0/ down_proj), or "
                "'sensitive': the head and llama.cpp Q4_K_M's sensitive blocks' V/QKV and down projections "
                "(default: sensitive; '' = every node at 4 bits)", "cli": {"flags": ("--onnx-8bit",)}})
    graph: str = field(default="auto", metadata={
        "help": "fp32 graph the quantizer starts from: builder (onnxruntime-genai, fused attention; measured "
                "faster) | optimum (op by op, any architecture) | auto (builder when it takes the architecture)",
        "cli": {"flags": ("--onnx-graph",), "choices": ("auto", "builder", "optimum")}})
    gptq_seqs: int = field(default=4, metadata={
        "help": "gptq: calibration windows (of 256 tokens, localcoder.quantize.calib)",
        "cli": {"flags": ("--onnx-gptq-seqs",)}})

    def resolved(self, type: str) -> "OnnxQuantConfig":
        """This config with the per-type defaults filled in (``type`` int8 or int4)."""
        return OnnxQuantConfig(**{**asdict(self),
                                  "algorithm": self.algorithm or DEFAULT_ALGORITHM.get(type, "default"),
                                  "accuracy_level": 4 if self.accuracy_level is None else self.accuracy_level,
                                  "block_size": self.block_size or DEFAULT_BLOCK.get(type, 32),
                                  "eight_bit": tuple(DEFAULT_EIGHT_BIT.get(type, ()) if self.eight_bit is None
                                                     else self.eight_bit)})

    def validate(self, type: str) -> None:
        if self.algorithm is not None and self.algorithm not in ("default", "rtn", "k_quant", "hqq", "gptq"):
            raise InvalidRequest(f"unknown ONNX quantizer algorithm {self.algorithm!r}", param="onnx_algorithm")
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise InvalidRequest(f"--onnx-block-size must be a power of two >= 16, got {self.block_size}",
                                 param="onnx_block_size")
        if self.algorithm == "hqq" and type != "int4":
            raise InvalidRequest("the hqq algorithm makes int4 only", param="onnx_algorithm")
        if self.eight_bit and type != "int4":
            raise InvalidRequest("--onnx-8bit needs --type int4", param="onnx_8bit")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InvalidRequest("--onnx-accuracy-level is 0..4", param="onnx_accuracy_level")

    def describe(self, type: str) -> str:
        cfg = self.resolved(type)
        parts = [type, cfg.algorithm, f"acc{cfg.accuracy_level}", f"b{cfg.block_size}",
                 "sym" if cfg.symmetric else "asym"]
        if any(cfg.eight_bit):
            parts.append("8bit=" + ",".join(cfg.eight_bit))
        return " ".join(parts)


@dataclass
class OnnxResult:
    path: Path  # export directory (model.onnx [+ model.onnx_data], config, tokenizer)
    type: str
    quantized_nodes: int
    kept_nodes: list[str]
    size: int
    eight_bit_nodes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def _require_optimum():
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise BackendUnavailable("ONNX export needs optimum-onnx", hint="pip install 'localcoder[onnx]'") from exc
    return main_export


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- atomic export directories -------------------------------------------------------------------------------
def _start_tmp(out: Path) -> Path:
    """A fresh hidden sibling of ``out`` marked INCOMPLETE (an interrupted export stays marked)."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / INCOMPLETE).write_text("localcoder is writing this ONNX export; if no export is running, delete it\n",
                                  encoding="utf-8")
    return tmp


def _finish(tmp: Path, out: Path, info: dict) -> None:
    """Write the manifest (every file and its size), drop the marker, rename into place."""
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*"))
             if p.is_file() and p.name not in (INCOMPLETE, MANIFEST)}
    (tmp / MANIFEST).write_text(json.dumps({**info, "files": files, "written": time.time()}, indent=1) + "\n",
                                encoding="utf-8")
    for f in (tmp / MANIFEST, *(tmp / n for n in files)):  # on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    (tmp / INCOMPLETE).unlink()
    _replace_dir(tmp, out)


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)  # dst is either the old complete export or the new one, never a half
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# Architectures onnxruntime-genai's model builder writes as one fused graph (GroupQueryAttention, fused QKV,
# SkipSimplifiedLayerNormalization); anything else goes through optimum's op-by-op export.
BUILDER_ARCHS = ("Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM")


def _builder_arch(model_dir: Path) -> str | None:
    try:
        archs = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return None
    return archs[0] if archs and archs[0] in BUILDER_ARCHS else None


def export_fp32(model_dir: str | os.PathLike, out: str | os.PathLike, *, graph: str = "auto",
                progress: bool = True) -> OnnxResult:
    """fp32 ONNX decoder with KV cache in/out (the graph I/O of ``localcoder.engines.onnx``).

    ``graph``: ``builder`` = onnxruntime-genai's model builder (fused attention: after the same int8
    quantization 1.1x the prefill and 1.7x the decode of optimum's graph, and exact: KL 0 against it,
    docs/quantize.md); ``optimum`` = optimum-onnx's ``text-generation-with-past``
    export (any architecture transformers can trace); ``auto`` = the builder when it knows the architecture."""
    from transformers import AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    if graph not in ("auto", "builder", "optimum"):
        raise InvalidRequest(f"graph must be auto, builder or optimum, got {graph!r}", param="onnx_graph")
    arch = _builder_arch(model_dir)
    use_builder = graph == "builder" or (graph == "auto" and arch is not None)
    if use_builder and arch is None:
        raise InvalidRequest(f"onnxruntime-genai's builder does not take {model_dir} (architectures it takes: "
                             f"{', '.join(BUILDER_ARCHS)}); use --onnx-graph optimum", param="onnx_graph")
    build = _require_builder() if use_builder else _require_optimum()
    tmp = _start_tmp(out)
    try:
        if progress:
            how = "onnxruntime-genai builder, fused attention" if use_builder else "optimum"
            print(f"exporting {model_dir.name} to ONNX ({how}, with KV cache)…", file=sys.stderr)
        if use_builder:
            with _quiet_stdout(not progress):
                build(model_name=None, input_path=str(model_dir), output_dir=str(tmp), precision="fp32",
                      execution_provider="cpu", cache_dir=str(tmp / ".builder-cache"), hf_remote=False)
            shutil.rmtree(tmp / ".builder-cache", ignore_errors=True)
        else:
            build(str(model_dir), str(tmp), task="text-generation-with-past", do_validation=False,
                  local_files_only=True)
        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(tmp))
        _finish(tmp, out, {"type": "fp32", "source": str(model_dir), "graph": "builder" if use_builder else "optimum"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OnnxResult(out, "fp32", 0, [], dir_size(out))


def _require_builder():
    try:
        from onnxruntime_genai.models.builder import create_model
    except ImportError as exc:
        raise BackendUnavailable("the fused ONNX graph needs onnxruntime-genai's model builder",
                                 hint="pip install 'localcoder[onnx]' (or --onnx-graph optimum)") from exc
    return create_model


@contextlib.contextmanager
def _quiet_stdout(quiet: bool):
    """The builder prints its progress to stdout; `--quiet` and JSON-printing callers want it gone."""
    if not quiet:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def _reusable_fp32(fp32: Path, model_dir: Path, graph: str) -> bool:
    """An earlier complete fp32 export of the same graph kind (the gate compares against it)."""
    if not (fp32 / "model.onnx").exists() or (fp32 / INCOMPLETE).exists():
        return False
    try:
        made = json.loads((fp32 / MANIFEST).read_text(encoding="utf-8")).get("graph", "optimum")
    except (OSError, ValueError):
        made = "optimum"
    want = graph if graph != "auto" else ("builder" if _builder_arch(model_dir) else "optimum")
    return made == want


def select_nodes(model, keep: Sequence[str]) -> tuple[list[str], list[str]]:
    """(block MatMul nodes to quantize, MatMul nodes kept in fp32). A node is kept when any ``keep``
    pattern is a substring of its name, e.g. ``lm_head`` or ``layers.0/``; the output head is
    quantized when no pattern keeps it; other MatMuls outside the blocks stay fp32."""
    inits = {i.name for i in model.graph.initializer}
    quant, kept = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul" or not any(i in inits for i in node.input):
            continue
        if any(k and k in node.name for k in keep) or not (BLOCK_MATMUL.match(node.name) or _is_head(node.name)):
            kept.append(node.name)
        else:
            quant.append(node.name)
    return quant, kept


SENSITIVE = "sensitive"  # --onnx-8bit sensitive: llama.cpp's Q4_K_M choice of matrices that get more bits


def n_layers(nodes: Sequence[str]) -> int:
    return 1 + max((int(m.group(1)) for n in nodes if (m := BLOCK_MATMUL.match(n))), default=-1)


def sensitive_layer(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the blocks and every third one between."""
    return i < n / 8 or i >= 7 * n / 8 or (i - round(n / 8)) % 3 == 2


def eight_bit_node(name: str, patterns: Sequence[str], n: int) -> bool:
    """Whether an int4 export keeps ``name`` at 8 bits: a pattern is a substring of it, or the pattern
    ``sensitive`` and the node is the head or the value/QKV or down projection of a sensitive block (as
    llama.cpp's Q4_K_M gives attn_v and ffn_down Q6_K there and onnxruntime-genai's ``k_quant_mixed`` 8 bits)."""
    if any(p and p != SENSITIVE and p in name for p in patterns):
        return True
    if SENSITIVE not in patterns:
        return False
    if _is_head(name):
        return True
    m = BLOCK_MATMUL.match(name)
    return bool(m and sensitive_layer(int(m.group(1)), n)
                and any(k in name for k in ("/qkv_proj/", "/v_proj/", "/down_proj/")))


def _is_head(name: str) -> bool:
    return name == "/lm_head/MatMul"


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx") and f.name not in (MANIFEST, INCOMPLETE):
            shutil.copy2(f, dst / f.name)


def quantize_onnx(fp32_dir: str | os.PathLike, out: str | os.PathLike, type: str, *,
                  keep: Sequence[str] | None = None, block_size: int | None = None,
                  config: OnnxQuantConfig | None = None, progress: bool = True) -> OnnxResult:
    """Quantize an fp32 export (``export_fp32``) into ``out`` as int8 or int4 (see module doc)."""
    import onnx

    if type not in ("int8", "int4"):
        raise InvalidRequest(f"ONNX quantization type must be int8 or int4, got {type!r}", param="type")
    cfg = config or OnnxQuantConfig()
    keep = DEFAULT_KEEP[type] if keep is None else keep
    if block_size is not None:
        cfg = OnnxQuantConfig(**{**asdict(cfg), "block_size": block_size})
    cfg.validate(type)
    explicit_block = cfg.block_size is not None
    cfg = cfg.resolved(type)
    src, out = Path(fp32_dir), Path(out)
    model_file = src / "model.onnx"
    if not model_file.exists():
        raise ModelCorrupt(f"{src} has no model.onnx")
    model = onnx.load(str(model_file), load_external_data=False)
    quant, kept = select_nodes(model, keep)
    if not quant:
        raise InvalidRequest("no transformer-block MatMul left to quantize (check --keep)", param="keep")
    depth = n_layers(quant)
    eight = [n for n in quant if eight_bit_node(n, cfg.eight_bit, depth)] if type == "int4" else []
    if not explicit_block and cfg.algorithm in ("rtn", "k_quant", "gptq"):
        cfg = OnnxQuantConfig(**{**asdict(cfg), "block_size": packable_block(model, quant, cfg.block_size)})
    large = dir_size(src) > EXTERNAL_DATA_BYTES
    tmp = _start_tmp(out)
    try:
        if progress:
            print(f"quantizing {len(quant)} MatMuls ({cfg.describe(type)}); 8-bit: {len(eight)}; "
                  f"kept fp32: {', '.join(kept) or 'none'}", file=sys.stderr)
        _nbits(src, tmp / "model.onnx", kept, 8 if type == "int8" else 4, cfg, eight, large)
        _copy_side_files(src, tmp)
        settings = {**asdict(cfg), "eight_bit": list(cfg.eight_bit), "label": cfg.describe(type)}
        _finish(tmp, out, {"type": type, "quantizer": settings, "kept_fp32": kept, "eight_bit_nodes": eight})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OnnxResult(out, type, len(quant), kept, dir_size(out), eight, settings)


def _nbits(src_dir: Path, dst: Path, exclude: list[str], bits: int, cfg: OnnxQuantConfig, eight_bit: list[str],
           large: bool) -> None:
    """MatMulNBits through onnxruntime's ``MatMulNBitsQuantizer``. (Its ``nodes_to_include`` widens the op-type
    selection instead of narrowing it, so kept nodes go in ``nodes_to_exclude``; the rtn/k_quant/gptq path
    ignores ``nodes_to_exclude``, so kept nodes are marked "fp32" in its per-node config.)"""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization.neural_compressor",
                 "neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)  # one line per node otherwise
    accuracy = cfg.accuracy_level
    algo = None
    if cfg.algorithm == "hqq":
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=bits)
    elif cfg.algorithm in ("rtn", "k_quant"):
        algo = (mnq.RTNWeightOnlyQuantConfig if cfg.algorithm == "rtn" else mnq.KQuantWeightOnlyQuantConfig)(
            customized_weight_config=_bits_config(src_dir, bits, eight_bit))
    elif cfg.algorithm == "gptq":
        algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_gptq_inputs(src_dir, cfg.gptq_seqs),
                                             block_size=128)
    model = onnx.load(str(src_dir / "model.onnx"))  # with external data
    if eight_bit and cfg.algorithm in ("default", "hqq"):  # mixed precision: an 8-bit pass over those nodes first
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in eight_bit]
        first = mnq.MatMulNBitsQuantizer(model, bits=8, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                         accuracy_level=accuracy, nodes_to_exclude=others)
        first.process()
        model = first.model.model  # the 8-bit nodes are MatMulNBits now: the 4-bit pass leaves them alone
    q = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                 accuracy_level=accuracy, nodes_to_exclude=exclude, algo_config=algo)
    if cfg.algorithm in ("rtn", "k_quant", "gptq"):
        per_node = q._generate_q4_node_config  # the neural-compressor path: per-node bits and exclusions

        def node_config():
            conf = per_node()
            for name in conf:
                if name in exclude:
                    conf[name] = "fp32"
                else:
                    conf[name]["bits"] = 8 if (bits == 8 or name in eight_bit) else 4
            return conf

        q._generate_q4_node_config = node_config
    try:
        q.process()
    except ValueError as exc:  # onnxruntime packs zero points wrongly for an odd number of blocks per column
        if cfg.algorithm in ("rtn", "k_quant", "gptq") and "reshape" in str(exc):
            raise InvalidRequest(f"onnxruntime's {cfg.algorithm} quantizer cannot pack blocks of {cfg.block_size} for "
                                 f"this model (a matrix has an odd number of blocks per column: {exc}); use a "
                                 "smaller --onnx-block-size or leave it unset", param="onnx_block_size") from exc
        raise
    if accuracy:  # the hqq quantizer does not write the attribute; the compute type is a node attribute
        for node in q.model.model.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy))
    q.model.save_model_to_file(str(dst), use_external_data_format=large)  # both ONNXModel kinds have it


def packable_block(model, nodes: Sequence[str], block: int) -> int:
    """The largest block size <= ``block`` (down to 16) giving every matrix of ``nodes`` an even number of blocks
    per column: onnxruntime's neural-compressor path (rtn, k_quant, gptq) packs zero points wrongly otherwise
    (896 input rows in blocks of 128 = 7 fails)."""
    inits = {i.name: i for i in model.graph.initializer}
    rows = {int(inits[i].dims[0]) for n in model.graph.node if n.name in set(nodes)
            for i in n.input if i in inits and len(inits[i].dims) == 2}
    while block > 16 and any(-(-k // block) % 2 for k in rows):
        block //= 2
    return block


def _bits_config(src_dir: Path, bits: int, eight_bit: list[str]) -> dict:
    return {n: {"bits": 8} for n in eight_bit} if bits == 4 else {}


def _gptq_inputs(src_dir: Path, n_seqs: int) -> list[dict]:
    """Calibration feeds for GPTQ: windows of real code with an empty KV cache, the graph's own inputs."""
    import numpy as np
    import onnx
    from transformers import AutoTokenizer

    from localcoder.quantize.calib import calibration_ids

    tok = AutoTokenizer.from_pretrained(str(src_dir))
    windows = calibration_ids(lambda t: tok.encode(t, add_special_tokens=False), None, n_seqs=n_seqs,
                              seq_len=256, seed=0)
    graph = onnx.load(str(src_dir / "model.onnx"), load_external_data=False).graph
    pasts = [i for i in graph.input if i.name.startswith("past_key_values.")]
    positions = any(i.name == "position_ids" for i in graph.input)  # optimum's graph; the builder's derives them
    feeds = []
    for ids in windows:
        T = len(ids)
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, T), np.int64)}
        if positions:
            feed["position_ids"] = np.arange(T, dtype=np.int64)[None]
        for p in pasts:
            dims = p.type.tensor_type.shape.dim
            feed[p.name] = np.zeros((1, dims[1].dim_value, 0, dims[3].dim_value), np.float32)
        feeds.append(feed)
    return feeds


def convert_fp16(fp32_dir: str | os.PathLike, out: str | os.PathLike, *, progress: bool = True) -> OnnxResult:
    """fp16 export for the CUDA execution provider: weights, activations and the KV cache in float16."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, out = Path(fp32_dir), Path(out)
    if not (src / "model.onnx").exists():
        raise ModelCorrupt(f"{src} has no model.onnx")
    tmp = _start_tmp(out)
    try:
        if progress:
            print("converting the ONNX export to fp16 (for --device cuda)…", file=sys.stderr)
        model = onnx.load(str(src / "model.onnx"))
        # keep_io_types=False: the KV cache is fp16 too (half the bytes per step); the engine reads the
        # input types. Shape inference is skipped: the exported graph has dynamic dims it cannot resolve.
        model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
        large = dir_size(src) / 2 > EXTERNAL_DATA_BYTES
        onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=large,
                        all_tensors_to_one_file=True, location="model.onnx_data")
        _copy_side_files(src, tmp)
        _finish(tmp, out, {"type": "fp16"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OnnxResult(out, "fp16", 0, [], dir_size(out))


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike, type: str = "int8", *,
                keep: Sequence[str] | None = None, fp32_dir: str | os.PathLike | None = None,
                config: OnnxQuantConfig | None = None, progress: bool = True) -> OnnxResult:
    """HF dir -> ONNX of ``type`` (fp32 | fp16 | int8 | int4). The fp32 export goes to ``fp32_dir`` (kept:
    the quality gate compares against it) or, for fp32, straight to ``out``."""
    type = type.lower()
    if type not in ONNX_TYPES:
        raise InvalidRequest(f"unknown ONNX type {type!r}; choose from {', '.join(ONNX_TYPES)}", param="type")
    if type in ("int8", "int4"):
        (config or OnnxQuantConfig()).validate(type)  # bad flags fail before a minutes-long export
    graph = (config or OnnxQuantConfig()).graph
    if type == "fp32":
        return export_fp32(model_dir, out, graph=graph, progress=progress)
    fp32 = Path(fp32_dir) if fp32_dir else Path(out).with_name(f"{Path(out).name}-fp32")
    if not _reusable_fp32(fp32, Path(model_dir), graph):
        export_fp32(model_dir, fp32, graph=graph, progress=progress)
    if type == "fp16":
        return convert_fp16(fp32, out, progress=progress)
    return quantize_onnx(fp32, out, type, keep=keep, config=config, progress=progress)

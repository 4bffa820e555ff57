"""HF model directory -> ONNX (with KV cache, via optimum-onnx) -> int8 / int4 weight quantization.

Why selective, weight-only quantization: a naive whole-model ``quantize_dynamic`` was measured to break FIM
output (DESIGN.md), and so did a per-channel ``quantize_dynamic`` of the block MatMuls only: its per-tensor
uint8 *activations* (Qwen's activations have outlier channels) dropped the 0.5B's FIM ES from 0.742 to
0.496 on 72 cases while KL on plain code looked harmless (0.10). Both types are therefore weight-only
``MatMulNBits`` (block-wise symmetric, one fp32 scale per ``block_size`` input rows, activations fp32):
- int8: 8-bit weights (FIM ES equal to fp32's on the same cases; see docs/quantize.md);
- int4: 4-bit weights, compute at ``accuracy_level=4`` (int8 activations per block);
only the MatMuls *inside the transformer blocks* are quantized, while the embedding (a Gather, never
touched) and the output head (``/lm_head/MatMul``) stay fp32 by default, plus any block named in ``keep``
(sensitive layers). The quality gate decides whether the result is good enough.

Exported graph I/O is documented in ``localcoder.engines.onnx``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from localcoder.errors import BackendUnavailable, InvalidRequest, ModelCorrupt

ONNX_TYPES = ("fp32", "int8", "int4")
BLOCK_MATMUL = re.compile(r"^/model/layers\.(\d+)/.*MatMul$")
DEFAULT_KEEP = ("lm_head",)
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GB limit: larger models keep weights in model.onnx_data


@dataclass
class OnnxResult:
    path: Path  # export directory (model.onnx [+ model.onnx_data], config, tokenizer)
    type: str
    quantized_nodes: int
    kept_nodes: list[str]
    size: int


def _require_optimum():
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise BackendUnavailable("ONNX export needs optimum-onnx", hint="pip install 'localcoder[onnx]'") from exc
    return main_export


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_fp32(model_dir: str | os.PathLike, out: str | os.PathLike, *, progress: bool = True) -> OnnxResult:
    """optimum-onnx export, task ``text-generation-with-past`` (a single graph with KV in/out)."""
    main_export = _require_optimum()
    from transformers import AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if progress:
            print(f"exporting {model_dir.name} to ONNX (optimum, with KV cache)…", file=sys.stderr)
        main_export(str(model_dir), str(tmp), task="text-generation-with-past", do_validation=False,
                    local_files_only=True)
        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(tmp))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OnnxResult(out, "fp32", 0, [], dir_size(out))


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def select_nodes(model, keep: Sequence[str]) -> tuple[list[str], list[str]]:
    """(block MatMul nodes to quantize, MatMul nodes kept in fp32). A node is kept when any
    ``keep`` pattern is a substring of its name, e.g. ``lm_head`` or ``layers.0/``."""
    inits = {i.name for i in model.graph.initializer}
    quant, kept = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul" or not any(i in inits for i in node.input):
            continue
        if any(k and k in node.name for k in keep) or not BLOCK_MATMUL.match(node.name):
            kept.append(node.name)
        else:
            quant.append(node.name)
    return quant, kept


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, dst / f.name)


def quantize_onnx(fp32_dir: str | os.PathLike, out: str | os.PathLike, type: str, *,
                  keep: Sequence[str] = DEFAULT_KEEP, block_size: int = 32, progress: bool = True) -> OnnxResult:
    """Quantize an fp32 export (``export_fp32``) into ``out`` as int8 or int4 (see module doc)."""
    import onnx

    if type not in ("int8", "int4"):
        raise InvalidRequest(f"ONNX quantization type must be int8 or int4, got {type!r}", param="type")
    src, out = Path(fp32_dir), Path(out)
    model_file = src / "model.onnx"
    if not model_file.exists():
        raise ModelCorrupt(f"{src} has no model.onnx")
    model = onnx.load(str(model_file), load_external_data=False)
    quant, kept = select_nodes(model, keep)
    if not quant:
        raise InvalidRequest("no transformer-block MatMul left to quantize (check --keep)", param="keep")
    large = dir_size(src) > EXTERNAL_DATA_BYTES
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if progress:
            print(f"quantizing {len(quant)} block MatMuls to {type}; kept fp32: {', '.join(kept) or 'none'}",
                  file=sys.stderr)
        bits, accuracy = (8, None) if type == "int8" else (4, 4)
        _nbits(model_file, tmp / "model.onnx", kept, block_size, large, bits, accuracy)
        _copy_side_files(src, tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OnnxResult(out, type, len(quant), kept, dir_size(out))


def _nbits(src: Path, dst: Path, exclude: list[str], block_size: int, large: bool, bits: int,
           accuracy_level: int | None) -> None:
    """Block-wise symmetric weight-only quantization into MatMulNBits (``bits`` 8 or 4): one fp32 scale per
    ``block_size`` input rows. (The quantizer's ``nodes_to_include`` widens its op-type selection instead
    of narrowing it, so the kept nodes are passed as ``nodes_to_exclude``.)"""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # one line per node
    model = onnx.load(str(src))  # with external data
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level, nodes_to_exclude=exclude)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=large)


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike, type: str = "int8", *,
                keep: Sequence[str] = DEFAULT_KEEP, fp32_dir: str | os.PathLike | None = None,
                progress: bool = True) -> OnnxResult:
    """HF dir -> ONNX of ``type`` (fp32 | int8 | int4). The fp32 export goes to ``fp32_dir`` (kept:
    the quality gate compares against it) or, for fp32, straight to ``out``."""
    type = type.lower()
    if type not in ONNX_TYPES:
        raise InvalidRequest(f"unknown ONNX type {type!r}; choose from {', '.join(ONNX_TYPES)}", param="type")
    if type == "fp32":
        return export_fp32(model_dir, out, progress=progress)
    fp32 = Path(fp32_dir) if fp32_dir else Path(out).with_name(f"{Path(out).name}-fp32")
    if not (fp32 / "model.onnx").exists():
        export_fp32(model_dir, fp32, progress=progress)
    return quantize_onnx(fp32, out, type, keep=keep, progress=progress)

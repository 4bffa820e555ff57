"""`localcoder serve`: the HTTP completion server (Starlette under uvicorn).

Settings come from the one Config (defaults < TOML file < LOCALCODER_* env < these flags). The
model is resolved (and pulled if packaged) before the socket opens, so a wrong name fails at once;
the engine then loads in the background while ``/health`` answers 503.
"""

from __future__ import annotations

import argparse
import logging
import sys

from localcoder.cli import add_model_arguments, config_from_args, open_completer

SERVER_FLAGS = ("host", "port", "api_key", "api_key_file", "cors_origins", "max_queue", "max_body_bytes",
                "insecure_no_auth", "prefix_tokens", "suffix_tokens", "extra_tokens", "max_tokens", "mode")

log = logging.getLogger("localcoder.server")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", help="bind address (default 127.0.0.1; non-loopback needs an API key)")
    g.add_argument("--port", type=int, help="TCP port (default 8765)")
    g.add_argument("--api-key", dest="api_key", help="require `Authorization: Bearer KEY` (prefer --api-key-file)")
    g.add_argument("--api-key-file", dest="api_key_file", help="file whose first line is the API key")
    g.add_argument("--cors-origin", dest="cors_origin", action="append", default=[],
                   help="allow this browser origin (repeatable; CORS is off without it)")
    g.add_argument("--max-queue", dest="max_queue", type=int, help="waiting requests before HTTP 429 (default 16)")
    g.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, help="largest request body (default 1 MB)")
    g.add_argument("--insecure-no-auth", dest="insecure_no_auth", action="store_true", default=None,
                   help="allow a non-loopback bind without an API key")
    g.add_argument("--log-level", dest="log_level", default="info", choices=["debug", "info", "warning", "error"])
    c = p.add_argument_group("completion")
    c.add_argument("--mode", choices=["auto", "single", "multi"], help="completion mode (default auto)")
    c.add_argument("--max-tokens", dest="max_tokens", type=int, help="default generated-token limit")
    c.add_argument("--prefix-tokens", dest="prefix_tokens", type=int, help="token budget before the cursor")
    c.add_argument("--suffix-tokens", dest="suffix_tokens", type=int,
                   help="token budget after the cursor (small keeps typing cheap: PSM re-reads it per keystroke)")
    c.add_argument("--extra-tokens", dest="extra_tokens", type=int, help="token budget for other files' snippets")
    add_model_arguments(p)


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from localcoder.models import resolve
    from localcoder.server.app import ServerState, create_app
    from localcoder.server.auth import check_bind, resolve_api_key

    args.cors_origins = ",".join(args.cors_origin) if args.cors_origin else None
    cfg = config_from_args(args, SERVER_FLAGS)
    check_bind(cfg.server, resolve_api_key(cfg.server))
    setup_logging(args.log_level)
    resolve(cfg.model.model, pull_if_missing=True, progress=True)  # fail fast on a wrong model name
    url = f"http://{cfg.server.host}:{cfg.server.port}"
    holder: dict[str, uvicorn.Server] = {}

    def ready(state: ServerState) -> None:
        engine = state.completer.engine  # type: ignore[union-attr]
        log.info("ready: model %s, engine %s, device %s, FIM %s, at %s", engine.model_name, engine.name,
                 engine.device, state.completer.format.name, url)  # type: ignore[union-attr]

    def fatal(exc: BaseException) -> None:
        holder["server"].should_exit = True

    app = create_app(lambda: open_completer(cfg, progress=False), cfg, on_ready=ready, on_fatal=fatal)
    log.info("loading model %s (engine %s) — serving %s; /health answers 503 until ready",
             cfg.model.model, cfg.model.engine, url)
    server = holder["server"] = uvicorn.Server(uvicorn.Config(
        app, host=cfg.server.host, port=cfg.server.port, log_level=args.log_level, access_log=False,
        timeout_graceful_shutdown=5, log_config=None))
    server.run()
    return 1 if app.state.lc.load_error is not None else 0

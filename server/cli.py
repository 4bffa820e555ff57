"""`localcoder serve`: the HTTP completion server (Starlette under uvicorn).

Settings come from the one Config (defaults < TOML file < LOCALCODER_* env < these flags). The
model is resolved (and pulled if packaged) before the socket opens, so a wrong name fails at once;
the engine then loads in the background while ``/health`` answers 503.
"""

from __future__ import annotations

import argparse
import logging
import sys

from localcoder.cli import add_model_arguments, config_from_args

log = logging.getLogger("localcoder.server")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig and CompletionConfig field (localcoder.cliargs), plus the model flags."""
    from localcoder.cliargs import add_dataclass_arguments
    from localcoder.config import CompletionConfig, ServerConfig

    g = p.add_argument_group("server")
    add_dataclass_arguments(g, ServerConfig, exclude=("cors_origins",),
                            overrides={"insecure_no_auth": {"action": "store_true"}})
    g.add_argument("--cors-origin", dest="cors_origin", action="append", default=[],
                   help="allow this browser origin (repeatable; CORS is off without it)")
    g.add_argument("--log-level", dest="log_level", default="info", choices=["debug", "info", "warning", "error"])
    add_dataclass_arguments(p.add_argument_group("completion"), CompletionConfig)
    add_model_arguments(p)


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from localcoder.completion import Completer
    from localcoder.models import resolve
    from localcoder.server.app import ServerState, create_app
    from localcoder.server.auth import check_bind, resolve_api_key
    from localcoder.server.limits import uvicorn_options
    from localcoder.specialists import open_bundle, with_bundle

    args.cors_origins = ",".join(args.cors_origin) if args.cors_origin else None
    cfg = config_from_args(args)
    check_bind(cfg.server, resolve_api_key(cfg.server))
    setup_logging(args.log_level)
    model = resolve(cfg.model.model, pull_if_missing=True, progress=True)  # fail fast on a wrong model name
    open_bundle(with_bundle(model, cfg.model))  # ... and on a broken specialist bundle or one of another base
    url = f"http://{cfg.server.host}:{cfg.server.port}"
    holder: dict[str, uvicorn.Server] = {}

    def ready(state: ServerState) -> None:
        engine = state.completer.engine  # type: ignore[union-attr]
        log.info("ready: model %s, engine %s, device %s, FIM %s, at %s", engine.model_name, engine.name,
                 engine.device, state.completer.format.name, url)  # type: ignore[union-attr]

    def fatal(exc: BaseException) -> None:
        holder["server"].should_exit = True

    app = create_app(lambda: Completer.from_config(cfg, pull=True), cfg, on_ready=ready, on_fatal=fatal)
    log.info("loading model %s (engine %s) — serving %s; /health answers 503 until ready",
             cfg.model.model, cfg.model.engine, url)
    server = holder["server"] = uvicorn.Server(uvicorn.Config(
        app, host=cfg.server.host, port=cfg.server.port, log_level=args.log_level, access_log=False,
        timeout_graceful_shutdown=5, log_config=None, **uvicorn_options(cfg.server)))
    server.run()
    return 1 if app.state.lc.load_error is not None else 0

"""`streamedit serve`: flags (generated from Settings, over STREAMEDIT_* environment variables) → uvicorn."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing

from pydantic import ValidationError

from server.settings import Settings


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per Settings field; list-valued fields take JSON."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "") + f" [env STREAMEDIT_{name.upper()}]"
        args = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is typing.Literal:
            parser.add_argument(flag, dest=name, choices=args, default=None, help=help_text)
        elif "list" in str(field.annotation):
            parser.add_argument(flag, dest=name, type=json.loads, default=None, help=help_text + " (JSON)")
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def serve(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamedit serve", description="Run the StreamEdit service.")
    add_settings_flags(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"streamedit serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from engines.client import check_engine_spec

    try:
        check_engine_spec(settings.engine_spec())
    except ValueError as exc:
        print(f"streamedit serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings, "main")
    layout = (
        f"engine process + {settings.media_workers} media worker{'s' if settings.media_workers > 1 else ''}"
        if settings.engine == "process"
        else "engine thread"
    )
    print(
        f"StreamEdit on http://{settings.host}:{settings.port} "
        f"(engine: {settings.backend}, precision {settings.precision}, {layout})",
        flush=True,
    )
    if settings.engine == "process":
        from server.supervisor import Supervisor

        try:
            return Supervisor(settings).run()
        except OSError as exc:
            print(f"streamedit serve: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
            return 2
    import uvicorn

    from server.app import create_app

    # aiortc misbehaves under uvloop: use the plain asyncio loop.
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, loop="asyncio", log_level=settings.log_level
    )
    return 0


def drop_rate_limited(record: logging.LogRecord) -> bool:
    """False for uvicorn's access-log line of a 429 answer (its args end in the status code)."""
    args = record.args
    return not (isinstance(args, tuple) and args and args[-1] == 429)


def configure_logging(settings: Settings, process: str) -> None:
    """One log format for every process of the service, each line naming its process."""
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s"
    )
    if settings.log_level != "debug":
        logging.getLogger("aioice").setLevel(logging.WARNING)  # every ICE check at INFO drowns the service log
        # A client over its rate gets a 429 for every request it sends; logging each would hand it the log too.
        # streamedit_patches_limited counts the PATCHes among them instead.
        logging.getLogger("uvicorn.access").addFilter(drop_rate_limited)

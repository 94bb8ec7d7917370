"""The ``greenchat`` command (also ``python -m chat``)."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return port


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line and exit status 2, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="greenchat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the chat server (one process, no Redis)")
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default: 0.0.0.0)")
    serve.add_argument("--port", type=_port, default=8080, help="port (default: 8080; 0: any free)")
    serve.add_argument("--backlog", type=_positive, default=None,
                       help="listen backlog (default: the kernel's net.core.somaxconn)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    # Patch first, so blocking code in user message handlers yields to other clients.
    from gevent import monkey

    monkey.patch_all()
    from .app import create_app
    from .config import ConfigError
    from .server import serve

    try:
        app = create_app()
    except ConfigError as error:
        print(f"greenchat: {error}", file=sys.stderr)
        return 2
    try:
        serve(app, args.host, args.port, args.backlog)
    except OSError as error:
        print(f"greenchat: cannot listen on {args.host}:{args.port}: {error.strerror}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # gevent-websocket logs every plain HTTP request at INFO: an access log we do not
    # want while a load generator polls /stats.
    logging.getLogger("geventwebsocket.handler").setLevel(logging.WARNING)
    return {"serve": cmd_serve}[args.command](args)

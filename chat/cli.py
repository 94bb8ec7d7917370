"""The ``greenchat`` command (also ``python -m chat``)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from dataclasses import fields
from pathlib import Path

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


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _ws_url(value: str) -> str:
    from .bench.endpoint import parse_url

    try:
        parse_url(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _peers(value: str) -> list[str]:
    from .bench.peers import parse_peers

    try:
        return parse_peers(value)
    except ValueError as error:
        hint = " (the URL goes before --compare)" if "://" in value else ""
        raise argparse.ArgumentTypeError(f"{error}{hint}") from None


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {value!r}") from None


def _message_size(value: str) -> int:
    size = int(value)
    if not 0 <= size <= 65536:
        raise argparse.ArgumentTypeError(f"must be 0-65536 bytes, got {value}")
    return size


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
    serve.add_argument("--certfile", default=None, metavar="PEM",
                       help="serve https:// and wss:// with this certificate (chain), PEM")
    serve.add_argument("--keyfile", default=None, metavar="PEM",
                       help="its private key, PEM (default: in the --certfile)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"], default=None,
                       help="text, or one JSON object per line (default: CHAT_LOG_FORMAT, "
                       "else text)")
    _add_bench(commands)
    _add_doctor(commands)
    return parser


def _add_doctor(commands) -> None:
    from .doctor import DEFAULT_CONNECTIONS

    doctor = commands.add_parser(
        "doctor", help="is this machine ready for N connections? what to change",
        description="Read the limits that stop a large websocket server (open files, "
        "file-max, nr_open, somaxconn, SYN backlog, conntrack, port range, TCP memory, "
        "max_map_count, memory, the kernel log) and say, line by line, OK or the command "
        "that fixes it. Changes nothing without --apply. Exit status 0 when ready for the "
        "target, 1 when not, 2 for bad options.")
    doctor.set_defaults(log_level="warning")
    doctor.add_argument("-n", "--connections", type=_positive, default=DEFAULT_CONNECTIONS,
                        metavar="N", help="concurrent connections to be ready for (default: "
                        f"{DEFAULT_CONNECTIONS:,}, what deploy/sysctl.d is sized for)")
    doctor.add_argument("--workers", type=_positive, default=1, metavar="W",
                        help="server processes sharing them (gunicorn workers; default 1)")
    doctor.add_argument("--clients", choices=["local", "remote"], default="local",
                        help="local: a load test from this machine, both ends of every "
                        "connection here (default); remote: clients on other machines")
    doctor.add_argument("--apply", action="store_true",
                        help="write the sysctls it recommends (root) and print old -> new")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--sysctl-conf", action="store_true",
                        help="print a /etc/sysctl.d file for the target and exit")
    doctor.add_argument("--proc-root", type=Path, default=Path("/proc"), metavar="DIR",
                        help="read (and with --apply write) this /proc tree (default: /proc)")
    doctor.add_argument("--kernel-log", type=Path, default=None, metavar="FILE",
                        help="read kernel messages from FILE instead of running dmesg")


def _add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench", help="load-test a websocket broadcast server",
        description="Open many websockets to a broadcast server from lean worker processes, "
        "send probe messages, and report connect rate, delivery latency, losses and memory. "
        "Latency is timed with CLOCK_MONOTONIC across the worker processes, so they all run "
        "on this machine. Exit status 1 when more connections failed or deliveries were lost "
        "than allowed, 2 for bad options or a plan this machine cannot carry.")
    bench.set_defaults(log_level="warning")  # libraries' INFO lines would break the table
    bench.add_argument("url", nargs="?", type=_ws_url, default="ws://127.0.0.1:8080/",
                       help="websocket URL of a server that broadcasts every text message "
                       "to every client (default: ws://127.0.0.1:8080/)")
    load = bench.add_argument_group("load")
    load.add_argument("-n", "--connections", type=_positive, default=1000, metavar="N",
                      help="connections in all (default: 1000; the maximum in step mode)")
    load.add_argument("--rate", type=_positive_float, default=None, metavar="PER_S",
                      help="new connections per second over all workers (default: as fast "
                      "as --inflight handshakes in flight per worker allow)")
    load.add_argument("--hold", type=_non_negative_float, default=5.0, metavar="SECONDS",
                      help="seconds to stay connected once all are established, sending "
                      "probes (default: 5)")
    load.add_argument("--idle", type=_non_negative_float, default=0.0, metavar="SECONDS",
                      help="seconds connected with no probes before the hold, to measure "
                      "what idle clients cost per second and take it off the CPU per "
                      "delivery (default: 0)")
    load.add_argument("--probe-rate", type=_non_negative_float, default=1.0, metavar="PER_S",
                      help="probe broadcasts per second while holding (default: 1; 0: none)")
    load.add_argument("--message-size", type=_message_size, default=0, metavar="BYTES",
                      help="pad probe messages to this many bytes (default: no padding)")
    load.add_argument("--no-echo", dest="echo", action="store_false",
                      help="the server does not send a message back to its sender")
    step = bench.add_argument_group("step mode (as websocket-shootout)")
    step.add_argument("--step-clients", type=_positive, default=None, metavar="S",
                      help="add S clients per step, up to --connections")
    step.add_argument("--step-broadcasts", type=_positive, default=10, metavar="K",
                      help="probes per step, at --probe-rate (default: 10)")
    step.add_argument("--max-p95-ms", type=_positive_float, default=250.0, metavar="MS",
                      help="stop when a step's p95 delivery latency exceeds this (default: 250)")
    storm = bench.add_argument_group(
        "reconnect storm", "once connected, restart a gunicorn server and time the clients' "
        "return: each reconnects as the web page does (backoff from 0.5 s, doubling to 30 s, "
        "with jitter); reports when 50/99/100%% were back, refusals and errors")
    storm.add_argument("--storm", choices=("hup", "kill"), default=None,
                       help="hup: SIGHUP to the master (graceful reload); kill: SIGKILL to "
                       "each of its workers (a crash)")
    storm.add_argument("--master-pid", type=_positive, default=None, metavar="PID",
                       help="the gunicorn master to restart (needed with --storm)")
    storm.add_argument("--storm-timeout", type=_positive_float, default=300.0,
                       metavar="SECONDS", help="give up waiting for all to be back "
                       "(default: 300)")
    spread = bench.add_argument_group("processes and addresses")
    spread.add_argument("--per-worker", type=_positive, default=None, metavar="N",
                        help="connections per worker process (default: the open-files "
                        "limit less 5%%)")
    spread.add_argument("--source", type=_ipv4, action="append", default=None,
                        metavar="ADDRESS", help="source address to connect from (repeat; "
                        "default: 127.0.0.2, 127.0.0.3, ... for a loopback target)")
    spread.add_argument("--per-source", type=_positive, default=None, metavar="N",
                        help="connections per source address (default: half the local "
                        "port range)")
    spread.add_argument("--inflight", type=_positive, default=200, metavar="N",
                        help="handshakes in flight per worker (default: 200)")
    spread.add_argument("--handshake-timeout", type=_positive_float, default=30.0,
                        metavar="SECONDS", help="per connection (default: 30)")
    spread.add_argument("--generator-sched", choices=("batch", "normal"), default="batch",
                        help="the load processes' scheduling policy: batch (default) lets "
                        "a woken load process wait for the server's time slice to end "
                        "instead of taking the core at once (Linux SCHED_BATCH)")
    spread.add_argument("--read-nap-ms", type=_non_negative_float, default=0.0,
                        metavar="MS", help="after a wait that found only a few messages of "
                        "a stream (or handshake answers), a load process sleeps this long "
                        "before the next: fewer wake-ups when many load processes share the "
                        "cores, latencies read up to MS late (default: 0, never)")
    spread.add_argument("--drain-timeout", type=_positive_float, default=10.0,
                        metavar="SECONDS", help="wait for late deliveries (default: 10)")
    observe = bench.add_argument_group("observing the server")
    observe.add_argument("--stats-url", type=str, default=None, metavar="URL",
                         help="greenchat /stats to poll each second (default: "
                         "http://HOST:PORT/stats of the URL)")
    observe.add_argument("--no-stats", dest="stats", action="store_false",
                         help="do not poll /stats")
    observe.add_argument("--server-pid", type=_positive, action="append", default=[],
                         metavar="PID", help="server process on this machine to read RSS "
                         "and CPU of (repeat for several workers)")
    output = bench.add_argument_group("output and verdict")
    output.add_argument("--max-failures", type=_non_negative, default=0, metavar="N",
                        help="failed or lost connections allowed (default: 0)")
    output.add_argument("--max-lost", type=_non_negative, default=0, metavar="N",
                        help="missing or duplicated deliveries allowed (default: 0)")
    output.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="write every figure and sample here")
    output.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                        help="plot connections, RSS and latency over time (needs matplotlib)")
    output.add_argument("--compare", type=_peers, nargs="?", const=["websockets"], default=[],
                        metavar="PEERS",
                        help="then run the same scenario against each of these servers, "
                        "started on a free port, and print all side by side: websockets, "
                        "picows, floor (a bare send loop; costs are then also given as "
                        "multiples of its), comma-separated (default without a list: "
                        "websockets)")
    output.add_argument("--progress", action="store_true",
                        help="a progress line every second even when stderr is not a terminal")


def cmd_serve(args: argparse.Namespace) -> int:
    # Patch first, so blocking code in user message handlers yields to other clients.
    from gevent import monkey

    monkey.patch_all()
    from .app import create_app
    from .config import ConfigError
    from .server import serve, tls_context

    try:
        app = create_app()
    except ConfigError as error:
        print(f"greenchat: {error}", file=sys.stderr)
        return 2
    context = None
    if args.keyfile and not args.certfile:
        print("greenchat: --keyfile needs --certfile", file=sys.stderr)
        return 2
    if args.certfile:
        try:
            context = tls_context(args.certfile, args.keyfile)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or error
            print(f"greenchat: cannot load the TLS certificate {args.certfile}: {reason}",
                  file=sys.stderr)
            return 2
    try:
        serve(app, args.host, args.port, args.backlog, context)
    except OSError as error:
        print(f"greenchat: cannot listen on {args.host}:{args.port}: {error.strerror}",
              file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.runner import Scenario, main

    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("greenchat bench: --plot needs matplotlib: pip install 'greenchat[bench]'",
                  file=sys.stderr)
            return 2
    if args.storm and (args.master_pid is None or args.compare or args.step_clients):
        print("greenchat bench: --storm needs --master-pid, and goes with neither --compare "
              "nor --step-clients", file=sys.stderr)
        return 2
    scenario = Scenario(**{field.name: getattr(args, field.name) for field in fields(Scenario)})
    return main(scenario, compare=args.compare, json_path=args.json, plot_path=args.plot,
                progress=args.progress or sys.stderr.isatty())


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import Target, main

    if not args.proc_root.is_dir():
        print(f"greenchat doctor: --proc-root {args.proc_root} is not a directory",
              file=sys.stderr)
        return 2
    if args.kernel_log is not None and not args.kernel_log.is_file():
        print(f"greenchat doctor: --kernel-log {args.kernel_log} is not a file", file=sys.stderr)
        return 2
    target = Target(args.connections, args.workers, args.clients == "local")
    return main(target, root=args.proc_root, apply_fixes=args.apply, as_json=args.json,
                kernel_log_path=args.kernel_log, print_conf=args.sysctl_conf)


def main(argv: list[str] | None = None) -> int:
    from .logs import configure, format_from_environ

    args = build_parser().parse_args(argv)
    configure(getattr(args, "log_format", None) or format_from_environ(),
              getattr(args, "log_level", "info"))
    # gevent-websocket logs every plain HTTP request at INFO: an access log we do not
    # want while a load generator polls /stats.
    logging.getLogger("geventwebsocket.handler").setLevel(logging.WARNING)
    return {"serve": cmd_serve, "bench": cmd_bench, "doctor": cmd_doctor}[args.command](args)

"""Where an idle websocket's memory goes: the card's naive design, one parked greenlet, greenchat.

Three servers, each a process of its own on gevent's WSGIServer, monkey-patched as
under gunicorn's gevent worker:

- ``card``: the design card as written: a Flask view (``websocket=True``) per client
  that loops on ``ws.receive()``, a gevent ``Queue`` per client in a shared set (the
  broadcast list) into which every message is put, and a writer greenlet per client
  that takes from its queue and calls ``ws.send``;
- ``parked``: the classic blocking style without the queue: the view loops on
  ``ws.receive()`` and sends each message to every client in a shared set itself (one
  greenlet per client);
- ``greenchat``: ``create_app()`` under ``chat.server.serve`` (``greenchat serve``);
- ``greenchat-deflate``: the same server, with clients that offer permessage-deflate
  (checked: ``/stats`` counts N ``deflate_connections``), and the one message sent
  compressed to all of them.

Each is started twice, with N idle connections from this process (``LoadClient``):

1. RSS: VmRSS with N connected and idle for ``--idle`` s, minus VmRSS after a warm-up
   (200 connected, one message, closed again), / N. Greenlets alive: the same difference
   of ``gc``'s count of greenlet objects, / N.
2. tracemalloc: the same two moments in a process that traces Python allocations (its
   own bookkeeping is not counted), the difference grouped by the source line that
   allocated, / N: the top ``--top`` lines and the total. tracemalloc sees Python's
   allocator only; a greenlet's saved C stack is counted where it was copied, and what
   the kernel holds per socket is in neither figure.

Before the connections close, one client sends one message and every client must get it
(else: exit 1), so the figures are of live connections.

    .venv/bin/python bench/conn_memory.py -n 2000 --json out.json
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--serve" in sys.argv:
    from gevent import monkey  # before anything imports socket or threading

    monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
import urllib.request  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from chat.bench.loadclient import LoadClient  # noqa: E402
from _harness import memory_server  # noqa: E402
from idle_broadcast import BenchError, environment  # noqa: E402

VARIANTS = ("card", "parked", "greenchat", "greenchat-deflate")
WARMUP = 200
SOURCE = "127.0.0.2"


# -- the servers (run with --serve, each in a process of its own) ------------------------

def card_app():
    """The design card: a greenlet per client on ws.receive(), a Queue and a writer greenlet."""
    import gevent
    from flask import Flask, request
    from gevent.queue import Queue

    app = Flask("card")
    queues: set[Queue] = set()  # the shared broadcast list: one queue per client

    def write(ws, queue: Queue) -> None:
        for message in queue:
            ws.send(message)

    @app.route("/", websocket=True)
    def chat():
        ws = request.environ["wsgi.websocket"]
        queue: Queue = Queue()
        queues.add(queue)
        writer = gevent.spawn(write, ws, queue)
        try:
            while (message := ws.receive()) is not None:
                for each in queues:
                    each.put(message)
        finally:
            queues.discard(queue)
            writer.kill()
        return ""

    return app


def parked_app():
    """One greenlet per client parked in ws.receive(), sending to everyone itself."""
    from flask import Flask, request

    app = Flask("parked")
    sockets: set = set()

    @app.route("/", websocket=True)
    def chat():
        ws = request.environ["wsgi.websocket"]
        sockets.add(ws)
        try:
            while (message := ws.receive()) is not None:
                for each in list(sockets):
                    each.send(message)
        finally:
            sockets.discard(ws)
        return ""

    return app


def add_memory_route(app) -> None:
    """GET /_memory: RSS, greenlets and (when tracing) allocations, each against ?mark."""
    from flask import jsonify, request
    from greenlet import greenlet

    marked: dict = {}

    def memory():
        gc.collect()
        with open("/proc/self/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        greenlets = sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet))
        snapshot = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
        if "mark" in request.args:
            marked.update(rss=rss, greenlets=greenlets, snapshot=snapshot)
            return jsonify(rss_kb=rss, greenlets=greenlets)
        answer = {"rss_kb": rss - marked["rss"], "greenlets": greenlets - marked["greenlets"]}
        if snapshot is not None:
            ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
            diff = snapshot.filter_traces(ignore).compare_to(
                marked["snapshot"].filter_traces(ignore), "lineno")
            answer["traced_bytes"] = sum(stat.size_diff for stat in diff)
            answer["lines"] = [[f"{_short(stat.traceback[0].filename)}:{stat.traceback[0].lineno}",
                                stat.size_diff, stat.count_diff] for stat in diff]
        return jsonify(answer)

    app.add_url_rule("/_memory", "memory", memory)


def _short(filename: str) -> str:
    """A source path from its package (or standard-library module) on, for the table."""
    for marker in ("/site-packages/", f"/python{sys.version_info[0]}.{sys.version_info[1]}/"):
        if marker in filename:
            return filename.rsplit(marker, 1)[1]
    root = f"{HERE.parent}/"
    return filename[len(root):] if filename.startswith(root) else filename


def serve(variant: str, port: int, trace: bool) -> None:
    if trace:
        tracemalloc.start(1)
    if variant.startswith("greenchat"):
        from chat import create_app
        from chat.server import serve as serve_greenchat

        app = create_app({"CHAT_PAGE": False})
        add_memory_route(app)
        serve_greenchat(app, "127.0.0.1", port)
        return
    from gevent.pywsgi import WSGIServer
    from geventwebsocket.handler import WebSocketHandler

    app = card_app() if variant == "card" else parked_app()
    add_memory_route(app)
    WSGIServer(("127.0.0.1", port), app, handler_class=WebSocketHandler, log=None).serve_forever()


# -- the measurement ---------------------------------------------------------------------

def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
        return json.loads(response.read())


def connect(port: int, n: int, deflate: bool = False) -> LoadClient:
    client = LoadClient("127.0.0.1", port, deflate=deflate)
    result = client.connect(n, [SOURCE], timeout=120)
    if not result.ok:
        client.close()
        raise BenchError(f"connections failed: {result.failures}")
    return client


def one_message_to_all(client: LoadClient) -> None:
    # 1,000 bytes (x-padded): compressed for the clients that agreed to deflate.
    if client.send_probe(1, 1000) is None:
        raise BenchError("no connection left to send from")
    result = client.expect(1, timeout=60)
    if not result.ok:
        raise BenchError(f"one message did not reach every client: {result}")


def measure(variant: str, n: int, trace: bool, args: argparse.Namespace, logdir: Path) -> dict:
    name = f"{variant}-{'trace' if trace else 'rss'}"
    server, port = memory_server(name, "greenchat" if variant.startswith("greenchat") else variant,
                                 logdir, trace)
    client = None
    try:
        deflate = variant == "greenchat-deflate"
        warm = connect(port, WARMUP, deflate)
        one_message_to_all(warm)
        warm.close()
        time.sleep(args.idle)  # the server notices the closes and ends their greenlets
        get_json(port, "/_memory?mark")
        client = connect(port, n, deflate)
        time.sleep(args.idle)
        memory = get_json(port, "/_memory")
        if deflate and (agreed := get_json(port, "/stats")["deflate_connections"]) != n:
            raise BenchError(f"the server agreed to compress with {agreed} of {n} clients")
        one_message_to_all(client)
        # + 0.0: a difference of -0.0 (a greenlet fewer in 5,000) prints as 0.00
        result = {"rss_kb_per_connection": memory["rss_kb"] / n,
                  "greenlets_per_connection": round(memory["greenlets"] / n, 2) + 0.0}
        if trace:
            result["traced_kb_per_connection"] = memory["traced_bytes"] / 1024 / n
            result["lines"] = [{"line": line, "kb_per_connection": size / 1024 / n,
                                "objects_per_connection": count / n}
                               for line, size, count in memory["lines"][:args.top]]
        return result
    finally:
        if client is not None:
            client.close()
        server.stop()


def print_table(results: dict, n: int) -> None:
    print(f"\n{n} idle connections per server; per connection:\n")
    print("| variant | KB RSS | greenlets | KB traced (Python allocations) |")
    print("|---|---|---|---|")
    for variant, result in results.items():
        print(f"| {variant} | {result['rss']['rss_kb_per_connection']:.2f} | "
              f"{result['rss']['greenlets_per_connection']:.2f} | "
              f"{result['trace']['traced_kb_per_connection']:.2f} |")
    for variant, result in results.items():
        print(f"\n{variant}: where the traced allocations are (KB per connection, source line)")
        for line in result["trace"]["lines"]:
            print(f"  {line['kb_per_connection']:6.2f}  {line['objects_per_connection']:5.1f} objects"
                  f"  {line['line']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=2000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle before measuring")
    parser.add_argument("--top", type=int, default=10, help="source lines shown per variant")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.trace)
        return 0
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if not 0 < args.connections <= 15000:
        parser.error("--connections must be 1 to 15000 (one process holds them all)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="conn-memory-") as logdir:
        try:
            for variant in variants:
                results[variant] = {
                    "rss": measure(variant, args.connections, False, args, Path(logdir)),
                    "trace": measure(variant, args.connections, True, args, Path(logdir))}
        except BenchError as error:
            print(f"conn_memory: {error}", file=sys.stderr)
            return 1
    print_table(results, args.connections)
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "connections": args.connections,
            "environment": environment(), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""gunicorn settings for greenchat: ``gunicorn -c gunicorn.conf.py``.

Every setting can be overridden from the environment (names below) or the command line.
"""

import os

# GUNICORN_PRELOAD=1: the master loads the app once and the workers are forked from it.
# gevent must then patch the standard library before anything imports it (ssl above
# all), here in the master, or the workers run with unpatched modules (gevent's
# MonkeyPatchWarning).
preload_app = bool(int(os.environ.get("GUNICORN_PRELOAD", "0")))
if preload_app:
    from gevent import monkey
    monkey.patch_all()

import gc  # noqa: E402
import logging  # noqa: E402

from chat.system import listen_backlog, max_clients_per_process
from chat.logs import format_from_environ, gunicorn_config
from chat.views import hub_of

# --- What to run -------------------------------------------------------------------
wsgi_app = os.environ.get("GUNICORN_APP", "chat.wsgi:app")
# gevent-websocket's worker (the card's GeventWebSocketWorker) plus a close frame 1001 to
# every client on graceful shutdown; see chat/worker.py.
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "chat.worker.GreenchatWorker")

# --- Where -------------------------------------------------------------------------
bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8080").split(",")
# What the kernel grants (net.core.somaxconn); gevent's default of 128 drops SYNs under
# a connection storm.
backlog = int(os.environ.get("GUNICORN_BACKLOG", listen_backlog()))

# --- How many ----------------------------------------------------------------------
# One gevent worker uses one core and holds ~19,900 clients (open files). More than one
# needs the Redis backplane (CHAT_REDIS_URL) so a message reaches every worker's clients:
# with it the default is one worker per core, without it one worker.
_default_workers = (os.cpu_count() or 1) if os.environ.get("CHAT_REDIS_URL") else 1
workers = int(os.environ.get("GUNICORN_WORKERS",
                             os.environ.get("WEB_CONCURRENCY", _default_workers)))
# Several workers: each gets its own SO_REUSEPORT listening socket, so the kernel spreads
# connections evenly by address hash and one connection wakes one worker, instead of all
# of them racing for a shared socket. Needs a fixed port (with port 0 each worker would
# get a different one), so on_starting decides, once command-line options are known.
# GUNICORN_REUSE_PORT=0/1 forces it.
reuse_port = bool(int(os.environ.get("GUNICORN_REUSE_PORT", "0")))
# gunicorn's default of 1000 would silently cap clients per worker; each client costs one
# file descriptor, so the open-files limit is the real ceiling.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS",
                                        max_clients_per_process()))

# --- Lifecycle ---------------------------------------------------------------------
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "10"))
# gunicorn >= 24 would otherwise create a control socket under ~/.gunicorn/.
control_socket_disable = True

# --- Logging -----------------------------------------------------------------------
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
accesslog = None  # one line per handshake costs CPU at a million connections
errorlog = "-"
# gunicorn's lines and greenchat's through one stderr handler: gunicorn's own text format,
# or one JSON object per line with CHAT_LOG_FORMAT=json (chat/logs.py). It replaces
# gunicorn's handlers, so --error-logfile is ignored: redirect stderr (systemd's journal).
logconfig_dict = gunicorn_config(format_from_environ(), loglevel)


def on_starting(server):
    if "GUNICORN_REUSE_PORT" not in os.environ:
        fixed_ports = all(not address.endswith(":0") for address in server.cfg.bind)
        server.cfg.set("reuse_port", server.cfg.workers > 1 and fixed_ports)
    if server.cfg.workers > 1 and not os.environ.get("CHAT_REDIS_URL"):
        raise SystemExit(
            f"greenchat: {server.cfg.workers} workers need CHAT_REDIS_URL (the Redis "
            "backplane): without it a message reaches only the clients of the worker that "
            "received it")


def pre_fork(server, worker):
    if server.cfg.preload_app:
        # What the master holds (the app above all) is left out of the workers' garbage
        # collections, so they never write to its pages and keep sharing them (the
        # recipe of the gc.freeze documentation).
        gc.freeze()


def post_worker_init(worker):
    # Connect the backplane as the worker boots, not on its first client, so every worker
    # listens to Redis and reports its figures from the start.
    hub = hub_of(worker.wsgi)
    if hub is not None:
        hub.start()
    _log_worker_start(worker, hub)


def _address(name, tls: bool) -> str:
    if isinstance(name, tuple):
        return f"{'https' if tls else 'http'}://{name[0]}:{name[1]}"
    return f"unix:{name}"


def _log_worker_start(worker, hub) -> None:
    """One line per worker start, the equivalent of greenchat serve's: where, how many,
    the limits and the backplane (fields of their own in JSON lines)."""
    # The gevent worker holds gevent sockets (no gunicorn __str__): name them by address.
    bind = [_address(sock.getsockname(), worker.cfg.is_ssl) for sock in worker.sockets]
    backplane = hub.backplane.describe() if hub is not None else "none (not a greenchat app)"
    logging.getLogger("chat.worker").info(
        "greenchat worker %d ready on %s (pid %d, %d workers, max %d clients, backlog %d, "
        "backplane: %s)", worker.age, ", ".join(bind), worker.pid, worker.cfg.workers,
        worker.worker_connections, worker.cfg.backlog, backplane,
        extra={"bind": bind, "pid": worker.pid, "worker": worker.age,
               "workers": worker.cfg.workers, "max_clients": worker.worker_connections,
               "backlog": worker.cfg.backlog, "backplane": backplane,
               "tls": worker.cfg.is_ssl})

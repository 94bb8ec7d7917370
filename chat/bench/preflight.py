"""Before a load test: the host checks (``chat.checks``) sized for the run it plans.

``greenchat bench`` runs these for its plan before it connects, and the bench scripts
(``bench/``) for theirs; a fatal one stops the run with its fix. ``greenchat doctor``
sizes the same checks for a server's target instead (chat/doctor.py).
"""

from __future__ import annotations

from pathlib import Path

from ..checks import (KERNEL_KB_PER_SOCKET, Check, check_conntrack, check_file_max,
                      check_memory, check_open_files, check_port_range, check_somaxconn,
                      check_syn_backlog, check_tcp_ehash)
from ..system import PROC

__all__ = ["run_checks"]


def run_checks(*, connections: int, per_process: int, in_flight: int, per_source: int,
               sockets_per_connection: int = 2, generator_kb_per_connection: float = 1.5,
               reserved: int = 64, root: Path = PROC) -> list[Check]:
    """Every check for a planned run. ``per_process`` connections in the busiest process
    on this machine, which keeps ``reserved`` files of its own. ``sockets_per_connection``
    is 2 when the server is on this machine (loopback), 1 when only the client end is
    here."""
    sockets = connections * sockets_per_connection
    checks = [
        check_open_files(root, per_process, reserved),
        check_somaxconn(root, in_flight),
        check_syn_backlog(root, in_flight),
        check_conntrack(root, connections),
        check_port_range(root, per_source),
        check_file_max(root, sockets),
        check_tcp_ehash(root, sockets),
        check_memory(root, connections, generator_kb_per_connection
                     + KERNEL_KB_PER_SOCKET * sockets_per_connection),
    ]
    return [check for check in checks if check is not None]

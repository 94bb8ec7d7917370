"""How many load processes, and which source addresses each connects from.

Two limits shape a large run (docs/design.md): one process can hold only as many
sockets as its open-files limit allows (20,000 here, not raisable), and one source
address can make only as many connections to one destination as the local port range has
ports (28,232 here). So N connections become ceil(N / per_worker) processes, and a list of
(source address, connections) pairs for each, cut from one sequence of addresses so no
(address, destination) pair is used beyond ``per_source`` across all processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BenchError
from .loadclient import source_addresses

__all__ = ["Plan", "make_plan", "split", "per_process_limit", "default_per_source"]

Sources = list[tuple[str, int]]


def split(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` near-equal integers, larger first; never decreases as ``n`` grows."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def per_process_limit(hard_open_files: int) -> int:
    """Connections one load process may hold: the hard open-files limit less 5% (at least
    64) for its own files. Load processes raise their soft limit to the hard one."""
    return hard_open_files - max(64, hard_open_files // 20)


def default_per_source(port_range_size: int) -> int:
    """Connections per (source address, destination): half the local port range.

    The kernel searches for a free port on every connect(); in a nearly full range that
    search gets long, and addresses in 127.0.0.0/8 cost nothing, so keep the range half
    empty.
    """
    return max(1, port_range_size // 2)


@dataclass(frozen=True)
class Plan:
    """``quotas[i]`` connections at most for load process i, from ``sources[i]`` (None: no bind).

    ``per_worker`` is the most connections one process holds (``--per-worker``).
    """

    connections: int
    per_worker: int
    per_source: int
    quotas: list[int]
    sources: list[Sources | None]

    @property
    def processes(self) -> int:
        return len(self.quotas)

    @property
    def addresses(self) -> int:
        """Distinct source addresses in use (0 when the kernel picks)."""
        return len({address for mine in self.sources if mine for address, _ in mine})


def make_plan(connections: int, per_worker: int, per_source: int,
              sources: list[str] | None, loopback: bool) -> Plan:
    """Spread ``connections`` over load processes and source addresses.

    ``sources``: the addresses to connect from (real interfaces); None picks 127.0.0.2,
    127.0.0.3, ... when the target is on loopback, and no bind (the kernel's choice, one
    address) otherwise.
    """
    processes = math.ceil(connections / per_worker)
    quotas = split(connections, processes)
    if sources is None and not loopback:
        return Plan(connections, per_worker, per_source, quotas, [None] * processes)
    needed = math.ceil(connections / per_source)
    if sources is None:
        sources = source_addresses(0, needed)
    elif len(sources) < needed:
        raise BenchError(f"{connections} connections need {needed} source addresses at "
                         f"{per_source} per address (the local port range); --source gives "
                         f"{len(sources)}", status=2)
    # One sequence of (address, capacity), cut into consecutive pieces, one per process.
    supply = [[address, per_source] for address in sources]
    position = 0
    per_process_sources: list[Sources | None] = []
    for quota in quotas:
        mine: Sources = []
        while quota > 0:
            address, left = supply[position]
            take = min(quota, left)
            mine.append((address, take))
            quota -= take
            supply[position][1] -= take
            if supply[position][1] == 0:
                position += 1
        per_process_sources.append(mine)
    return Plan(connections, per_worker, per_source, quotas, per_process_sources)

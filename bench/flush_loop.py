"""The Python cost per member of the hub's flush loops, without the send itself.

A room's flush hands each member the frame: the plain loop (no client agreed to
permessage-deflate), or ``chat.hub._send_mixed`` (some did), which reads each member's
``codec.deflate`` and gives those that agreed the compressed twin, made once. To see
what that costs apart from the kernel's share, every member here is a real
``Connection`` on a socket pair whose state is CLOSED, so ``send_bytes`` returns at its
first check: what is left is the loop. Prints the median over ``--reps`` flushes, in ns
per member, and what one ``compress_frame`` of the frame costs. The last line is the
whole of ``Hub.deliver`` + ``Hub.flush`` of one message to a room of those members
(the per-room work included: the JSON endpoint's checks, ids), to compare versions.

    .venv/bin/python bench/flush_loop.py -n 3000
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat.connection import CLOSED, Connection  # noqa: E402
from chat.hub import Hub, _send_mixed  # noqa: E402
from chat.protocol import compress_frame, encode_text  # noqa: E402


def closed_members(hub: Hub, n: int, deflate: int | None, keep: list) -> list[Connection]:
    members = []
    for _ in range(n):
        ours, theirs = socket.socketpair()
        keep.append(theirs)
        connection = Connection(ours, hub, "", deflate=deflate)
        connection.state = CLOSED
        members.append(connection)
    return members


def ns_per_member(flush, n: int, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter_ns()
        flush()
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--members", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=200, help="flushes timed per loop")
    parser.add_argument("--message-size", type=int, default=125)
    args = parser.parse_args(argv)
    if not 1 <= args.members <= 9000 or args.reps < 1:
        parser.error("--members must be 1-9000 (two descriptors each) and --reps positive")
    hub = Hub()
    keep: list[socket.socket] = []
    plain = closed_members(hub, args.members, None, keep)
    deflating = closed_members(hub, args.members, 15, keep)
    frame = encode_text("p0 ".ljust(args.message_size, "x"))

    def plain_loop() -> None:  # the flush's loop while no client agreed (chat/hub.py)
        for connection in list(plain):
            connection.send_bytes(frame)

    n, reps = args.members, args.reps
    print(f"{n} members, {len(frame)}-byte frame, median of {reps} flushes, ns per member:")
    print(f"  plain loop:                      {ns_per_member(plain_loop, n, reps):6.1f}")
    print(f"  mixed loop, every member plain:  "
          f"{ns_per_member(lambda: _send_mixed(list(plain), [frame], frame), n, reps):6.1f}")
    print(f"  mixed loop, every member deflate: "
          f"{ns_per_member(lambda: _send_mixed(list(deflating), [frame], frame), n, reps):5.1f}"
          " (one compress_frame included)")
    started = time.perf_counter_ns()
    for _ in range(reps):
        compress_frame(frame, 15)
    print(f"compress_frame: {(time.perf_counter_ns() - started) / reps / 1000:.1f} us")
    hub.rooms["room"] = set(plain)

    def hub_flush() -> None:  # one message published and flushed, as the hub does it
        hub.deliver(text, "room")
        hub.flush()

    text = "p0 ".ljust(args.message_size, "x")
    print(f"  Hub.deliver + Hub.flush, plain:  {ns_per_member(hub_flush, n, reps):6.1f}")
    for sock in keep:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

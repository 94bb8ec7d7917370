"""A long chaos soak of a real ``greenchat serve``: tests/chaos.py's run, with a seed, a
step count and a duration of your choice (CI runs 200 steps in tests/test_chaos.py).

    .venv/bin/python bench/soak.py --seed 7 --steps 100000 --minutes 30

It stops at the first failure (exit status 1) with the seed and the step that reproduce
it, the last actions and the server's log; otherwise, at the step count or the duration,
whichever comes first, it runs the end checks and prints the counts (how many hostile
actions of each kind, messages, the server's /stats counters) as JSON, also to --json.
It prints the counts so far every minute. The server and every client run on this
machine, on 127.0.0.0/8, and both want a core: run it alone (``flock
/work/wt/bench.lock`` where machines are shared).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import chaos  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7, help="what every random choice follows")
    parser.add_argument("--steps", type=int, default=100_000, help="at most this many steps")
    parser.add_argument("--minutes", type=float, default=30.0, help="at most this long")
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args(argv)
    try:
        report = chaos.run(args.seed, args.steps, args.minutes * 60,
                           log=lambda line: print(line, flush=True))
    except chaos.ChaosFailure as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

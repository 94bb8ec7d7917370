#!/usr/bin/env bash
# Issue 3's acceptance figures for the load generator itself: 18,000 idle connections
# against `greenchat serve`, three runs; each run's JSON goes to bench/results/.
# Usage: bench/generator_18k.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.venv/bin/greenchat serve --host 127.0.0.1 --port "$port" --log-level warning &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$port/stats" >/dev/null && break; sleep 0.2; done
mkdir -p bench/results
for run in $(seq 1 "$runs"); do
    .venv/bin/greenchat bench "ws://127.0.0.1:$port/" -n 18000 --hold 3 --probe-rate 1 \
        --server-pid "$server" --json "bench/results/$(date +%F)-generator-18k-run$run.json"
    sleep 3
done

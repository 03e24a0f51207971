#!/usr/bin/env bash
# Run every row of the performance table once; JSON lines go to stdout and to
# bench/out/results-<UTC time>.jsonl. `bench/all.sh --quick` runs them at a modest
# size first (a minute or two); extra arguments go to every run (e.g. --runs 3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z $PY ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
quick=0
if [[ ${1:-} == --quick ]]; then quick=1; shift; fi
mkdir -p "$ROOT/bench/out"
OUT="$ROOT/bench/out/results-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
run() { "$PY" "$ROOT/bench/run.py" "$@" --output "$OUT"; }
# The connect-rate row also runs the do-nothing server, alternating: the ceiling.
FLOOR="floor=$PY $ROOT/bench/floor_server.py {port} {workers}"

run calibrate "$@"
if ((quick)); then
    run fanout --clients 100 --search --step-seconds 3 "$@"
    run latency --clients 200 --rate 100 --seconds 5 "$@"
    run idle-memory --connections 1000 "$@"
    run connect-rate --workers 2 --seconds 3 --target rango --target "$FLOOR" "$@"
    run burst --readers 20 --events 2000 "$@"
else
    run fanout --clients 1000 --search "$@"
    run fanout --clients 5000 --search --start-rate 20 "$@"
    run latency --clients 1000 --rate 100 --seconds 20 "$@"
    run idle-memory --connections 10000 "$@"
    run connect-rate --workers 2 --seconds 5 --target rango --target "$FLOOR" "$@"
    run burst --readers 100 --events 10000 "$@"
fi
echo "results: $OUT" >&2

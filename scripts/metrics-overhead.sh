#!/usr/bin/env bash
# What recording metrics costs: attune serve on the default model with
# server.metrics on and off, alternately (on, off, on, off), each driven by
# attune-loadtest at the same concurrency (streaming, greedy, fixed length);
# prints the reports side by side with the ratios to the first.
#
#   scripts/metrics-overhead.sh [--threads N] [--concurrency C] [--requests N] [--max-tokens N]
set -euo pipefail
cd "$(dirname "$0")/.."

threads=$(nproc)
concurrency=4
requests=32
max_tokens=128
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    *) echo "metrics-overhead: unknown flag $1" >&2; exit 2 ;;
  esac
done

./scripts/fetch-model.sh >/dev/null
cargo build --release -p attune-server -p attune-loadtest
attune=target/release/attune
loadtest=target/release/attune-loadtest

out=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

run_one() { # label metrics(true|false)
  "$attune" serve --port 18090 --threads "$threads" --no-aligner --store "$out/store.sqlite3" \
    --set adapters.dir="$out/adapters" --set server.metrics="$2" 2>>"$out/attune.log" &
  pid=$!
  for _ in $(seq 1 600); do
    curl -sf http://127.0.0.1:18090/ready >/dev/null 2>&1 && break
    sleep 0.5
  done
  echo "metrics-overhead: $1 (server.metrics=$2)" >&2
  "$loadtest" --url http://127.0.0.1:18090 --concurrency "$concurrency" --requests "$requests" \
    --max-tokens "$max_tokens" --temperature 0 --stream --quiet --json "$out/$1.json" >&2
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

run_one on-1 true
run_one off-1 false
run_one on-2 true
run_one off-2 false

echo "concurrency $concurrency, $requests requests, max_tokens $max_tokens, $threads threads"
"$loadtest" --compare "on-1=$out/on-1.json" "off-1=$out/off-1.json" \
  "on-2=$out/on-2.json" "off-2=$out/off-2.json"
echo "(reports: $out)"

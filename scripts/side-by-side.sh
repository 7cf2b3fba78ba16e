#!/usr/bin/env bash
# attune next to llama.cpp's llama-server on the same GGUF, same thread count,
# driven by attune-loadtest at concurrency 1 and 8 (streaming, greedy), one
# server at a time; prints one table with both and the ratios.
#
#   scripts/side-by-side.sh [--threads N] [--requests N] [--max-tokens N]
#
# llama-server is built once from the llama.cpp sources vendored in the
# llama-cpp-python sdist (pip download --no-binary), CPU, Release, and cached
# in $ATTUNE_CACHE_DIR/llama.cpp (default ~/.cache/attune/llama.cpp). It needs
# cmake and a C++ compiler (Debian: apt-get install cmake g++).
set -euo pipefail
cd "$(dirname "$0")/.."

threads=$(nproc)
requests=24
max_tokens=128
llama_version=0.3.16
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    --llama-cpp-python) llama_version=$2; shift 2 ;;
    *) echo "side-by-side: unknown flag $1" >&2; exit 2 ;;
  esac
done

cache=${ATTUNE_CACHE_DIR:-$HOME/.cache/attune}
gguf=$(./scripts/fetch-model.sh | tail -1)
cargo build --release -p attune-server -p attune-loadtest
attune=target/release/attune
loadtest=target/release/attune-loadtest

build_dir=$cache/llama.cpp/$llama_version
server_bin=$build_dir/build/bin/llama-server
if [ ! -x "$server_bin" ]; then
  command -v cmake >/dev/null || { echo "side-by-side: cmake is needed (apt-get install cmake)" >&2; exit 1; }
  echo "side-by-side: building llama-server from llama-cpp-python $llama_version (once)" >&2
  mkdir -p "$build_dir"
  tmp=$(mktemp -d)
  python3 -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$llama_version" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  rm -rf "$build_dir/src"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$build_dir/src"
  rm -rf "$tmp"
  cmake -S "$build_dir/src" -B "$build_dir/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF >&2
  cmake --build "$build_dir/build" --target llama-server -j "$(nproc)" >&2
fi

out=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_ready() { # url
  for _ in $(seq 1 600); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "side-by-side: $1 never answered" >&2; exit 1
}

measure() { # label url extra-json
  for c in 1 8; do
    echo "side-by-side: $1 at concurrency $c" >&2
    "$loadtest" --url "$2" --concurrency "$c" --requests "$requests" --max-tokens "$max_tokens" \
      --temperature 0 --stream --quiet --extra "$3" --json "$out/$1-c$c.json" >&2
  done
}

# attune: no aligner, no admin API; its own store in the scratch folder.
"$attune" serve --port 18080 --threads "$threads" --no-aligner --store "$out/store.sqlite3" \
  --set adapters.dir="$out/adapters" --set engine.max_running=8 2>"$out/attune.log" &
pid=$!
wait_ready http://127.0.0.1:18080/ready
measure attune http://127.0.0.1:18080 '{}'
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=

# llama-server: 8 slots sharing a context of 8 x 2048, prompt cache off.
"$server_bin" -m "$gguf" --host 127.0.0.1 --port 18081 -t "$threads" -tb "$threads" \
  -np 8 -c 16384 --no-webui 2>"$out/llama-server.log" &
pid=$!
wait_ready http://127.0.0.1:18081/health
measure llama-server http://127.0.0.1:18081 '{"cache_prompt": false}'
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=

for c in 1 8; do
  echo
  echo "concurrency $c, $requests requests, max_tokens $max_tokens, $threads threads, $(basename "$gguf")"
  "$loadtest" --compare "attune=$out/attune-c$c.json" "llama-server=$out/llama-server-c$c.json"
done
echo "(reports: $out)"

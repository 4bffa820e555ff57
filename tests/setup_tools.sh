#!/usr/bin/env bash
# Installs the non-Python tools the integration tests drive (editors, node packages). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
for script in tests/setup.d/*.sh; do
  [ -e "$script" ] || continue
  bash "$script"
done

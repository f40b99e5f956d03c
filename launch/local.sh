#!/usr/bin/env bash
# Train on this machine: launch/local.sh CONFIG --workdir=DIR [--config.key=value ...]
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: launch/local.sh CONFIG --workdir=DIR [--config.key=value ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
config=$1; shift
exec "$PY" -m m3jax.train --config="$config" "$@"

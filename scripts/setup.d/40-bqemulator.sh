#!/usr/bin/env bash
# The BigQuery emulator for tests/test_bigquery.py: bqemulator in its own virtual environment
# .venvs/bqemulator (its sqlglot pin conflicts with fakesnow's in .venv). It also needs numpy,
# which it does not declare. Idempotent: does nothing when the pinned version is installed.
set -euo pipefail
cd "$(dirname "$0")/../.."

BQEMULATOR_VERSION=1.4.0
venv=.venvs/bqemulator
python=python3

installed() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$BQEMULATOR_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("bqemulator") == sys.argv[1]
import numpy  # noqa: F401
EOF
}

if installed; then
  echo "bqemulator $BQEMULATOR_VERSION: already in $venv"
  exit 0
fi

mkdir -p .venvs
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "bqemulator==$BQEMULATOR_VERSION" numpy 2>&1 \
  | grep -v "^WARNING: Location" || true
if ! installed; then
  echo "failed to install bqemulator $BQEMULATOR_VERSION and numpy into $venv" >&2
  exit 1
fi
echo "bqemulator $BQEMULATOR_VERSION: installed in $venv"

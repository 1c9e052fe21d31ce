#!/usr/bin/env bash
# Installs the example third-party plugin package contrib/ingestd-files into .venv (editable),
# exactly as a user would install a plugin: its `ingestd` entry point then makes connector type
# `files` available, and tests/test_contrib_files.py runs the package's own test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! out=$(.venv/bin/python -m pip install -q --disable-pip-version-check -e contrib/ingestd-files 2>&1); then
  echo "$out" >&2
  exit 1
fi

#!/usr/bin/env bash
# The Databricks stand-in for tests/test_databricks.py: Apache Spark's Thrift JDBC/ODBC server
# (HiveThriftServer2, which speaks the TCLIService protocol the Databricks SQL connector uses),
# from the pyspark wheel in its own virtual environment .venvs/pyspark (about 500 MB; it ships
# the thrift-server jar, Hive 2.3 and Derby), run by Java 17 (installed with apt when missing).
# Idempotent: does nothing when the pinned version and a Java 17+ are there.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYSPARK_VERSION=4.3.0
venv=.venvs/pyspark
python=python3

java_ok() {
  command -v java >/dev/null 2>&1 || return 1
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  [ -n "$v" ] && [ "$v" -ge 17 ]
}

if ! java_ok; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing openjdk-17-jre-headless (the Spark Thrift server runs on it)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >/dev/null
  java_ok || { echo "Java 17 is still missing after installing openjdk-17-jre-headless" >&2; exit 1; }
fi

installed() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$PYSPARK_VERSION" <<'PY' >/dev/null 2>&1
import sys, glob, os
from importlib.metadata import version
assert version("pyspark") == sys.argv[1]
import pyspark
jars = os.path.join(os.path.dirname(pyspark.__file__), "jars")
assert glob.glob(os.path.join(jars, "spark-hive-thriftserver_*.jar"))
PY
}

if installed; then
  echo "pyspark $PYSPARK_VERSION: already in $venv"
  exit 0
fi

mkdir -p .venvs
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "pyspark==$PYSPARK_VERSION" 2>&1 \
  | grep -v "^WARNING: Location" || true
if ! installed; then
  echo "failed to install pyspark $PYSPARK_VERSION (with its Thrift server jar) into $venv" >&2
  exit 1
fi
echo "pyspark $PYSPARK_VERSION: installed in $venv"

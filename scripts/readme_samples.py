"""Copy every built-in plugin's sample configuration (the indented `[connections.NAME]` or
`[sinks.NAME]` block of its module docstring) into README.md between the sample markers.

    python scripts/readme_samples.py          # rewrite README.md
    python scripts/readme_samples.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- samples:begin -->", "<!-- samples:end -->"
MODULES = ["ingestd.plugins.duckdb.connector", "ingestd.plugins.redshift.connector", "ingestd.plugins.snowflake.connector", "ingestd.plugins.bigquery.connector",
           "ingestd.plugins.databricks.connector",
           "ingestd.plugins.duckdb_sink.sink", "ingestd.plugins.sqlite_sink.sink"]


def sample(module_name: str) -> str:
    doc = importlib.import_module(module_name).__doc__ or ""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith(("[connections.", "[sinks."))), None)
    if start is None:
        raise SystemExit(f"{module_name}: no sample configuration block in its docstring")
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip()


def render() -> str:
    parts = [BEGIN]
    for name in MODULES:
        parts.append(f"\n`{name.replace('.', '/')}.py`:\n\n```toml\n{sample(name)}\n```")
    parts.append(END)
    return "\n".join(parts)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    updated = head + render() + tail
    if "--check" in sys.argv:
        if updated != readme:
            print("README.md's plugin samples are out of date: run python scripts/readme_samples.py")
            return 1
        return 0
    (ROOT / "README.md").write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())

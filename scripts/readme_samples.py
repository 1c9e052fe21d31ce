"""Copy every built-in plugin's sample configuration (`plugins/NAME/sample.toml`) into
README.md between the sample markers: connectors first, then sinks, then observers, each by name.

    python scripts/readme_samples.py          # rewrite README.md
    python scripts/readme_samples.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- samples:begin -->", "<!-- samples:end -->"
SECTIONS = ("[connections.", "[sinks.", "[observers.")


def section(text: str) -> str:
    """The sample's table header: `[connections.NAME]`, `[sinks.NAME]` or `[observers.NAME]`."""
    for line in text.splitlines():
        if line.startswith(SECTIONS):
            return line.strip()
    raise ValueError("no [connections.NAME], [sinks.NAME] or [observers.NAME] table")


def samples() -> list[Path]:
    """Every plugin folder's sample.toml, connectors first, then sinks, then observers, by folder name."""
    found = sorted((ROOT / "plugins").glob("*/sample.toml"))
    return sorted(found, key=lambda p: (next(i for i, s in enumerate(SECTIONS) if section(p.read_text()).startswith(s)),
                                        p.parent.name))


def render() -> str:
    parts = [BEGIN]
    for path in samples():
        parts.append(f"\n### `{path.relative_to(ROOT)}`\n\n```toml\n{path.read_text().strip()}\n```")
    parts.append(END)
    return "\n".join(parts)


def main() -> int:
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

"""Render PLUGINS.md's hook reference from the hookspec docstrings (kernel/plugin/spec.py), so that
each hook is documented once, in the code.

    python scripts/plugin_docs.py          # rewrite the part of PLUGINS.md between the hook markers
    python scripts/plugin_docs.py --check  # exit 1 if PLUGINS.md is out of date

A hookspec docstring reads like pytest's: a summary, `:param name:` for every argument,
`:returns:`, sections (a title line underlined with `=`: `Called`, `Errors`, `Rules`) and
`.. versionadded:: API N`. A docstring that misses a part, or documents an argument the hook does
not have, stops the script with a message.
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "PLUGINS.md"
BEGIN, END = "<!-- hooks:begin -->", "<!-- hooks:end -->"
SECTIONS = ("Called", "Errors", "Rules")
WIDTH = 100


@dataclass
class HookDoc:
    """One hookspec's docstring, parsed."""

    name: str
    summary: str
    params: dict[str, str] = field(default_factory=dict)
    returns: str = ""
    sections: dict[str, str] = field(default_factory=dict)
    since: str = ""


def hooks() -> list[types.FunctionType]:
    """Every hookspec, in the order of the spec module (registration before observation)."""
    from ingestd.plugin import spec

    found = [f for f in vars(spec).values() if inspect.isfunction(f) and hasattr(f, "ingestd_spec")]
    return sorted(found, key=lambda f: f.__code__.co_firstlineno)


def _join(lines: list[str]) -> str:
    return " ".join(" ".join(line.split()) for line in lines if line.strip())


def parse(hook: types.FunctionType) -> HookDoc:
    lines = inspect.cleandoc(hook.__doc__ or "").splitlines()
    summary: list[str] = []
    doc = HookDoc(hook.__name__, "")
    current: list[str] | None = summary
    key: tuple[str, str] | None = None
    parts: dict[tuple[str, str], list[str]] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        underline = lines[i + 1] if i + 1 < len(lines) else ""
        if underline and set(underline) == {"="} and line.strip():
            key = ("section", line.strip())
            current = parts.setdefault(key, [])
            i += 2
            continue
        field_match = re.match(r":(param (\w+)|returns):\s*(.*)", line)
        version = re.match(r"\.\. versionadded::\s*(.+)", line)
        if field_match:
            key = ("param", field_match.group(2)) if field_match.group(2) else ("returns", "")
            current = parts.setdefault(key, [])
            current.append(field_match.group(3))
        elif version:
            doc.since = version.group(1).strip()
            current = None
        elif current is not None:
            current.append(line)
        elif line.strip():
            raise SystemExit(f"{hook.__name__}: text after `.. versionadded::`: {line!r}")
        i += 1
    doc.summary = "\n\n".join(_join(p.splitlines()) for p in "\n".join(summary).split("\n\n") if p.strip())
    for (kind, name), text in parts.items():
        if kind == "param":
            doc.params[name] = _join(text)
        elif kind == "returns":
            doc.returns = _join(text)
        else:
            doc.sections[name] = _join(text)
    return doc


def problems(hook: types.FunctionType, doc: HookDoc) -> list[str]:
    """What the docstring misses, or documents that the hook does not have."""
    names = list(inspect.signature(hook).parameters)
    out = []
    if not doc.summary:
        out.append("no summary line")
    out += [f"no `:param {n}:`" for n in names if n not in doc.params]
    out += [f"`:param {n}:` for an argument it does not have" for n in doc.params if n not in names]
    if not doc.returns:
        out.append("no `:returns:`")
    out += [f"no `{s}` section" for s in SECTIONS if s not in doc.sections]
    out += [f"unknown section `{s}` (known: {', '.join(SECTIONS)})" for s in doc.sections if s not in SECTIONS]
    if not re.fullmatch(r"API \d+", doc.since):
        out.append("no `.. versionadded:: API N`")
    return [f"{hook.__name__}: {p}" for p in out]


def annotation(value: object) -> str:
    """How the guide writes an annotation: a public class as `ingestd.Name`, None as `None`."""
    import ingestd

    if value is None or value is type(None):
        return "None"
    name = getattr(value, "__name__", None)
    if name and name in ingestd.__all__ and getattr(ingestd, name) is value:
        return f"ingestd.{name}"
    return inspect.formatannotation(value)


def signature(hook: types.FunctionType) -> str:
    sig = inspect.signature(hook, eval_str=True)
    args = ", ".join(f"{p.name}: {annotation(p.annotation)}" for p in sig.parameters.values())
    return f"@hookimpl\ndef {hook.__name__}({args}) -> {annotation(sig.return_annotation)}"


def _item(label: str, text: str) -> str:
    return textwrap.fill(f"- **{label}**: {text}", WIDTH, subsequent_indent="  ", break_on_hyphens=False,
                         break_long_words=False)


def render_hook(hook: types.FunctionType) -> str:
    doc = parse(hook)
    found = problems(hook, doc)
    if found:
        raise SystemExit("hookspec docstrings to fix (kernel/plugin/spec.py):\n" + "\n".join(found))
    out = [f"### `{hook.__name__}`", "", "```python", signature(hook), "```", ""]
    out += [textwrap.fill(p, WIDTH, break_on_hyphens=False, break_long_words=False) + "\n"
            for p in doc.summary.split("\n\n")]
    out.append("- **Arguments**:")
    out += [textwrap.fill(f"- `{name}`: {doc.params[name]}", WIDTH, initial_indent="  ", subsequent_indent="    ",
                          break_on_hyphens=False, break_long_words=False)
            for name in inspect.signature(hook).parameters]
    out.append(_item("Returns", doc.returns))
    out += [_item(section, doc.sections[section]) for section in SECTIONS]
    out.append(_item("Since", f"{doc.since}."))
    return "\n".join(out)


def render() -> str:
    return "\n".join([BEGIN, "", "\n\n".join(render_hook(h) for h in hooks()), "", END])


def updated(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"PLUGINS.md has no {BEGIN} ... {END} markers under '## Hook reference'")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + render() + tail


def main() -> int:
    text = GUIDE.read_text()
    new = updated(text)
    if "--check" in sys.argv:
        if new != text:
            print("PLUGINS.md's hook reference is out of date: run python scripts/plugin_docs.py")
            return 1
        return 0
    GUIDE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

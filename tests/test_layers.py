"""The package's shape: one import name, layers that import only downwards, no import circle.

The imports of every module under kernel/ (installed as `ingestd`) are read from the source,
function-level imports and `TYPE_CHECKING` blocks included, so a circle cannot hide in a local
import. Then a wheel built from the checkout must hold nothing but `ingestd` at the top level.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT

KERNEL = ROOT / "kernel"
LAYERS = {"core": 0, "plugin": 1, "": 1, "engine": 2, "service": 3, "bus": 4, "http": 4, "cli": 5, "__main__": 5}
"""Each sub-package's layer; a module may import only from its own layer and those below.
`""` is the package's `__init__`, the public plugin API (core and plugin re-exported)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(KERNEL).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["ingestd", *parts])


def imports_of(path: Path) -> set[str]:
    """The `ingestd` modules `path` imports, resolved to module names (a `from X import name`
    counts as importing X.name when that is a module, else X)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ingestd"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ingestd":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return {m for m in out if m in MODULES and m != name}


MODULES = {module_name(p): p for p in KERNEL.rglob("*.py")}


def layer_of(module: str) -> tuple[str, int | None]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top == "testing":
        return top, None
    return top, LAYERS[top]


def graph() -> dict[str, set[str]]:
    return {m: imports_of(p) for m, p in MODULES.items()}


def test_every_sub_package_has_a_layer():
    tops = {layer_of(m)[0] for m in MODULES}
    assert tops <= set(LAYERS) | {"testing"}, f"sub-packages without a layer in LAYERS: {tops - set(LAYERS)}"


def test_no_module_imports_from_a_higher_layer():
    bad = []
    for module, targets in graph().items():
        top, layer = layer_of(module)
        for target in targets:
            target_top, target_layer = layer_of(target)
            if layer is None:  # the kit reads through the public API only
                if target != "ingestd" and target_top != "testing":
                    bad.append(f"{module} -> {target} (the kit may import only `ingestd`)")
            elif target_layer is None or target_layer > layer:
                bad.append(f"{module} (layer {top or 'api'}) -> {target} (layer {target_top})")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(bad))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    edges = graph()
    # a package's __init__ is imported before its modules: importing the package itself is no edge back
    for module in edges:
        edges[module] = {t for t in edges[module] if not module.startswith(t + ".")}
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_checks_catch_a_circle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("ingestd.engine.ingest")[1] < layer_of("ingestd.service.control")[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (found,) = out.glob("ingestd-*.whl")
    return found


def test_the_wheel_installs_only_the_ingestd_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"ingestd"}, f"top-level names besides ingestd: {sorted(tops - dist_info)}"
    for expected in ("ingestd/__init__.py", "ingestd/__main__.py", "ingestd/core/contracts.py",
                     "ingestd/plugins/duckdb/__init__.py", "ingestd/testing/plugin.py"):
        assert expected in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "ingestd.cli.main:main" in text and "ingestd.plugins.duckdb" in text and "ingestd.testing.plugin" in text
    assert "kernel" not in text and "= plugins." not in text


def test_every_package_folder_is_in_the_wheel(wheel):
    """pyproject.toml lists the packages by hand (the folders are mapped to other names): one
    forgotten there would be missing from `pip install .`."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in [*KERNEL.rglob("__init__.py"), *(ROOT / "plugins").rglob("__init__.py")]:
        rel = init.relative_to(ROOT)
        installed = ("ingestd/plugins/" + "/".join(rel.parts[1:])) if rel.parts[0] == "plugins" \
            else "ingestd/" + "/".join(rel.parts[1:])
        assert installed in names, f"{rel} is not in the wheel: add its package to pyproject.toml"


def test_python_m_ingestd_and_the_script_both_answer_help():
    for cmd in ([sys.executable, "-m", "ingestd", "--help"], [str(Path(sys.executable).parent / "ingestd"), "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
        assert proc.returncode == 0 and "usage: ingestd" in proc.stdout, proc.stderr

"""Meta-tests, as datasette has them: the plugin guide documents every hook (its hook reference is
generated from the hookspec docstrings, and shows each hook's signature as the code has it) and
every public name, every hook has a test of its own (a test named `test_hook_<hook name>...`
under tests/), and plugins (plugins/, contrib/) import only the public `ingestd` package. Then
those hook tests, and the operator controls: INGESTD_DISABLE_PLUGINS and `ingestd plugins [--json]`."""

from __future__ import annotations

import ast
import datetime as dt
import importlib.metadata
import inspect
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import ingestd as ingestd_api
from ingestd.plugin import spec as hookspecs
from ingestd.plugin.manager import load_plugins
from tests.support import ROOT, cli_env, ingestd, plugin_dist, sink_rows, write_config

GUIDE = ROOT / "PLUGINS.md"
D = dt.date(2026, 11, 20)

sys.path.insert(0, str(ROOT / "scripts"))
import plugin_docs  # noqa: E402

# -- the hooks, the guide, the tests -----------------------------------------------------------

def hook_names() -> list[str]:
    return sorted(name for name, f in vars(hookspecs).items() if callable(f) and hasattr(f, "ingestd_spec"))


def hook_reference() -> dict[str, str]:
    """PLUGINS.md's `## Hook reference`: each `### hook` heading and the text under it."""
    text = GUIDE.read_text()
    found = re.search(r"^## Hook reference\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert found, "PLUGINS.md has no '## Hook reference' section"
    parts = re.split(r"^### ", found.group(1), flags=re.M)[1:]
    out = {}
    for part in parts:
        heading, _, body = part.partition("\n")
        name = re.search(r"\w+", heading)
        assert name, f"a hook reference heading names no hook: {heading!r}"
        out[name.group(0)] = body
    return out


def hook_tests() -> dict[str, list[str]]:
    """Test functions named `test_hook_...` under tests/, by the hook they name (the longest hook
    name that the rest of the test name equals or starts with, followed by `_`)."""
    hooks = hook_names()
    out: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_hook_"):
                rest = node.name[len("test_hook_"):]
                named = [h for h in hooks if rest == h or rest.startswith(h + "_")]
                key = max(named, key=len) if named else f"?{rest}"
                out.setdefault(key, []).append(f"{path.relative_to(ROOT)}::{node.name}")
    return out


def test_the_hooks_are_found():
    assert {"ingestd_register", "ingestd_event"} <= set(hook_names())


def test_every_hook_has_a_section_in_the_guides_hook_reference():
    reference = hook_reference()
    missing = [h for h in hook_names() if h not in reference]
    assert not missing, f"hooks without a '### <hook>' section under PLUGINS.md's '## Hook reference': {missing}"
    stale = [h for h in reference if h not in hook_names()]
    assert not stale, f"PLUGINS.md documents hooks kernel/plugin/spec.py does not have: {stale}"
    for hook, body in reference.items():
        assert "**Since**: API" in body, f"the section of {hook} does not say since which API version it exists"


def test_every_hook_has_a_test_of_its_own():
    tests = hook_tests()
    missing = [h for h in hook_names() if h not in tests]
    assert not missing, f"hooks with no test named test_hook_<hook>... under tests/: {missing}"
    unknown = {k: v for k, v in tests.items() if k.startswith("?")}
    assert not unknown, f"tests named test_hook_... for no hook in kernel/plugin/spec.py: {unknown}"


def test_the_hook_reference_is_generated_from_the_hookspec_docstrings():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "plugin_docs.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_hookspec_docstring_documents_its_arguments_return_rules_and_version():
    assert sorted(h.__name__ for h in plugin_docs.hooks()) == hook_names()
    found = [p for hook in plugin_docs.hooks() for p in plugin_docs.problems(hook, plugin_docs.parse(hook))]
    assert not found, "hookspec docstrings to fix (kernel/plugin/spec.py):\n" + "\n".join(found)


WHOLE_DOC = """Do a thing.

    :param registry: The registry.
    :returns: Nothing.

    Called
    ======
    Once.

    Errors
    ======
    Logged.

    Rules
    =====
    Be quick.

    .. versionadded:: API 2
    """


@pytest.mark.parametrize("cut, problem", [
    (None, None),
    ("    :param registry: The registry.\n", "no `:param registry:`"),
    ("    :returns: Nothing.\n", "no `:returns:`"),
    ("    Rules\n    =====\n    Be quick.\n", "no `Rules` section"),
    ("    .. versionadded:: API 2\n", "no `.. versionadded:: API N`"),
])
def test_the_generator_refuses_a_hookspec_docstring_that_misses_a_part(cut, problem):
    def ingestd_sample(registry: ingestd_api.Registry) -> None: ...

    ingestd_sample.__doc__ = WHOLE_DOC.replace(cut, "") if cut else WHOLE_DOC
    found = plugin_docs.problems(ingestd_sample, plugin_docs.parse(ingestd_sample))
    assert found == ([f"ingestd_sample: {problem}"] if problem else [])
    doc = plugin_docs.parse(ingestd_sample)
    if problem is None:
        assert (doc.summary, doc.params, doc.returns, doc.since) == ("Do a thing.", {"registry": "The registry."},
                                                                     "Nothing.", "API 2")
        assert doc.sections == {"Called": "Once.", "Errors": "Logged.", "Rules": "Be quick."}


def test_the_generator_refuses_a_param_the_hook_does_not_have():
    def ingestd_sample(registry: ingestd_api.Registry) -> None: ...

    ingestd_sample.__doc__ = WHOLE_DOC.replace(":returns:", ":param other: Gone.\n    :returns:")
    assert plugin_docs.problems(ingestd_sample, plugin_docs.parse(ingestd_sample)) == [
        "ingestd_sample: `:param other:` for an argument it does not have"]


MISSING = object()


def _resolve(node: ast.expr | None) -> object:
    """An annotation as the guide writes it (`ingestd.Registry`, `None`), evaluated against the
    public package."""
    if node is None:
        return MISSING
    try:
        return eval(compile(ast.Expression(node), "<PLUGINS.md>", "eval"), {"ingestd": ingestd_api})
    except Exception as exc:
        return f"<{ast.unparse(node)}: {exc}>"


def signature_mismatches(hook: types.FunctionType, section: str) -> list[str]:
    """How the ```python block of a hook's section differs from the hookspec: its name, the
    arguments' names in order, each argument's annotation and the return annotation, compared
    as the objects they name (`inspect.signature` of the code with its annotations evaluated)."""
    block = re.search(r"```python\n(.*?)```", section, re.S)
    if not block:
        return ["no ```python block with the signature"]
    tree = ast.parse(block.group(1).rstrip().rstrip(":") + ":\n    ...\n")
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    if len(defs) != 1:
        return ["the block does not hold one `def`"]
    shown, code = defs[0], inspect.signature(hook, eval_str=True)
    out = []
    if shown.name != hook.__name__:
        out.append(f"shows def {shown.name}, the hook is {hook.__name__}")
    if [ast.unparse(d) for d in shown.decorator_list] != ["hookimpl"]:
        out.append("not shown with @hookimpl")
    args = shown.args.posonlyargs + shown.args.args + shown.args.kwonlyargs
    if [a.arg for a in args] != list(code.parameters):
        out.append(f"arguments {[a.arg for a in args]}, the code has {list(code.parameters)}")
    for arg in args:
        if arg.arg in code.parameters:
            want, got = code.parameters[arg.arg].annotation, _resolve(arg.annotation)
            if got is not want:
                out.append(f"`{arg.arg}` is annotated {ast.unparse(arg.annotation) if arg.annotation else 'nothing'}, "
                           f"the code says {want!r}")
    if _resolve(shown.returns) is not code.return_annotation:
        out.append(f"returns {ast.unparse(shown.returns) if shown.returns else 'nothing'}, "
                   f"the code says {code.return_annotation!r}")
    return out


def test_the_guide_shows_each_hooks_signature_as_the_code_has_it():
    reference = hook_reference()
    for hook in plugin_docs.hooks():
        wrong = signature_mismatches(hook, reference[hook.__name__])
        assert not wrong, f"PLUGINS.md's section of {hook.__name__}: " + "; ".join(wrong)


@pytest.mark.parametrize("shown, wrong", [
    ("@hookimpl\ndef ingestd_register(registry: ingestd.Registry) -> None", None),
    ("@hookimpl\ndef ingestd_register(registry) -> None", "`registry` is annotated nothing"),
    ("@hookimpl\ndef ingestd_register(reg: ingestd.Registry) -> None", "arguments ['reg']"),
    ("@hookimpl\ndef ingestd_register(registry: ingestd.Registry, extra: int) -> None", "arguments"),
    ("@hookimpl\ndef ingestd_register(registry: ingestd.Sink) -> None", "`registry` is annotated ingestd.Sink"),
    ("@hookimpl\ndef ingestd_register(registry: ingestd.Nothing) -> None", "annotated ingestd.Nothing"),
    ("@hookimpl\ndef ingestd_register(registry: ingestd.Registry) -> int", "returns int"),
    ("@hookimpl\ndef ingestd_register(registry: ingestd.Registry)", "returns nothing"),
    ("def ingestd_register(registry: ingestd.Registry) -> None", "not shown with @hookimpl"),
    ("@hookimpl\ndef ingestd_event(registry: ingestd.Registry) -> None", "shows def ingestd_event"),
])
def test_the_signature_check_sees_a_wrong_name_annotation_or_return(shown, wrong):
    from ingestd.plugin.spec import ingestd_register

    found = signature_mismatches(ingestd_register, f"text\n\n```python\n{shown}\n```\n")
    if wrong is None:
        assert found == []
    else:
        assert any(wrong in f for f in found), found


def test_every_public_name_is_in_the_guide():
    text = GUIDE.read_text()
    missing = [name for name in ingestd_api.__all__ if f"`{name}`" not in text]
    assert not missing, f"names in ingestd.__all__ that PLUGINS.md never mentions: {missing}"


# -- plugins import only the public ingestd package ---------------------------------------------

def _module_allowed(module: str, test_code: bool) -> bool:
    if module == "ingestd":
        return True
    return test_code and any(module == p or module.startswith(p + ".") for p in ("ingestd.testing", "ingestd.plugins"))


def kernel_import_violations(source: str, filename: str, *, test_code: bool = False) -> list[str]:
    """Every place `source` reaches into ingestd beyond its public package (`ingestd.__all__`);
    test code may also use `ingestd.testing` and the built-in plugins."""
    public = set(ingestd_api.__all__) | ({"testing"} if test_code else set())
    tree = ast.parse(source, filename)
    aliases: set[str] = set()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ingestd":
                    aliases.add(alias.asname or "ingestd")
                elif alias.name.startswith("ingestd.") and not _module_allowed(alias.name, test_code):
                    out.append(f"{filename}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "ingestd":
                for alias in node.names:
                    if alias.name != "*" and alias.name not in public:
                        out.append(f"{filename}:{node.lineno}: from ingestd import {alias.name} "
                                   "(not in ingestd.__all__)")
            elif node.module.startswith("ingestd.") and not _module_allowed(node.module, test_code):
                out.append(f"{filename}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            target = node.args[0].value
            if (name in ("import_module", "__import__") and isinstance(target, str) and target.startswith("ingestd.")
                    and not _module_allowed(target, test_code)):
                out.append(f"{filename}:{node.lineno}: {name}({target!r})")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr not in public and not node.attr.startswith("__")):
            out.append(f"{filename}:{node.lineno}: {node.value.id}.{node.attr} (not in ingestd.__all__)")
    return out


def plugin_sources() -> list[tuple[Path, bool]]:
    """Every Python file of plugins/ and contrib/, with whether it is test code."""
    out = [(p, False) for p in sorted((ROOT / "plugins").rglob("*.py"))]
    for p in sorted((ROOT / "contrib").rglob("*.py")):
        rel = p.relative_to(ROOT / "contrib").parts
        if any(part in ("build", "dist") or part.endswith(".egg-info") for part in rel):
            continue
        test_code = "tests" in rel or p.name.startswith("test_") or p.name == "conftest.py"
        out.append((p, test_code))
    return out


def test_plugins_import_only_the_public_ingestd_package():
    files = plugin_sources()
    assert any(p.parts[-3:] == ("plugins", "duckdb", "connector.py") for p, _ in files)
    assert any(p.parts[-2:] == ("ingestd_files", "connector.py") for p, _ in files)
    violations = []
    for path, test_code in files:
        violations += kernel_import_violations(path.read_text(), str(path.relative_to(ROOT)), test_code=test_code)
    assert not violations, ("plugins may import only `ingestd` (its __init__), tests also `ingestd.testing`:\n"
                            + "\n".join(violations))


@pytest.mark.parametrize("source, test_code, bad", [
    ("from ingestd import Connector, hookimpl", False, False),
    ("import ingestd\nx = ingestd.PermanentError", False, False),
    ("from ingestd import *", False, False),
    ("from .demo_warehouse import ensure_demo_warehouse", False, False),
    ("from ingestd.engine.state import StateStore", False, True),
    ("import ingestd.core.config", False, True),
    ("from ingestd import contracts", False, True),
    ("import ingestd as k\nk.state.StateStore", False, True),
    ("import importlib\nimportlib.import_module('ingestd.plugin.manager')", False, True),
    ("from ingestd.testing import ConnectorSuite", False, True),
    ("from ingestd.testing import ConnectorSuite", True, False),
    ("from ingestd.testing.sink_suite import feed\nfrom ingestd import testing", True, False),
    ("from ingestd.plugins.duckdb.connector import DuckDBConnector", False, True),
    ("from ingestd.plugins.duckdb.connector import DuckDBConnector", True, False),
    ("import kernel", False, False),
    ("from ingestd.core.query import render", True, True),
])
def test_the_import_check_tells_public_from_private(source, test_code, bad):
    assert bool(kernel_import_violations(source, "<sample>", test_code=test_code)) == bad


# -- hook tests: ingestd_register ----------------------------------------------------------------

DUPLICATE = '''
from dataclasses import dataclass
from ingestd import Connector, ProbeResult, hookimpl

INGESTD_API = (2, 2)


@dataclass
class Config:
    path: str = ""


class Impostor(Connector):
    type_name = "duckdb"
    config_model = Config

    async def check(self, query=None):
        raise AssertionError("the impostor must never be used")

    async def probe(self, query, source=None):
        raise AssertionError("the impostor must never be used")

    async def fetch(self, query, batch_rows, source=None):
        raise AssertionError("the impostor must never be used")
        yield


@hookimpl
def ingestd_register(registry):
    registry.add_connector(Impostor)
'''


def test_hook_ingestd_register_refuses_a_type_another_plugin_provides(tmp_path, warehouse):
    env = cli_env([plugin_dist(tmp_path / "extra", "zz_impostor", DUPLICATE)])
    infos = {i["name"]: i for i in json.loads(ingestd("plugins", "--json", env=env, check=True).stdout)}
    assert infos["zz_impostor"]["error"] == "PluginError: connector type 'duckdb' is already provided by plugin duckdb"
    assert infos["zz_impostor"]["connectors"] == [] and infos["duckdb"]["connectors"] == ["duckdb"]
    warehouse.add_events(D, 12)
    out = ingestd("load", "orders", "--day", D.isoformat(), config=write_config(tmp_path), env=env)
    assert out.returncode == 0, out.stdout + out.stderr  # the built-in connector did the load
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 12


def _plugin(name: str, register) -> types.ModuleType:
    module = types.ModuleType(name)
    module.INGESTD_API = (2, 2)
    module.ingestd_register = ingestd_api.hookimpl(register)
    return module


def _connector(type_name: str) -> type[ingestd_api.Connector]:
    from dataclasses import dataclass

    @dataclass
    class Config:
        path: str = ""

    class Made(ingestd_api.Connector):
        config_model = Config

        async def check(self, query=None): ...
        async def probe(self, query, source=None): return ingestd_api.ProbeResult(0)
        async def fetch(self, query, batch_rows, source=None):
            return
            yield

    Made.type_name = type_name
    return Made


def test_hook_ingestd_register_adds_types_that_a_config_can_name(tmp_path):
    memwh = _connector("memwh")
    loaded = load_plugins(extra=[("memplug", _plugin("memplug", lambda registry: registry.add_connector(memwh)))])
    info = next(i for i in loaded.infos if i.name == "memplug")
    assert (info.error, info.connectors, info.api) == (None, ["memwh"], (2, 2))
    assert loaded.registry.connectors["memwh"] is memwh
    assert loaded.registry.provided_by[("connector", "memwh")] == "memplug"
    from ingestd.core.config import load_config
    cfg = write_config(tmp_path, connection_type="memwh")
    assert load_config(cfg, loaded.registry).connections["wh"].type == "memwh"


def test_hook_ingestd_register_undoes_a_plugin_whose_registration_fails():
    def register(registry):
        registry.add_connector(_connector("halfwh"))
        registry.add_connector(_connector("duckdb"))  # taken: the whole registration is undone

    loaded = load_plugins(extra=[("halfplug", _plugin("halfplug", register))])
    info = next(i for i in loaded.infos if i.name == "halfplug")
    assert "already provided by plugin duckdb" in info.error
    assert info.connectors == [] and "halfwh" not in loaded.registry.connectors
    assert loaded.manager.get_plugin("halfplug") is None


# -- hook tests: ingestd_event --------------------------------------------------------------------

RECORDER = '''
import json, os
import ingestd
from ingestd import hookimpl

INGESTD_API = (2, 2)


@hookimpl
def ingestd_event(event):
    assert isinstance(event, ingestd.Event)
    with open(os.environ["INGESTD_TEST_EVENTS"], "a") as out:
        out.write(json.dumps({**event.to_json(), "cls": type(event).__name__}) + "\\n")
'''

RAISER = '''
from ingestd import hookimpl

INGESTD_API = (2, 2)


@hookimpl
def ingestd_event(event):
    raise RuntimeError("this observer is broken on purpose")
'''


def recorded(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_hook_ingestd_event_an_observer_receives_the_load_events_of_a_real_run(tmp_path, warehouse):
    warehouse.add_events(D, 40)
    log = tmp_path / "events.jsonl"
    env = cli_env([plugin_dist(tmp_path / "extra", "recorder", RECORDER)], INGESTD_TEST_EVENTS=str(log))
    out = ingestd("run", "--once", "--now", "2026-11-21T06:30:00Z", config=write_config(tmp_path), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    seen = recorded(log)
    of_day = [e for e in seen if e["day"] == D.isoformat() and e["type"].startswith("load.")]
    assert [e["type"] for e in of_day] == ["load.started", "load.succeeded"]
    started, succeeded = of_day
    assert (started["cls"], succeeded["cls"]) == ("LoadStarted", "LoadSucceeded")
    assert started["source"] == succeeded["source"] == "orders"
    assert started["run_id"] == succeeded["run_id"] is not None
    assert started["data"] == {"trigger": "scheduled", "generation": 1}
    assert succeeded["data"]["rows"] == 40 and succeeded["data"]["generation"] == 1
    earlier = {e["day"]: e["type"] for e in seen if e["type"] == "load.empty"}
    assert earlier == {"2026-11-18": "load.empty", "2026-11-19": "load.empty"}  # caught up, not landed
    assert any(e["type"] == "check.unchanged" and e["day"] == D.isoformat() for e in seen)


def test_hook_ingestd_event_a_failing_observer_does_not_stop_the_load(tmp_path, warehouse):
    warehouse.add_events(D, 25)
    log = tmp_path / "events.jsonl"
    extra = tmp_path / "extra"
    plugin_dist(extra, "aa_raiser", RAISER)
    plugin_dist(extra, "zz_recorder", RECORDER)
    env = cli_env([extra], INGESTD_TEST_EVENTS=str(log))
    out = ingestd("load", "orders", "--day", D.isoformat(), config=write_config(tmp_path), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "orders 2026-11-20: succeeded" in out.stdout
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 25
    assert [e["type"] for e in recorded(log)] == ["load.started", "load.succeeded"]
    assert "plugin.event_hook_failed" in out.stderr and "aa_raiser" in out.stderr
    assert "broken on purpose" in out.stderr


# -- operator controls ---------------------------------------------------------------------------

BLOCKABLE = '''
from ingestd import hookimpl
from ingestd.plugins.duckdb.connector import DuckDBConnector

INGESTD_API = (2, 2)


class BlockDuck(DuckDBConnector):
    type_name = "blockduck"


@hookimpl
def ingestd_register(registry):
    registry.add_connector(BlockDuck)
'''


def test_disable_plugins_blocks_plugins_by_name(tmp_path, warehouse):
    extra = plugin_dist(tmp_path / "extra", "blockme", BLOCKABLE)
    cfg = write_config(tmp_path, connection_type="blockduck")
    assert ingestd("check", config=cfg, env=cli_env([extra])).returncode == 0  # usable while enabled

    env = cli_env([extra], INGESTD_DISABLE_PLUGINS=" blockme , sqlite_sink,not_installed")
    lines = {ln.split()[0]: ln for ln in ingestd("plugins", env=env, check=True).stdout.splitlines()}
    for name in ("blockme", "sqlite_sink"):
        assert "disabled by INGESTD_DISABLE_PLUGINS" in lines[name], lines[name]
    assert "connector:duckdb" in lines["duckdb"] and "disabled" not in lines["duckdb"]
    infos = {i["name"]: i for i in json.loads(ingestd("plugins", "--json", env=env, check=True).stdout)}
    assert infos["blockme"]["error"] == "disabled by INGESTD_DISABLE_PLUGINS"
    assert infos["blockme"]["connectors"] == [] and infos["sqlite_sink"]["sinks"] == []
    assert infos["blockme"]["distribution"] == "blockme"  # still listed, with where it comes from

    out = ingestd("check", config=cfg, env=env)
    assert out.returncode == 2
    assert "connections.wh.type: unknown connector type 'blockduck'" in out.stderr
    assert "plugin 'blockme' failed to load: disabled by INGESTD_DISABLE_PLUGINS" in out.stderr
    sqlite_cfg = write_config(tmp_path, sink='type = "sqlite"\npath = "analytics.sqlite"')
    out = ingestd("check", config=sqlite_cfg, env=env)
    assert out.returncode == 2 and "sinks.main.type: unknown sink type 'sqlite'" in out.stderr


LISTED = '''
from dataclasses import dataclass
from ingestd import Sink, hookimpl
from ingestd.plugins.duckdb.connector import DuckDBConnector

INGESTD_API = (2, 3)


class ListedWarehouse(DuckDBConnector):
    type_name = "listedwh"


@dataclass
class ListedSinkConfig:
    path: str = ""


class ListedSink(Sink):
    type_name = "listedsink"
    config_model = ListedSinkConfig

    async def replace(self, target, batches):
        return 0

    async def read_generation(self, kind, source, day):
        return None


@hookimpl
def ingestd_register(registry):
    registry.add_connector(ListedWarehouse)
    registry.add_sink(ListedSink)
'''


def test_plugins_json_shows_distribution_version_api_types_and_load_error(tmp_path):
    extra = tmp_path / "extra"
    plugin_dist(extra, "listed", LISTED, version="2.3.4")
    plugin_dist(extra, "crashy", "raise RuntimeError('this plugin is broken on purpose')\n", version="0.0.1")
    plugin_dist(extra, "ancient", "INGESTD_API = (0, 0)\n")
    plugin_dist(extra, "undeclared", "x = 1\n")
    env = cli_env([extra])
    infos = {i["name"]: i for i in json.loads(ingestd("plugins", "--json", env=env, check=True).stdout)}
    assert infos["listed"] == {"name": "listed", "module": "listed", "distribution": "listed", "version": "2.3.4",
                               "api": [2, 3], "connectors": ["listedwh"], "sinks": ["listedsink"], "observers": [],
                               "error": None}
    assert infos["crashy"]["error"] == "RuntimeError: this plugin is broken on purpose"
    crashy_info = infos["crashy"]
    assert (crashy_info["distribution"], crashy_info["version"], crashy_info["api"]) == ("crashy", "0.0.1", None)
    assert infos["ancient"]["error"] == "PluginError: supports plugin API 0..0, but this ingestd has API 2"
    assert "declares no INGESTD_API" in infos["undeclared"]["error"]
    version = importlib.metadata.version("ingestd")
    assert infos["duckdb"] == {"name": "duckdb", "module": "ingestd.plugins.duckdb", "distribution": "ingestd",
                               "version": version, "api": [2, 2], "connectors": ["duckdb"], "sinks": [],
                               "observers": [], "error": None}
    assert infos["duckdb_sink"]["sinks"] == ["duckdb"]

    text = ingestd("plugins", env=env, check=True).stdout
    line = next(ln for ln in text.splitlines() if ln.startswith("listed "))
    assert re.search(r"listed\s+listed 2\.3\.4\s+API 2\.\.3\s+connector:listedwh, sink:listedsink$", line), line
    crashy = next(ln for ln in text.splitlines() if ln.startswith("crashy "))
    assert "crashy 0.0.1" in crashy and "FAILED: RuntimeError: this plugin is broken on purpose" in crashy

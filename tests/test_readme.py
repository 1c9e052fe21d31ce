"""README.md stays true: its plugin samples are the plugins' own sample.toml files, and each
sample is a valid config for its plugin, also with every optional key uncommented."""

import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

from ingestd import ConfigErrors, Secret, build_model
from ingestd.plugin.manager import load_plugins
from tests.support import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import readme_samples  # noqa: E402

SAMPLES = readme_samples.samples()
COMMENTED_KEY = re.compile(r"^# ?([A-Za-z_][A-Za-z0-9_]*\s*=.*)$")
ALTERNATIVES = {
    "redshift": "the IAM keys are an alternative to user and password, and cluster_identifier to workgroup",
    "snowflake": "password, private_key_file and token are alternative ways to log in",
    "databricks": "access_token, client_id with client_secret, and credentials_provider are alternative ways to log in",
}
"""Samples whose plugin refuses all their optional keys at once, and why; with every key
uncommented these are checked for known keys and valid values, without the plugin's validate()."""


def test_every_built_in_plugin_folder_has_its_sample_and_readme():
    folders = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py"))
    assert folders == sorted(p.parent.name for p in SAMPLES)
    for name in folders:
        assert (ROOT / "plugins" / name / "README.md").is_file(), f"plugins/{name}/README.md is missing"
        assert "sample.toml" in (ROOT / "plugins" / name / "README.md").read_text()


def test_readme_shows_every_plugins_sample():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/readme_samples.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    readme = (ROOT / "README.md").read_text()
    for path in SAMPLES:
        assert f"### `plugins/{path.parent.name}/sample.toml`" in readme


def _plugin_table(path: Path) -> tuple[str, str, dict, type]:
    """(section, name, keys without `type`, config model) of a sample, the model found through
    the plugin its folder registers."""
    (section, body), = tomllib.loads(path.read_text()).items()
    (name, values), = body.items()
    loaded = load_plugins()
    kind = values.pop("type")
    what = {"connections": "connector", "sinks": "sink", "observers": "observer"}[section]
    cls = {"connector": loaded.registry.connectors, "sink": loaded.registry.sinks,
           "observer": loaded.registry.observers}[what][kind]
    provider = loaded.registry.provided_by[(what, kind)]
    assert provider == path.parent.name, f"{path}: type {kind!r} is provided by plugin {provider}"
    return section, name, values, cls.config_model


def _secret_fields(model: type) -> set[str]:
    return {n for n, t in typing.get_type_hints(model).items() if t is Secret or Secret in typing.get_args(t)}


def _with_secrets(table: dict, secrets: set[str], monkeypatch, tmp_path: Path) -> dict:
    """Fake environment variables for `*_env` secrets and files for `*_file` ones."""
    table = dict(table)
    for key, value in table.items():
        stem = re.sub(r"_(env|file)$", "", key)
        if stem not in secrets or key == stem:
            continue
        if key.endswith("_env"):
            monkeypatch.setenv(value, "x")
        elif "${CREDENTIALS_DIRECTORY}" in value:
            monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
            Path(value.replace("${CREDENTIALS_DIRECTORY}", str(tmp_path))).write_text("x")
        else:
            (tmp_path / Path(value).name).write_text("x")
            table[key] = str(tmp_path / Path(value).name)
    return table


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.parent.name)
def test_each_sample_as_written_is_a_valid_table_for_its_plugin(path, monkeypatch, tmp_path):
    section, name, values, model = _plugin_table(path)
    table = _with_secrets(values, _secret_fields(model), monkeypatch, tmp_path)
    assert build_model(model, table, f"{section}.{name}") is not None


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.parent.name)
def test_each_samples_commented_out_keys_are_real_keys_with_valid_values(path, monkeypatch, tmp_path):
    """Every `# key = value` line uncommented at once (a secret's `_env`/`_file` spelling
    replaces the one written, as only one may be given)."""
    section, name, values, model = _plugin_table(path)
    secrets = _secret_fields(model)
    commented = [tomllib.loads(m.group(1)) for m in map(COMMENTED_KEY.match, path.read_text().splitlines()) if m]
    assert commented, f"{path} documents no optional key"
    table = dict(values)
    for (key, value), in (c.items() for c in commented):
        stem = re.sub(r"_(env|file)$", "", key)
        if stem in secrets:
            for spelling in (stem, f"{stem}_env", f"{stem}_file"):
                table.pop(spelling, None)
        table[key] = value
    table = _with_secrets(table, secrets, monkeypatch, tmp_path)
    where = f"{section}.{name}"
    plugin = path.parent.name
    try:
        built = build_model(model, table, where)
    except ConfigErrors:
        if plugin not in ALTERNATIVES:
            raise
        without_validate = type(model.__name__, (model,), {"validate": None})
        built = build_model(without_validate, table, where)
    else:
        assert plugin not in ALTERNATIVES, \
            f"{plugin} now takes all its optional keys at once: drop it from ALTERNATIVES"
    assert built is not None


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first = text.index("```sh")
    assert "ingestd -c daemon.toml run" in text[first:first + 300]
    second = text.index("```sh", first + 10)
    assert "./scripts/test" in text[second:second + 100]
    assert "./scripts/test" in (ROOT / ".ci/run").read_text()

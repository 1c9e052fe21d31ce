"""README.md stays true: its plugin samples are the plugins' own, and each sample is a valid config."""

import importlib
import subprocess
import sys
import tomllib

import pytest

from ingestd import build_model
from ingestd.plugin.manager import load_plugins
from tests.support import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import readme_samples  # noqa: E402


def test_readme_shows_every_plugins_sample():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/readme_samples.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("module", readme_samples.MODULES)
def test_each_sample_is_a_valid_table_for_its_plugin(module, monkeypatch):
    text = readme_samples.sample(module)
    table = tomllib.loads(text)
    section, body = next(iter(table.items()))
    (name, values), = body.items()
    registry = load_plugins().registry
    kind = values.pop("type")
    cls = (registry.connectors if section == "connections" else registry.sinks)[kind]
    for key in [k for k in values if k.endswith("_env")]:
        monkeypatch.setenv(values[key], "x")
    assert build_model(cls.config_model, values, f"{section}.{name}") is not None
    importlib.import_module(module)


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first = text.index("```sh")
    assert "ingestd -c daemon.toml run" in text[first:first + 300]
    second = text.index("```sh", first + 10)
    assert "./scripts/test" in text[second:second + 100]
    assert "./scripts/test" in (ROOT / ".ci/run").read_text()

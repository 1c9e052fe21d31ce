"""The example third-party plugin package, contrib/ingestd-files, installed as a user would
install it (scripts/setup.d/10-contrib-plugins.sh), passes its own test suite: the conformance
kit, its particulars, and an end-to-end run of the daemon."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGE = ROOT / "contrib" / "ingestd-files"
INSTALL = "scripts/setup.d/10-contrib-plugins.sh"


def test_the_package_is_installed_from_this_tree_with_its_entry_point():
    try:
        dist = importlib.metadata.distribution("ingestd-files")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"ingestd-files is not installed: run {INSTALL} (./scripts/test does)")
    import ingestd_files
    assert Path(ingestd_files.__file__).resolve().is_relative_to(PACKAGE.resolve()), \
        f"ingestd_files comes from {ingestd_files.__file__}, not this tree: run {INSTALL}"
    eps = [(ep.name, ep.value) for ep in dist.entry_points if ep.group == "ingestd"]
    assert eps == [("files", "ingestd_files.connector")]


@pytest.mark.slow
def test_the_package_passes_its_own_tests():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INGESTD_", "PYTEST_"))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=PACKAGE,
                          capture_output=True, text=True, timeout=900, env=env)
    tail = (done.stdout[-6000:] + "\n" + done.stderr[-3000:]).strip()
    assert done.returncode == 0, tail
    summary = done.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 30, summary
    assert "skipped" not in summary and "failed" not in summary and "error" not in summary, summary

"""The conformance kit on the files connector: Parquet day folders (stat fingerprints) and JSON
Lines in year/month/day folders (content fingerprints)."""

from __future__ import annotations

import pytest
import pytest_asyncio
from ingestd_files.connector import FilesConfig, FilesConnector
from lake import FilesKitTable

from ingestd import build_model
from ingestd.testing import ConnectorSuite


def connector_on(root, **table) -> FilesConnector:
    config = build_model(FilesConfig, {"root": str(root), **table}, "connections.kit")
    return FilesConnector(config, name="kit")


class TestParquetDayFolders(ConnectorSuite):
    @pytest_asyncio.fixture
    async def connector(self, tmp_path):
        (tmp_path / "lake").mkdir()
        c = connector_on(tmp_path / "lake", fingerprint="stat")
        yield c
        await c.close()

    @pytest.fixture
    def kit_table(self, tmp_path):
        return FilesKitTable(tmp_path / "lake", "parquet")

    @pytest.fixture
    def broken_connector(self, tmp_path):
        return connector_on(tmp_path / "no-such-folder")


class TestJsonLinesDatePath(ConnectorSuite):
    batch_rows = 40

    @pytest_asyncio.fixture
    async def connector(self, tmp_path):
        (tmp_path / "lake").mkdir()
        c = connector_on(tmp_path / "lake", pattern="{root}/{day:%Y/%m/%d}/*.jsonl", fingerprint="content")
        yield c
        await c.close()

    @pytest.fixture
    def kit_table(self, tmp_path):
        return FilesKitTable(tmp_path / "lake", "jsonl", folder="%Y/%m/%d")

    @pytest.fixture
    def broken_connector(self, tmp_path):
        (tmp_path / "a-file").write_text("not a folder")
        return connector_on(tmp_path / "a-file", pattern="{day}/*.jsonl")

"""pytest plugin (entry point `pytest11`): makes the conformance kit's suites available."""

from kernel.testing import ConnectorSuite, SinkSuite  # noqa: F401

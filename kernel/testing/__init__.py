"""Conformance kit: the standard suites every connector and sink must pass.

A plugin author subclasses `ConnectorSuite` or `SinkSuite` in a test module and provides a few
fixtures; the suite's tests then run against their plugin. See each suite's docstring.
"""

from .connector_suite import ConnectorSuite, KitTable, kit_day_query
from .sink_suite import SinkSuite

__all__ = ["ConnectorSuite", "KitTable", "SinkSuite", "kit_day_query"]

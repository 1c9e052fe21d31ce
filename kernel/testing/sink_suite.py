class SinkSuite:
    """Placeholder; being written."""

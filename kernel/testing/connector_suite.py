class ConnectorSuite:
    """Placeholder; being written."""


class KitTable:
    pass

"""Being written."""
INGESTD_API = (1, 1)

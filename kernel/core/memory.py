"""Which allocator Arrow uses in ingestd's processes."""

from __future__ import annotations

import os


def use_system_memory_pool() -> None:
    """Arrow's default pool (mimalloc or jemalloc) keeps memory it freed for reuse, so a daemon's
    RSS settles at the peak of its largest load; the system allocator gives it back. An operator's
    ARROW_DEFAULT_MEMORY_POOL wins."""
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        import pyarrow as pa
        pa.set_memory_pool(pa.system_memory_pool())

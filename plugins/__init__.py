"""ingestd's built-in plugins, each a package of its own, loaded through the `ingestd`
entry-point group exactly like a third party's. They import only `ingestd`."""

"""CLI: `ingestd ...`. Each command registers itself; the CLI is a client of the control
layer. The top layer: imports anything below, nothing imports it."""

"""Core: what every layer above shares and no warehouse is part of. Contracts, errors, events,
config models and the daemon.toml reader, query binding, the canonical schemas and mapping, the
scheduler's cron windows, logging. Imports nothing of ingestd outside itself."""

"""The HTTP listener (`[http]`): the status page, `/metrics` for Prometheus, `/healthz`,
`/readyz`, and the JSON control API under `/api/v1/`, on aiohttp. Like the bus, it only calls the
control layer; the CLI passes its factory (`server.http_service`) to the daemon. `client` is the
CLI's side of the control API."""

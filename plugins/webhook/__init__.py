"""The webhook observer: POSTs chosen lifecycle events as JSON to a URL, signed with
HMAC-SHA256, with retries and backoff, never delaying a load.

See README.md beside this file; sample.toml is its documented configuration.
"""

from ingestd import hookimpl

from .observer import WebhookObserver

INGESTD_API = (2, 2)


@hookimpl
def ingestd_register(registry) -> None:
    registry.add_observer(WebhookObserver)

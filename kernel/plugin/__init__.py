"""The plugin API: the hook markers, the API version, the hook specification (`spec`) and the
plugin manager (`manager`), in one package as tox 4 keeps them.

A plugin declares the API versions it supports as `INGESTD_API = (min, max)`, inclusive; a
plugin whose range does not hold `API_VERSION` is refused with a message saying so.
"""

from __future__ import annotations

import pluggy

PROJECT = "ingestd"
"""pluggy's project name, the hook prefix (`ingestd_`) and the entry-point group."""

API_VERSION = 2
"""1: the first API (import name `kernel`). 2: the import name is `ingestd`; `Sink.scan` reads a
partition back; shared helpers for blocking drivers (`ingestd.streams`)."""

hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)

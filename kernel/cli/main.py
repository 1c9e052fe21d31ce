"""`ingestd ...`: run the daemon, load or backfill days, show status, usage and plugins."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path

from ..engine import backfill as backfills
from ..core import logs
from ..core.config import Config, load_config
from ..core.errors import ConfigErrors, IngestdError, StateError
from ..engine.ingest import load_partition, recover
from ..core.memory import use_system_memory_pool
from ..engine.planner import run_due
from ..plugin.manager import LoadedPlugins, load_plugins
from ..engine.runtime import Runtime, check_capabilities
from ..engine.state import StateStore
from ..service.views import source_status

EXIT_CONFIG = 2
EXIT_FAILED = 1


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _instant(text: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingestd", description=__doc__)
    p.add_argument("-c", "--config", default=os.environ.get("INGESTD_CONFIG", "daemon.toml"),
                   help="config file (default: $INGESTD_CONFIG or ./daemon.toml)")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon (or, with --once, what is due now)")
    run.add_argument("--once", action="store_true", help="do what is due now, then exit")
    run.add_argument("--now", type=_instant, help="with --once: act as if it were this time (ISO-8601)")
    sub.add_parser("check", help="validate the config and check every source's connection")
    pl = sub.add_parser("plugins", help="list plugins, their versions and the types they provide")
    pl.add_argument("--json", action="store_true")
    ld = sub.add_parser("load", help="load (or reload) one day of one source now")
    ld.add_argument("source")
    ld.add_argument("--day", type=_date, required=True)
    bf = sub.add_parser("backfill", help="load a range of days, stored durably and resumable")
    bf.add_argument("source", nargs="?")
    bf.add_argument("--all", action="store_true", help="every configured source")
    bf.add_argument("--from", dest="first", type=_date, required=True)
    bf.add_argument("--to", dest="last", type=_date, required=True)
    bf.add_argument("--request-id", help="idempotency key: the same id twice runs once")
    st = sub.add_parser("status", help="per source: next windows; per day: status, rows, generation")
    st.add_argument("source", nargs="?")
    st.add_argument("--days", type=int, default=14, help="how many recent days to show (default 14)")
    st.add_argument("--json", action="store_true")
    us = sub.add_parser("usage", help="rows metered per source, day and trigger")
    us.add_argument("--from", dest="first", type=_date)
    us.add_argument("--to", dest="last", type=_date)
    us.add_argument("--json", action="store_true")
    from .request import add_request_parser
    add_request_parser(sub)
    return p


def _setup(path: str, *, log_to=sys.stderr) -> tuple[Config, LoadedPlugins]:
    plugins = load_plugins()
    config = load_config(path, plugins.registry, plugins.errors())
    logs.configure(config.daemon.log_level, stream=log_to)
    return config, plugins


async def _with_runtime(config: Config, plugins: LoadedPlugins, work):
    rt = await Runtime(config, plugins).open()
    try:
        await recover(rt)
        return await work(rt)
    finally:
        await rt.close()


def cmd_plugins(args) -> int:
    plugins = load_plugins()
    if args.json:
        print(json.dumps([i.as_dict() for i in plugins.infos], indent=2))
        return 0
    for i in plugins.infos:
        api = f"API {i.api[0]}..{i.api[1]}" if i.api else "API ?"
        provides = ", ".join([f"connector:{c}" for c in i.connectors] + [f"sink:{s}" for s in i.sinks]) or "-"
        dist = f"{i.distribution} {i.version}" if i.distribution else "(not installed as a distribution)"
        line = f"{i.name:<16} {dist:<28} {api:<10} {provides}"
        label = "DISABLED" if i.error and i.error.startswith("disabled by") else "FAILED"
        print(line + (f"  {label}: {i.error}" if i.error else ""))
    return 0


def cmd_check(args) -> int:
    config, plugins = _setup(args.config)
    check_capabilities(config, plugins)
    for info in plugins.infos:
        if info.error:
            print(f"plugin {info.name}: not loaded: {info.error}")

    async def work() -> int:
        bad = 0
        rt = Runtime(config, plugins)  # not opened: only the connector factory and query binding are used
        for name, src in config.sources.items():
            conn = rt.connector(src.connection)
            day = dt.date.today() - dt.timedelta(days=src.lag_days)
            try:
                await conn.check(rt.day_query(name, day))
                print(f"ok     {name}: connection {src.connection} ({config.connections[src.connection].type}) "
                      f"reads the day query")
            except IngestdError as exc:
                bad += 1
                print(f"FAILED {name}: connection {src.connection}: {exc}")
        for c in rt.connectors.values():
            await c.close()
        return EXIT_FAILED if bad else 0

    return asyncio.run(work())


def cmd_run(args) -> int:
    if not args.once:
        from ..service.daemon import run_forever
        return run_forever(args.config)
    config, plugins = _setup(args.config, log_to=sys.stdout)
    now = args.now or dt.datetime.now(dt.UTC)

    async def work(rt: Runtime) -> int:
        for b in await rt.state.backfills("running"):
            await backfills.run(rt, b.id)
        results = {}
        for name, src in config.sources.items():
            if src.enabled:
                results[name] = await run_due(rt, name, now)
        failed = any(v == "failed" for r in results.values() for part in r.values() for v in part.values())
        return EXIT_FAILED if failed else 0

    return asyncio.run(_with_runtime(config, plugins, work))


def cmd_load(args) -> int:
    config, plugins = _setup(args.config)
    if args.source not in config.sources:
        print(f"unknown source {args.source!r} (configured: {', '.join(sorted(config.sources))})", file=sys.stderr)
        return EXIT_CONFIG

    async def work(rt: Runtime) -> int:
        out = await load_partition(rt, args.source, args.day, "manual")
        detail = {"succeeded": f"generation {out.generation}, {out.rows} rows",
                  "empty": "no rows for that day yet; nothing written",
                  "failed": out.reason or ""}[out.status]
        print(f"{args.source} {args.day}: {out.status}: {detail}")
        return 0 if out.status != "failed" else EXIT_FAILED

    return asyncio.run(_with_runtime(config, plugins, work))


class Progress:
    """A progress bar on a terminal, plain lines otherwise."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, done: int, total: int, source: str, day: dt.date, status: str) -> None:
        if self.tty:
            width = 30
            filled = int(width * done / total) if total else width
            self.stream.write(f"\r[{'#' * filled}{'-' * (width - filled)}] {done}/{total} {source} {day} {status}   ")
            if done == total:
                self.stream.write("\n")
        else:
            self.stream.write(f"{done}/{total} {source} {day} {status}\n")
        self.stream.flush()


def cmd_backfill(args) -> int:
    config, plugins = _setup(args.config)
    if bool(args.all) == bool(args.source):
        print("name one SOURCE or --all", file=sys.stderr)
        return EXIT_CONFIG

    async def work(rt: Runtime) -> int:
        try:
            sources = backfills.resolve_sources(rt, "*" if args.all else args.source)
            found = None if args.request_id else await rt.state.find_backfill(sources, args.first, args.last)
            if found:
                print(f"resuming backfill {found.id} ({found.day_from} to {found.day_to})")
                b = found
            else:
                b, created = await backfills.submit(rt, sources, args.first, args.last,
                                                    request_id=args.request_id, origin="cli")
                if not created:
                    print(f"backfill {b.id} with request id {args.request_id} exists already ({b.status})")
                    if b.status != "running":
                        return 0
                else:
                    print(f"backfill {b.id} stored: {', '.join(sources)} from {args.first} to {args.last}")
        except backfills.BackfillRejected as exc:
            print(f"backfill refused: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        status = await backfills.run(rt, b.id, Progress())
        print(f"backfill {b.id}: {status}")
        return 0 if status == "done" else EXIT_FAILED

    return asyncio.run(_with_runtime(config, plugins, work))


def cmd_status(args) -> int:
    config, plugins = _setup(args.config)

    async def work() -> int:
        state = await StateStore(config.state_path(), writer=False).open()
        try:
            names = [args.source] if args.source else sorted(config.sources)
            for n in names:
                if n not in config.sources:
                    print(f"unknown source {n!r}", file=sys.stderr)
                    return EXIT_CONFIG
            now = dt.datetime.now(dt.UTC)
            report = [await source_status(config, state, n, args.days, now) for n in names]
            backfill_list = [{"id": b.id, "sources": b.sources, "from": str(b.day_from), "to": str(b.day_to),
                              "status": b.status} for b in await state.backfills("running")]
        finally:
            await state.close()
        if args.json:
            print(json.dumps({"sources": report, "backfills": backfill_list}, default=str, indent=2))
            return 0
        for s in report:
            print(f"{s['source']} ({s['kind']}, {s['connection']}, {s['timezone']}): last {s['last_status'] or '-'}, "
                  f"last loaded day {s['last_loaded_day'] or '-'}")
            print(f"  next load window {s['next_load']}" +
                  (f", next re-check {s['next_recheck']}" if s["next_recheck"] else ""))
            for d in s["days"]:
                rows = "-" if d["rows"] is None else d["rows"]
                print(f"  {d['day']}  {d['status']:<9} rows {rows:<10} gen {d['generation']:<4} "
                      f"loaded {d['loaded_at'] or '-'}" + (f"  ({d['error']})" if d["error"] and d["status"] == "failed" else ""))
        for b in backfill_list:
            print(f"backfill {b['id']} running: {', '.join(b['sources'])} {b['from']}..{b['to']}")
        return 0

    return asyncio.run(work())


def cmd_usage(args) -> int:
    config, _ = _setup(args.config)

    async def work() -> int:
        state = await StateStore(config.state_path(), writer=False).open()
        try:
            rows = await state.usage(args.first, args.last)
        finally:
            await state.close()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'source':<20} {'day':<10} {'trigger':<10} {'rows':>12} {'loads':>6}")
        for r in rows:
            print(f"{r['source']:<20} {r['day']:<10} {r['trigger']:<10} {r['rows']:>12} {r['loads']:>6}")
        total = sum(r["rows"] or 0 for r in rows)
        print(f"{'total':<42} {total:>12}")
        return 0

    return asyncio.run(work())


COMMANDS = {"run": cmd_run, "check": cmd_check, "plugins": cmd_plugins, "load": cmd_load,
            "backfill": cmd_backfill, "status": cmd_status, "usage": cmd_usage}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    use_system_memory_pool()
    try:
        if args.command == "request":
            from .request import cmd_request
            return cmd_request(args)
        return COMMANDS[args.command](args)
    except ConfigErrors as exc:
        print("configuration error:", file=sys.stderr)
        for e in exc.errors:
            print(f"  {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StateError as exc:
        print(f"state error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except IngestdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The status page at `/`: server-rendered HTML with inline CSS and a few lines of inline script
(no front-end build). Per source a calendar row of the last `calendar_days` days, each cell
coloured by its state, with the day's runs shown on hover or click (focus); the running loads and
backfills; the next windows. It reloads itself every `refresh_seconds` unless a day is open."""

from __future__ import annotations

import datetime as dt
import json
from html import escape
from typing import Any

STATES: dict[str, tuple[str, str]] = {
    "loaded": ("#2da44e", "loaded: one generation served"),
    "reloaded": ("#116329", "reloaded: served a newer generation after a change"),
    "empty": ("#d0d7de", "empty: checked, no rows yet (or not ready)"),
    "emptied": ("#8c959f", "emptied: the warehouse has no rows any more; an empty generation is served"),
    "held": ("#d4a72c", "held: a large drop waits for your confirmation; the old generation is served"),
    "failed": ("#cf222e", "failed: the last attempt failed"),
    "loading": ("#0969da", "loading now"),
    "missing": ("#ffffff", "missing: never loaded or checked"),
}
"""Each day state (`views.day_view`), its colour and what it means; the legend shows them."""

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:10px 20px;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0} header .muted{color:#afb8c1}
main{padding:16px 20px;max-width:1200px}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:12px 16px;margin-bottom:14px}
h2{font-size:15px;margin:0 0 8px} .muted{color:#656d76} .bad{color:#cf222e} .ok{color:#1a7f37}
.src{margin-bottom:14px} .src h3{font-size:14px;margin:0 0 4px} .src .meta{font-size:12px;color:#656d76;margin-bottom:6px}
.grid{display:flex;gap:3px;flex-wrap:nowrap}
.cell{position:relative;width:24px;height:30px;border-radius:3px;border:1px solid rgba(27,31,36,.15);box-sizing:border-box;
 font-size:10px;text-align:center;line-height:30px;color:#fff;cursor:pointer;outline:none}
.cell.wknd{box-shadow:inset 0 -3px 0 rgba(0,0,0,.18)} .cell.today{border:2px solid #1f2328}
.cell:focus{border:2px solid #bf3989}
.st-missing,.st-empty{color:#57606a} .st-missing{border-style:dashed}
.st-loading{animation:pulse 1.2s ease-in-out infinite} @keyframes pulse{50%{opacity:.55}}
.tip{display:none;position:absolute;top:34px;left:0;z-index:10;width:440px;background:#fff;color:#1f2328;text-align:left;
 line-height:1.35;border:1px solid #d0d7de;border-radius:6px;box-shadow:0 8px 24px rgba(140,149,159,.3);padding:8px 10px;
 font-size:12px;cursor:auto;max-height:60vh;overflow:auto;overflow-wrap:anywhere}
.cell:hover .tip,.cell:focus .tip,.cell:focus-within .tip{display:block}
.grid .cell:nth-last-child(-n+16) .tip{left:auto;right:0}
.tip table{border-collapse:collapse;width:100%;margin-top:4px;table-layout:fixed} .tip td,.tip th{border-top:1px solid #eaeef2;padding:2px 4px;
 vertical-align:top;text-align:left} .tip pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:2px 0;font-size:11px;background:#f6f8fa;padding:3px}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;font-size:12px}
.sw{display:inline-block;width:12px;height:12px;border-radius:2px;border:1px solid rgba(27,31,36,.25);vertical-align:-2px;
 margin-right:4px}
table.list{border-collapse:collapse;width:100%;font-size:13px} table.list td,table.list th{text-align:left;padding:3px 8px;
 border-top:1px solid #eaeef2}
.bar{display:inline-block;width:160px;height:10px;background:#eaeef2;border-radius:5px;overflow:hidden;vertical-align:middle}
.bar i{display:block;height:100%;background:#0969da}
"""

SCRIPT = """
(function(){var s=%d;if(!s)return;setInterval(function(){var a=document.activeElement;
if(a&&a.classList&&a.classList.contains('cell'))return;if(document.querySelector('.cell:hover'))return;
location.reload();},s*1000);})();
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


def _when(iso: str | None, now: dt.datetime) -> str:
    if not iso:
        return "-"
    try:
        t = dt.datetime.fromisoformat(iso)
    except ValueError:
        return _e(iso)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    secs = (t - now).total_seconds()
    rel = _span(abs(secs))
    return f"{t.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC ({'in ' + rel if secs > 0 else rel + ' ago'})"


def _span(secs: float) -> str:
    if secs < 90:
        return f"{int(secs)} s"
    if secs < 5400:
        return f"{int(secs // 60)} min"
    if secs < 172800:
        return f"{secs / 3600:.1f} h"
    return f"{secs / 86400:.1f} days"


def _num(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "-"


def _runs(day: dict[str, Any]) -> str:
    if not day["runs"]:
        return "<div class='muted'>no runs</div>"
    rows = []
    for r in day["runs"]:
        dur = f"{r['duration_ms'] / 1000:.1f} s" if r["duration_ms"] is not None else "running"
        rows.append(f"<tr><td>{_e(r['trigger'])}</td><td>{_e(r['status'])}</td><td>{_e(r['generation'])}</td>"
                    f"<td>{_num(r['rows_written'] if r['status'] != 'running' else r['rows_fetched'])}</td>"
                    f"<td>{_num(r['rows_rejected'])}</td><td>{dur}</td><td>{_e((r['started_at'] or '')[5:16].replace('T', ' '))}</td></tr>")
        if r["reason"]:
            rows.append(f"<tr><td colspan=7 class='bad'>{_e(r['reason'])}</td></tr>")
        if r["rejects"]:
            reasons = ", ".join(f"{_e(k)}: {_num(v)}" for k, v in r["rejects"].items())
            samples = "".join(f"<pre>{_e(s['reason'])}: {_e(json.dumps(s['row'], default=str)[:240])}</pre>"
                              for s in r["reject_samples"])
            rows.append(f"<tr><td colspan=7>rejected: {reasons}{samples}</td></tr>")
    return ("<table><tr><th style='width:17%'>trigger</th><th style='width:19%'>status</th><th style='width:8%'>gen"
            "</th><th style='width:14%'>rows</th><th style='width:9%'>rej.</th><th style='width:11%'>took</th>"
            "<th style='width:22%'>started UTC</th></tr>" + "".join(rows) + "</table>")


def _cell(day: dict[str, Any], today: str) -> str:
    state = day["state"]
    d = dt.date.fromisoformat(day["day"])
    classes = ["cell", f"st-{state}"] + (["wknd"] if day["weekday"] >= 6 else []) + (["today"] if day["day"] == today
                                                                                     else [])
    colour = STATES.get(state, ("#fff", ""))[0]
    tip = (f"<div class='tip' role='tooltip'><b>{_e(day['day'])}</b> ({d:%a}) · <b>{_e(state)}</b><br>"
           f"{_e(day['summary'])}{' · marked ready' if day.get('ready_at') else ''}{_runs(day)}</div>")
    return (f"<div class='{' '.join(classes)}' style='background:{colour}' tabindex='0' data-day='{_e(day['day'])}' "
            f"data-state='{_e(state)}' aria-label='{_e(day['day'])}: {_e(state)}'>{d.day}{tip}</div>")


def render(report: dict[str, Any], readiness: dict[str, Any], *, refresh_seconds: int, days: int) -> str:
    now = dt.datetime.now(dt.UTC)
    sources = []
    for s in report["sources"]:
        cells = "".join(_cell(d, s["today"]) for d in s["calendar"])
        first, last = s["calendar"][0]["day"], s["calendar"][-1]["day"]
        sources.append(
            f"<div class='src' data-source='{_e(s['source'])}'><h3>{_e(s['source'])}</h3>"
            f"<div class='meta'>{_e(s['kind'])} from {_e(s['connection'])} · {_e(s['timezone'])} · last loaded day "
            f"{_e(s['last_loaded_day'] or '-')} · last run {_e(s['last_status'] or '-')} · {first} to {last}</div>"
            f"<div class='grid'>{cells}</div></div>")
    legend = "".join(f"<span title='{_e(text)}'><span class='sw' style='background:{colour}'></span>{_e(name)}</span>"
                     for name, (colour, text) in STATES.items())
    loads = [(s["source"], ld) for s in report["sources"] for ld in s["loading"]]
    load_rows = "".join(
        f"<tr data-run='{_e(ld['run_id'])}'><td>{_e(src)}</td><td>{_e(ld['day'])}</td><td>{_e(ld['trigger'])}</td>"
        f"<td>gen {_e(ld['generation'])}</td><td>{_num(ld['rows_so_far'])} rows so far</td>"
        f"<td>{_when(ld['started_at'], now)}</td></tr>" for src, ld in loads)
    bf_rows = "".join(
        f"<tr data-backfill='{b['id']}'><td>backfill {b['id']}</td><td>{_e(', '.join(b['sources']))}</td>"
        f"<td>{_e(b['from'])} to {_e(b['to'])}</td><td><span class='bar'><i style='width:"
        f"{100 * b['done'] // max(b['total'], 1)}%'></i></span> {b['done']}/{b['total']} days"
        f"{', ' + str(b['failed']) + ' failed' if b['failed'] else ''}</td><td>{_num(b['rows'])} rows</td></tr>"
        for b in report["backfills"])
    running = ((f"<table class='list'>{load_rows}</table>" if load_rows else "<div class='muted'>no load running</div>")
               + (f"<table class='list'>{bf_rows}</table>" if bf_rows else "<div class='muted'>no backfill running</div>"))
    windows = "".join(
        f"<tr><td>{_e(s['source'])}</td><td>load {_when(s['next_load'], now)}</td>"
        f"<td>{'re-check ' + _when(s['next_recheck'], now) if s['next_recheck'] else 're-checks off'}</td></tr>"
        for s in report["sources"])
    bad = [f"{_e(k)}: {_e(c['detail'])}" for k, c in readiness["checks"].items() if not c["ok"]]
    ready = "<span class='ok'>ready</span>" if readiness["ready"] else f"<span class='bad'>not ready: {'; '.join(bad)}</span>"
    refresh = f"<noscript><meta http-equiv='refresh' content='{refresh_seconds}'></noscript>" if refresh_seconds else ""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ingestd · {_e(report['instance'])}"
            f"</title><meta name='viewport' content='width=device-width'>{refresh}<style>{CSS}</style></head><body>"
            f"<header><h1>ingestd</h1><span>{_e(report['instance'])}</span><span>{ready}</span>"
            f"<span class='muted'>{_e(report['activity'])}</span><span class='muted'>{now:%Y-%m-%d %H:%M:%S} UTC"
            f"{f' · refreshes every {refresh_seconds} s' if refresh_seconds else ''}</span></header><main>"
            f"<section id='calendar'><h2>Last {days} days</h2>{''.join(sources) or 'no source configured'}"
            f"<div class='legend'>{legend}</div><div class='muted' style='font-size:12px;margin-top:4px'>Hover or click a "
            f"day for its runs. A dark outline is today; a shaded foot, a weekend.</div></section>"
            f"<section id='running'><h2>Running</h2>{running}</section>"
            f"<section id='windows'><h2>Next windows</h2><table class='list'>{windows}</table></section>"
            f"</main><script>{SCRIPT % refresh_seconds}</script></body></html>")

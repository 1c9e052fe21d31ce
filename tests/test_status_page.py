"""The status page in a real headless browser (Debian's chromium over the DevTools protocol):
a state with loaded, reloaded, failed, held, empty and running days, cells asserted from the
DOM, a day's runs shown on hover and on click, and a screenshot saved under the test's tmp path."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.chromium import Browser
from tests.http_support import TOKEN, RunningDaemon
from tests.support import cli_env, ingestd, slow_plugin, state_query, wait_for, write_config

TODAY = dt.datetime.now(dt.UTC).date()


def day(n: int) -> dt.date:
    return TODAY - dt.timedelta(days=n)


LOADED, RELOADED, FAILED, HELD, RUNNING = day(9), day(8), day(5), day(6), day(12)


@pytest.fixture
def page_state(tmp_path, warehouse):
    """Days in every state, made through the CLI; then a daemon whose slow load of RUNNING is
    running while the page is read."""
    warehouse.add_events(LOADED, 40)
    warehouse.add_events(RELOADED, 30)
    warehouse.add_events(HELD, 100)
    warehouse.add_events(RUNNING, 30_000)
    warehouse.add_events(FAILED, 20, event="x" * 200)  # over-long names: every row rejected, the load fails
    extra = ""
    cfg = write_config(tmp_path, connection_type="slowduck", schedule='["0 0 * * *"]', recheck='["0 0 * * *"]',
                       lookback=8, extra=extra)
    cfg.write_text(cfg.read_text().replace("max_reject_pct = 1.0", "max_reject_pct = 1.0\nhold_drop_pct = 50.0"))
    env = cli_env([slow_plugin(tmp_path)], INGESTD_TEST_SLOW_S="0", INGESTD_TEST_TOKEN=TOKEN)
    for d in (LOADED, RELOADED, RELOADED, HELD, FAILED):
        ingestd("load", "orders", "--day", d.isoformat(), config=cfg, env=env)
    warehouse.execute("DELETE FROM events_raw WHERE ts >= ? AND ts < ? AND user_id NOT IN ('u1', 'u2', 'u3')",
                      [HELD, HELD + dt.timedelta(days=1)])
    out = ingestd("run", "--once", config=cfg, env=env)  # the re-check holds HELD's drop of 97%
    assert out.returncode in (0, 1), out.stderr
    env["INGESTD_TEST_SLOW_S"] = "0.5"
    cfg.write_text(cfg.read_text() + f'\n[http]\nport = {__import__("tests.broker").broker.free_port()}\n'
                   'refresh_seconds = 0\ntoken_env = "INGESTD_TEST_TOKEN"\n')
    daemon = RunningDaemon(tmp_path, config=cfg, env=env,
                           port=int(cfg.read_text().split("port = ")[-1].split()[0]))
    try:
        daemon.wait_listening()
        status, answer, _ = daemon.post("/api/v1/reload", {"source": "orders", "day": RUNNING.isoformat()})
        assert status == 202, answer
        wait_for(lambda: state_query(tmp_path / "state.db", "SELECT 1 FROM runs WHERE status = 'running'"),
                 what="the slow load to run")
        yield daemon
    finally:
        daemon.stop()


async def test_the_status_page_in_chromium(page_state, tmp_path):
    daemon = page_state
    async with Browser(tmp_path / "chromium-profile") as browser:
        await browser.open(daemon.url + "/")
        cells = await browser.js("Object.fromEntries([...document.querySelectorAll("
                                 "'[data-source=orders] .cell')].map(c => [c.dataset.day, c.dataset.state]))")
        assert len(cells) == 35 and max(cells) == TODAY.isoformat()
        assert cells[LOADED.isoformat()] == "loaded"
        assert cells[RELOADED.isoformat()] == "reloaded"
        assert cells[FAILED.isoformat()] == "failed"
        assert cells[HELD.isoformat()] == "held"
        assert cells[RUNNING.isoformat()] == "loading"
        assert cells[day(2).isoformat()] == "empty" and cells[day(30).isoformat()] == "missing"
        colours = await browser.js("Object.fromEntries([...document.querySelectorAll('.cell')].map("
                                   "c => [c.dataset.state, getComputedStyle(c).backgroundColor]))")
        assert colours["failed"] != colours["loaded"] != colours["held"]
        legend = await browser.js("[...document.querySelectorAll('.legend > span')].map(s => s.textContent)")
        assert legend == ["loaded", "reloaded", "empty", "emptied", "held", "failed", "loading", "missing"]
        running = await browser.js("document.querySelector('#running').innerText")
        assert RUNNING.isoformat() in running and "rows so far" in running and "manual" in running
        windows = await browser.js("document.querySelector('#windows').innerText")
        assert "load 20" in windows and "re-check 20" in windows

        failed = f".cell[data-day='{FAILED.isoformat()}']"
        assert await browser.js(f"getComputedStyle(document.querySelector(\"{failed} .tip\")).display") == "none"
        await browser.hover(failed)
        assert await browser.js(f"getComputedStyle(document.querySelector(\"{failed} .tip\")).display") == "block"
        tip = await browser.js(f"document.querySelector(\"{failed} .tip\").innerText")
        assert "rows rejected" in tip and "max_reject_pct" in tip and "manual" in tip
        assert "event_name_too_long" in tip or "too long" in tip  # rejects with samples
        await browser.screenshot(tmp_path / "status-page-hover.png")

        held = f".cell[data-day='{HELD.isoformat()}']"
        await browser.hover("header")
        shot = await browser.screenshot(tmp_path / "status-page.png", clip=(1240, 470))  # as README's docs/ has it
        await browser.js(f"document.querySelector(\"{held}\").focus()")  # a click (or Tab) focuses the day
        assert await browser.js(f"getComputedStyle(document.querySelector(\"{held} .tip\")).display") == "block"
        tip = await browser.js(f"document.querySelector(\"{held} .tip\").innerText")
        assert "held" in tip and "confirm with" in tip
        await browser.screenshot(tmp_path / "status-page-day.png")
    assert shot.stat().st_size > 10_000

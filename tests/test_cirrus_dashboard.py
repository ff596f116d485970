"""cirrus.dashboard: the live web dashboard of a grid search -- its HTTP API, and the page in a real
headless Chromium (Debian's chromium + chromium-driver through selenium; .ci/run installs them)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import struct
import time

import aiohttp
import pytest

from cirrus import GridSearch, LogisticRegression
from cirrus.dashboard import MAX_POINTS, Dashboard, downsample
from cirrus.dataset import write_arrays_sync
from cirrus.generators import criteo_like
from zipcomm.testing.wait import until as _until

MODEL = 2 ** 11
SCREENSHOT_COPY = "/tmp/cirrus-dashboard.png"


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    data, _ = criteo_like(20_000, hash_bits=10, seed=5)
    u = str(tmp_path_factory.mktemp("dash") / "ds")
    write_arrays_sync(u, data.labels, csr=(data.indptr, data.indices, data.values, data.n_features),
                      partition_bytes=100_000)
    return u


def _base(uri: str, timeout: float = 30) -> dict:
    return {"dataset": uri, "n_workers": 1, "model_size": MODEL, "timeout": timeout, "eval_interval": 0.3,
            "epsilon": 0.0, "opt_method": "sgd"}


# -- processes -------------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def _dead(pid: int) -> bool:
    st = _stat(pid)
    return st is None or st[0] in ("Z", "X")


def _descendants(root: int) -> set[int]:
    """Live (non-zombie) processes below ``root``."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[0] not in ("Z", "X"):
                children.setdefault(st[1], []).append(int(name))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


# -- the HTTP API (no browser) ---------------------------------------------------------------------------
def test_state_json_kill_404_409_and_run_async_ui(uri, capsys) -> None:
    async def go():
        gs = GridSearch(task=LogisticRegression, param_base=_base(uri), hyper_vars=["learning_rate"],
                        hyper_params=[[0.05, 0.1, 0.2]], num_jobs=1, stop_rules=False, progress=False)
        run = asyncio.create_task(gs.run_async(UI=True))
        try:
            url = await _until(lambda: (m := re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)",
                                                       capsys.readouterr().err)) and m.group(1),
                               "the dashboard URL on stderr", limit=30)
            async with aiohttp.ClientSession() as s:
                async with s.get(url) as r:
                    assert r.status == 200 and "/static/app.js" in await r.text()
                for f in ("app.js", "style.css", "index.html"):
                    async with s.get(url + "static/" + f) as r:
                        assert r.status == 200, f
                async with s.get(url + "static/../dashboard.py") as r:
                    assert r.status in (403, 404)

                async def state():
                    async with s.get(url + "api/state") as r:
                        assert r.status == 200 and r.content_type == "application/json"
                        return await r.json()

                # the running experiment's curve grows; the state has the documented shape
                first = await _until(lambda: _grown(state, 0, 2), "experiment 0's first evaluations")
                assert first["hyper_vars"] == ["learning_rate"]
                e0, e1, e2 = first["experiments"]
                assert [e["index"] for e in (e0, e1, e2)] == [0, 1, 2]
                assert e0["hyper"] == {"learning_rate": 0.05} and e2["hyper"] == {"learning_rate": 0.2}
                assert e0["state"] == "running" and e1["state"] == e2["state"] == "queued"
                assert set(e0) >= {"index", "hyper", "state", "reason", "loss", "points", "n_points",
                                   "updates_per_s", "cost", "saved"}
                assert e0["n_points"] == len(e0["points"]) >= 2
                assert all(len(p) == 2 and p[0] >= 0 and math.isfinite(p[1]) for p in e0["points"])
                assert e0["loss"] == e0["points"][-1][1]
                assert e0["updates_per_s"] > 0 and e0["cost"] > 0 and e1["points"] == []
                tot = first["totals"]
                assert tot["cost"] > 0 and tot["savings"] == 0 and tot["counts"] == {"running": 1, "queued": 2}
                assert tot["cost_series"] and all(len(p) == 2 for p in tot["cost_series"])
                later = await _until(lambda: _longer_series(state, len(tot["cost_series"])),
                                     "the dashboard's own cost sampling", limit=10)
                assert later["totals"]["cost_series"][-1][0] > tot["cost_series"][-1][0]

                for bad in ("3", "99", "-1", "x"):
                    async with s.post(url + f"api/kill/{bad}") as r:
                        assert r.status == 404, bad
                async with s.get(url + "api/kill/0") as r:
                    assert r.status == 405                      # killing takes a POST
                async with s.post(url + "api/kill/2", headers={"Origin": "http://evil.example"}) as r:
                    assert r.status == 403                      # a cross-site POST
                assert gs.experiments[2].state == "queued"
                async with s.post(url + "api/kill/2") as r:     # a queued one: it never starts
                    assert r.status == 200 and (await r.json())["state"] == "killed"
                async with s.post(url + "api/kill/2") as r:
                    assert r.status == 409 and "killed" in (await r.json())["error"]
                async with s.post(url + "api/kill_all") as r:
                    assert r.status == 200 and sorted((await r.json())["killed"]) == [0, 1]
                async with s.post(url + "api/kill/0") as r:
                    assert r.status == 409
                await asyncio.wait_for(asyncio.shield(run), 60)
                assert [e.state for e in gs.experiments] == ["killed", "killed", "killed"]
                with pytest.raises(aiohttp.ClientConnectionError):  # the dashboard ends with the grid
                    async with s.get(url + "api/state") as r:
                        pass
        finally:
            gs.kill_all()
            await asyncio.wait_for(run, 60)

    asyncio.run(go())


async def _grown(state, i: int, n: int):
    """The state once experiment i has n evaluations and its workers reported updates (on a busy
    machine the first progress report can come after the first evaluations)."""
    st = await state()
    e = st["experiments"][i]
    return st if e["n_points"] >= n and e["updates_per_s"] > 0 else None


async def _longer_series(state, n: int):
    st = await state()
    return st if len(st["totals"]["cost_series"]) > n else None


def test_non_loopback_refused_and_curves_bounded(uri) -> None:
    gs = GridSearch(task=LogisticRegression, param_base=_base(uri), hyper_vars=["learning_rate"],
                    hyper_params=[[0.1, 0.2]], progress=False)
    for host in ("0.0.0.0", "10.1.2.3", "example.com", "::"):
        with pytest.raises(ValueError, match="allow_remote"):
            Dashboard(gs, host=host)
    Dashboard(gs, host="0.0.0.0", allow_remote=True)          # allowed when asked for
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        Dashboard(gs, host=host)
    with pytest.raises(RuntimeError, match="start"):
        Dashboard(gs).url

    # a long curve is downsampled (first and last kept), a non-finite loss becomes null
    gs.experiments[0].task.time_loss = [(0.1 * k, 1.0 / (k + 1)) for k in range(2000)]
    gs.experiments[1].task.time_loss = [(0.0, 0.7), (0.5, math.nan), (1.0, math.inf)]
    d = Dashboard(gs, history=5)
    st = d.state()
    pts = st["experiments"][0]["points"]
    assert len(pts) == MAX_POINTS and st["experiments"][0]["n_points"] == 2000
    assert pts[0] == [0.0, 1.0] and pts[-1] == [199.9, 1.0 / 2000]
    assert all(a[0] < b[0] for a, b in zip(pts, pts[1:]))
    assert st["experiments"][1]["points"] == [[0.0, 0.7], [0.5, None], [1.0, None]]
    assert st["experiments"][1]["loss"] is None
    assert downsample([(1, 1)] * 3, 500) == [(1, 1)] * 3
    for _ in range(9):
        d._sample()
    assert len(d.state()["totals"]["cost_series"]) == 5      # bounded

    async def serve_twice():
        async with Dashboard(gs) as a, Dashboard(gs) as b:   # two on free ports
            assert a.url != b.url and a.url.startswith("http://127.0.0.1:")
            async with aiohttp.ClientSession() as s, s.get(a.url + "api/state") as r:
                assert (await r.json())["experiments"][0]["n_points"] == 2000

    asyncio.run(serve_twice())


# -- the page in headless Chromium -----------------------------------------------------------------------
def _browser():
    """selenium's webdriver, Chromium and chromedriver -- or fail saying how to install them."""
    how = ("run .ci/run (it apt-installs the Debian packages chromium and chromium-driver and "
           "pip-installs selenium), or: apt-get install -y chromium chromium-driver && pip install selenium")
    try:
        from selenium import webdriver
    except ImportError:
        pytest.fail(f"selenium is not installed: {how}", pytrace=False)
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(f"Chromium or chromedriver is missing (chromium={chromium}, chromedriver={driver}): {how}",
                    pytrace=False)
    return webdriver, chromium, driver


def _start_chromium(webdriver, chromium: str, chromedriver: str):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,1400", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(executable_path=chromedriver))


_CURVES_JS = """
const out = {};
for (const p of document.querySelectorAll('#loss-chart path[data-exp]'))
  out[p.getAttribute('data-exp')] = parseInt(p.getAttribute('data-points'), 10);
return out;"""

_ROW_JS = """
const r = document.querySelector('tr[data-exp-row="' + arguments[0] + '"]');
return r ? [r.getAttribute('data-state'), r.innerText,
            !!document.querySelector('[data-kill="' + arguments[0] + '"]')] : null;"""


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_page_in_headless_chromium_draws_curves_and_kills(uri, tmp_path) -> None:
    webdriver, chromium, chromedriver = _browser()
    me = os.getpid()
    before = _descendants(me)
    shot = tmp_path / "dashboard.png"
    workers: set[int] = set()      # every worker process seen
    browser: set[int] = set()      # chromedriver and its Chromium processes

    def note_workers(gs) -> None:
        for e in gs.experiments:
            if e.task._launcher is not None:
                workers.update(e.task._launcher.pids())

    async def go():
        gs = GridSearch(task=LogisticRegression, param_base=_base(uri, timeout=30), hyper_vars=["learning_rate"],
                        hyper_params=[[0.05, 0.1, 0.2, 0.3]], num_jobs=2, stop_rules=False, progress=False)
        dash = Dashboard(gs)
        await dash.start()
        run = asyncio.create_task(gs.run_async())
        driver = None
        try:
            driver = await asyncio.to_thread(_start_chromium, webdriver, chromium, chromedriver)
            browser.add(driver.service.process.pid)
            browser.update(_descendants(driver.service.process.pid))
            await asyncio.to_thread(driver.get, dash.url)

            async def curves() -> dict[int, int]:
                note_workers(gs)
                return {int(k): v for k, v in (await asyncio.to_thread(driver.execute_script, _CURVES_JS)).items()}

            # one curve per running experiment, and each grows
            async def all_running_drawn():
                c = await curves()
                running = {e.index for e in gs.experiments if e.state == "running"}
                return c if len(running) == 2 and all(c.get(i, 0) >= 1 for i in running) else None

            first = await _until(all_running_drawn, "a curve per running experiment", limit=90, step=0.1)
            running = [e.index for e in gs.experiments if e.state == "running"]
            assert running == [0, 1] and gs.experiments[2].state == "queued"
            await _until(lambda: _all_grew(curves, first, running), "the curves to grow", limit=60, step=0.1)
            browser.update(_descendants(driver.service.process.pid))

            # kill experiment 1 from the page: its worker processes die within a second of the click
            victim = gs.experiments[1]
            pids = await _until(lambda: victim.task._launcher is not None and victim.task._launcher.pids(),
                                "experiment 1's workers")
            button = await asyncio.to_thread(driver.find_element, "css selector", '[data-kill="1"]')
            clicked = time.monotonic()
            await asyncio.to_thread(button.click)
            await _until(lambda: all(_dead(p) for p in pids), "the killed experiment's workers to die",
                         limit=max(0.05, 1.0 - (time.monotonic() - clicked)), step=0.005)
            took = time.monotonic() - clicked
            assert took < 1.0, took
            assert victim.state == "killed" and gs.experiments[0].state == "running"

            async def row_killed():
                row = await asyncio.to_thread(driver.execute_script, _ROW_JS, 1)
                return row if row and row[0] == "killed" else None

            state, text, has_button = await _until(row_killed, "the page to show experiment 1 killed", step=0.1)
            assert "killed" in text and not has_button
            # the queued experiment took the freed slot, and the page follows it
            await _until(lambda: _curve_of(curves, 2), "a curve of experiment 2", limit=60, step=0.1)
            path_state = await asyncio.to_thread(
                driver.execute_script, "return document.querySelector('path[data-exp=\"1\"]')"
                                       ".getAttribute('data-state')")
            assert path_state == "killed"
            # best / worst k selector
            shown_best = await asyncio.to_thread(driver.execute_script, """
                const f = document.getElementById('filter'); f.value = 'best';
                document.getElementById('k').value = '1'; f.dispatchEvent(new Event('change'));
                const n = document.querySelectorAll('#loss-chart path[data-exp]').length;
                f.value = 'all'; f.dispatchEvent(new Event('change'));
                return [n, document.querySelectorAll('#loss-chart path[data-exp]').length];""")
            assert shown_best[0] == 1 and shown_best[1] >= 3, shown_best
            totals = await asyncio.to_thread(
                driver.execute_script, "return [document.getElementById('total-cost').textContent,"
                "document.getElementById('total-savings').textContent,"
                "document.querySelectorAll('#cost-chart #cost-line').length]")
            assert totals[0].startswith("$") and totals[1].startswith("$") and totals[2] == 1, totals

            browser.update(_descendants(driver.service.process.pid))
            assert await asyncio.to_thread(driver.save_screenshot, str(shot))
            shutil.copyfile(shot, SCREENSHOT_COPY)

            # kill all from the page, and the grid ends
            note_workers(gs)
            kill_all = await asyncio.to_thread(driver.find_element, "css selector", "#kill-all")
            await asyncio.to_thread(kill_all.click)
            await asyncio.wait_for(asyncio.shield(run), 60)
            assert [e.state for e in gs.experiments] == ["killed"] * 4
            assert gs.get_savings() > 0
        finally:
            note_workers(gs)
            gs.kill_all()
            try:
                await asyncio.wait_for(run, 60)
            finally:
                if driver is not None:
                    with contextlib.suppress(Exception):
                        browser.update(_descendants(driver.service.process.pid))
                    await asyncio.to_thread(driver.quit)
                await dash.aclose()

    try:
        asyncio.run(go())
    finally:
        for pid in browser:            # only if quitting left any behind: end them, by id
            if not _dead(pid):
                with contextlib.suppress(Exception):
                    os.kill(pid, signal.SIGKILL)

    size = _png_size(shot)
    assert size[0] >= 800 and size[1] >= 600, size
    assert shot.stat().st_size > 20_000 and os.path.getsize(SCREENSHOT_COPY) == shot.stat().st_size

    # nothing leaked: no worker, parameter server, chromedriver or Chromium process remains
    assert workers and browser
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (any(not _dead(p) for p in workers | browser)
                                           or _descendants(me) - before):
        time.sleep(0.05)
    assert [p for p in workers if not _dead(p)] == []
    assert [p for p in browser if not _dead(p)] == []
    assert _descendants(me) - before == set()


async def _all_grew(curves, first: dict[int, int], which: list[int]) -> bool:
    c = await curves()
    return all(c.get(i, 0) > first[i] for i in which)


async def _curve_of(curves, i: int) -> bool:
    return (await curves()).get(i, 0) >= 1

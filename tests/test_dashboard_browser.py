# The operator dashboard in a real browser: Debian's headless chromium driven by selenium
# through the system chromedriver (no driver download). Three node.py processes with task rounds
# on a shared embedded ledger; the page of one node must show the same figures as its JSON API
# (peer id, members alive, keys), show a SIGKILLed node turn suspect then dead, give every task
# its rewards chart, show the claimable rewards /tasks and /wallet give, and show a round's
# reward once the node claimed one. On failure a screenshot and the page source are
# kept in test-artifacts/ at the repository root. A missing browser FAILS the test: CI
# installs it (scripts/setup), and a skipped browser test would hide a broken dashboard.
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tasknet_node import datadir

from process_helpers import ROOT, NodeProcess, Processes, processes_fixture, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "test-artifacts"
ROUND_TIME = "3"
TASK = "hello"

processes = processes_fixture(NodeProcess)


def _missing_browser() -> str | None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        return (f"the dashboard's browser test needs {', '.join(missing)}: install Debian's "
                f"chromium and chromium-driver (scripts/setup does: apt-get install -y chromium "
                f"chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the dashboard's browser test needs selenium: pip install -e '.[dev]'"
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless chromium through /usr/bin/chromedriver; quit at teardown whatever happened."""
    why = _missing_browser()
    if why is not None:
        pytest.fail(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--no-first-run", "--disable-extensions",
                     "--disable-background-networking", "--window-size=1400,2000",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


@contextmanager
def artifacts_on_failure(driver: Any, name: str, nodes: list[NodeProcess]) -> Iterator[None]:
    """On any failure inside: a screenshot, the page source and the nodes' output go to
    test-artifacts/NAME-TIME/, and the assertion says where."""
    try:
        yield
    except Exception as exc:
        folder = ARTIFACTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder.mkdir(parents=True, exist_ok=True)
        saved = []
        try:
            driver.save_screenshot(str(folder / "page.png"))
            (folder / "page.html").write_text(driver.page_source)
            saved.append("page.png, page.html")
        except Exception as shot_error:  # the browser itself may be what failed
            (folder / "browser-error.txt").write_text(repr(shot_error))
        for i, node in enumerate(nodes):
            for path in (node.out, node.err):
                if path.exists():
                    shutil.copy(path, folder / f"node{i}-{path.name}")
        raise AssertionError(f"{exc}\n(dashboard artifacts kept in {folder}: "
                             f"{', '.join(saved) or 'no screenshot'}, node output)") from exc


def get_json(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=5) as response:
        return json.loads(response.read())


def put_key(base: str, key: str, value: Any) -> bool:
    """Write one key; False while the store answers 503 (replicas still connecting)."""
    request = urllib.request.Request(base + f"/kv/{key}", method="PUT",
                                     data=json.dumps({"value": value}).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status == 200
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return False
        raise


def page_values(driver: Any) -> dict[str, Any]:
    """The page's figures as the test reads them: data-value of the ids, member states by peer,
    rewards by round from the rounds table and, by task, from its chart, claimable by task."""
    return driver.execute_script("""
        const value = (id) => { const e = document.getElementById(id);
                                return e ? e.dataset.value : undefined; };
        const states = {};
        for (const row of document.querySelectorAll('#members-rows tr'))
          states[row.dataset.peer] = row.dataset.state;
        const rewards = {}, charts = {}, claimable = {};
        for (const td of document.querySelectorAll('#round-rows td.reward'))
          rewards[td.dataset.round] = Number(td.dataset.value);
        for (const figure of document.querySelectorAll('#charts figure')) {
          const bars = charts[figure.dataset.task] = {};
          for (const bar of figure.querySelectorAll('svg.rewards-chart rect.bar'))
            bars[bar.dataset.round] = Number(bar.dataset.value);
        }
        for (const row of document.querySelectorAll('#task-rows tr'))
          claimable[row.dataset.task] = row.querySelector('td.claimable').dataset.value;
        return {peer: value('node-peer-id'), alive: value('members-alive'),
                dead: value('members-dead'), keys: value('kv-keys'),
                ringRows: document.querySelectorAll('#ring-rows tr').length,
                connection: document.getElementById('connection').dataset.state,
                claimableTotal: value('wallet-claimable'), states, rewards, charts, claimable};
    """)


def wait_page(driver: Any, condition: Callable[[dict[str, Any]], Any], timeout: float,
              what: str) -> Any:
    last: dict[str, Any] = {}

    def check() -> Any:
        nonlocal last
        last = page_values(driver)
        return condition(last)

    try:
        return wait_for(check, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the page showed {last}") from None


def test_dashboard_matches_the_api_and_follows_the_cluster(
        processes: Processes, browser: Any, tmp_path: Path) -> None:
    common = ("--ledger", str(tmp_path / "ledger"), "--round-time", ROUND_TIME,
              "--heartbeat-interval", "0.5")
    boot = processes.node("n0", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", *common)
    _, addr = wait_for(boot.announced, 30, "the bootstrap node to start")
    nodes = [boot] + [processes.node(f"n{i}", "--join", addr, *common) for i in (1, 2)]
    ids = [wait_for(node.announced, 30, f"node {i} to start")[0] for i, node in enumerate(nodes)]
    base = datadir.read_api_info(boot.data_dir).url

    with artifacts_on_failure(browser, "dashboard", nodes):
        # the page and its assets come from the node itself, locked to it by CSP
        with urllib.request.urlopen(base + "/", timeout=5) as response:
            assert response.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in response.headers["content-security-policy"]
            page = response.read().decode()
        assert not re.search(r"""(src|href)=["'](https?:)?//""", page), "external load"

        def everyone_alive() -> bool:
            status = get_json(base, "/status")
            return sum(m["state"] == "alive" for m in status["members"]) == 3 \
                and status["kv"]["ring_members"] == 3
        wait_for(everyone_alive, 60, "three alive members in the ring")
        for i in range(25):
            wait_for(lambda i=i: put_key(base, f"dash-{i}", i), 30, f"key dash-{i} written")

        browser.get(base + "/")
        assert browser.title == "tasknet node"

        def matches_api(page: dict[str, Any]) -> bool:
            status = get_json(base, "/status")
            alive = sum(m["state"] == "alive" for m in status["members"])
            return (page["peer"] == status["peer_id"] == ids[0]
                    and page["alive"] == str(alive) == "3"
                    and page["keys"] == str(get_json(base, "/kv-status")["keys"])
                    and page["ringRows"] == 3 and page["connection"] == "live")
        wait_page(browser, matches_api, 30, "the page's figures to match /status")

        # a node killed: suspect first, then dead, on the page as in the API
        victim = ids[2]
        nodes[2].proc.send_signal(signal.SIGKILL)
        nodes[2].proc.wait()
        seen: list[str] = []

        def victim_dead(page: dict[str, Any]) -> bool:
            state = page["states"].get(victim)
            if state and (not seen or seen[-1] != state):
                seen.append(state)
            return state == "dead"
        wait_page(browser, victim_dead, 60, "the killed node to show dead")
        assert "suspect" in seen and seen.index("suspect") < seen.index("dead"), seen
        api_states = {m["peer_id"]: m["state"] for m in get_json(base, "/status")["members"]}
        assert api_states[victim] == "dead"
        wait_page(browser, lambda p: p["dead"] == "1" and p["alive"] == "2", 10,
                  "the page's member counts after the kill")

        # a round's reward appears, in the rounds table and the chart, as in /status
        def reward_shown(page: dict[str, Any]) -> list[str]:
            task = get_json(base, "/status")["tasks"]["tasks"].get(TASK, {})
            rewards = task.get("rewards_by_round", {})
            return [r for r, amount in rewards.items()
                    if amount > 0 and page["rewards"].get(r) == amount
                    and page["charts"].get(TASK, {}).get(r) == amount]
        rounds = wait_page(browser, reward_shown, 150, "a round's reward on the page")
        claimed = get_json(base, "/wallet")["rewards_claimed"][TASK]
        assert claimed >= max(get_json(base, "/status")["tasks"]["tasks"][TASK]
                              ["rewards_by_round"][r] for r in rounds)

        # every task has its chart of the last 20 rounds (fewer while there are fewer),
        # charting what /status gives it
        def every_task_charted(page: dict[str, Any]) -> bool:
            listing = get_json(base, "/tasks")["tasks"]
            running = get_json(base, "/status")["tasks"]["tasks"]
            return len(listing) >= 2 and sorted(page["charts"]) == sorted(
                t["task_id"] for t in listing) and all(
                len(page["charts"][t["task_id"]]) == min(20, t["round"] + 1) and all(
                    page["charts"][t["task_id"]].get(r) == amount for r, amount in running.get(
                        t["task_id"], {}).get("rewards_by_round", {}).items()
                    if int(r) > t["round"] - 20) for t in listing)
        wait_page(browser, every_task_charted, 10, "a rewards chart for every task")

        # the claimable rewards, by task and in all, as /tasks and /wallet give them
        def claimable_matches(page: dict[str, Any]) -> bool:
            listing = get_json(base, "/tasks")["tasks"]
            wallet = get_json(base, "/wallet")["claimable"]
            return page["claimable"] == {t["task_id"]: "" if t["claimable"] is None
                                         else str(t["claimable"]) for t in listing} \
                and page["claimableTotal"] == str(sum(wallet.values())) \
                and sorted(wallet) == sorted(t["task_id"] for t in listing if t["running"])
        wait_page(browser, claimable_matches, 10, "the claimable rewards to match the API")

"""The audit UI in a real Airflow api-server, seen through a real browser.

One `airflow dags test` run of eos_load writes ledger entries (its api-server starts
meanwhile); then plain HTTP requests check that every route of the plugin refuses
unauthenticated callers, and Debian's chromium (driven by Playwright, no downloaded
browser) logs in through Airflow's login page, opens the audit page and the task-instance
tab, and sees the entries. Screenshots go to test-artifacts/.

Without /usr/bin/chromium the browser part is skipped, unless EOS_REQUIRE_BROWSER=1 (CI),
which makes a missing browser a failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
import requests

from eos_airflow import Ledger, Origin
from tests.airflow.conftest import AIRFLOW, DAGS

pytestmark = pytest.mark.airflow

CHROMIUM = Path(os.environ.get("EOS_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
USERS = {"admin": "eos-admin-pw", "viewer": "eos-viewer-pw"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def up(base: str) -> bool:
    try:
        return requests.get(f"{base}/api/v2/monitor/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def browser_or_skip():
    if CHROMIUM.exists():
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            sync_playwright = None
        if sync_playwright is not None:
            return sync_playwright
    message = (
        f"no browser: needs {CHROMIUM} (apt-get install -y chromium) and the "
        "playwright package (pip install -e '.[test]')"
    )
    if os.environ.get("EOS_REQUIRE_BROWSER") == "1":
        pytest.fail(message + "; EOS_REQUIRE_BROWSER=1 makes this a failure")
    pytest.skip(message)


def test_audit_ui_in_the_api_server(airflow, db, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps(USERS))
    env = {
        **airflow.env,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__API_AUTH__JWT_SECRET": "eos-test-secret",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        # load plugins from providers (eos-airflow registers its plugin as a provider)
        "AIRFLOW__CORE__LAZY_DISCOVER_PROVIDERS": "False",
        "AIRFLOW__EOS_AIRFLOW__LEDGER_CONN_ID": "warehouse",
    }
    log = (tmp_path / "api-server.log").open("w")
    server = subprocess.Popen(
        [AIRFLOW, "api-server", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        run = subprocess.run(
            [AIRFLOW, "dags", "test", "eos_load", "2024-01-01"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        with psycopg.connect(
            airflow.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("+psycopg", "")
        ) as conn:
            (run_id,) = conn.execute(
                "SELECT run_id FROM dag_run WHERE dag_id = 'eos_load'"
            ).fetchone()
        with Ledger(db) as ledger:  # a later try of the same task instance: a skip
            assert (
                ledger.run(
                    "sales/2024-01-01",
                    lambda eos: {"never": 1},
                    attempt=2,
                    origin=Origin("eos_load", "load", run_id, -1),
                )["rows"]
                == 1
            )
        wait_until(lambda: up(base) or server.poll() is not None, 120, "the api-server")
        assert server.poll() is None, (tmp_path / "api-server.log").read_text()[-3000:]
        check_http(base, run_id)
        check_browser(base, run_id)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def check_http(base: str, run_id: str) -> None:
    ti = f"eos_load/{quote(run_id, safe='')}/load/-1"
    routes = [
        "/eos/",
        f"/eos/ti/{ti}",
        "/eos/static/audit.js",
        "/eos/api/entries",
        "/eos/api/entry?key=sales/2024-01-01",
        f"/eos/api/ti/{ti}",
        "/eos/api/activity",
        "/eos/api/verify",
    ]
    for route in routes:
        anonymous = requests.get(base + route, timeout=10)
        assert anonymous.status_code == 401, (route, anonymous.status_code, anonymous.text)
        forged = requests.get(
            base + route, headers={"Authorization": "Bearer not.a.jwt"}, timeout=10
        )
        assert forged.status_code == 403, (route, forged.status_code)
    token = requests.post(
        f"{base}/auth/token", json={"username": "viewer", "password": USERS["viewer"]}, timeout=10
    )
    assert token.status_code in (200, 201), token.text
    auth = {"Authorization": f"Bearer {token.json()['access_token']}"}
    for route in routes:
        assert requests.get(base + route, headers=auth, timeout=30).status_code == 200, route
    entries = requests.get(
        f"{base}/eos/api/entries", params={"dag_id": "eos_load"}, headers=auth, timeout=30
    ).json()["entries"]
    assert {(e["key"], e["state"], e["version"]) for e in entries} == {
        ("sales/2024-01-01", "committed", 1),
        ("sql_sales/2024-01-01", "committed", 1),
    }
    verify = requests.get(f"{base}/eos/api/verify", headers=auth, timeout=30).json()
    assert verify["ok"] and verify["events"] == 5
    timeline = requests.get(f"{base}/eos/api/ti/{ti}", headers=auth, timeout=30).json()
    assert [e["event"] for e in timeline["entries"][0]["events"]] == [
        "claimed",
        "committed",
        "skipped",
    ]
    bad = requests.get(
        f"{base}/eos/api/entries", params={"since": "soon"}, headers=auth, timeout=30
    )
    assert bad.status_code == 400 and "neither a duration" in bad.json()["detail"]


def check_browser(base: str, run_id: str) -> None:
    sync_playwright = browser_or_skip()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/eos/", wait_until="domcontentloaded")
            # not logged in: the plugin page refuses; log in through Airflow's login page
            assert "Not authenticated" in page.content()
            page.goto(f"{base}/", wait_until="domcontentloaded")
            page.wait_for_url("**/login**", timeout=60_000)
            page.locator("input[name='username']").fill("admin")
            page.locator("input[name='password']").fill(USERS["admin"])
            page.locator("button[type='submit']").click()
            page.wait_for_url(lambda url: "login" not in url, timeout=60_000)

            page.goto(f"{base}/eos/", wait_until="domcontentloaded")
            row = page.locator("tr.entry[data-key='sales/2024-01-01']")
            row.wait_for(timeout=30_000)
            assert "committed" in row.inner_text()
            page.locator("#verify.ok").wait_for(timeout=30_000)
            assert "intact — 5 events of 2 keys" in page.locator("#verify").inner_text()
            assert page.locator("#activity-chart rect.bar-commits").count() >= 1
            assert page.locator("#activity-chart rect.bar-skips").count() >= 1
            row.click()
            timeline = page.locator(".timeline[data-key='sales/2024-01-01'] tr.event")
            timeline.last.wait_for(timeout=30_000)
            assert [t.split("\t")[1] for t in timeline.all_inner_texts()] == [
                "claimed",
                "committed",
                "skipped",
            ]
            page.screenshot(path=str(ARTIFACTS / "audit-page.png"), full_page=True)

            # the task-instance tab inside Airflow's own UI (an iframe of /eos/ti/...)
            page.goto(
                f"{base}/dags/eos_load/runs/{quote(run_id, safe='')}/tasks/load/plugin/eos_ti",
                wait_until="domcontentloaded",
            )
            frame = page.frame_locator("iframe[title='Exactly-once']")
            try:
                frame.locator(".timeline[data-key='sales/2024-01-01']").wait_for(timeout=30_000)
            finally:
                page.screenshot(path=str(ARTIFACTS / "task-instance-tab.png"), full_page=True)
            assert "committed" in frame.locator(".timeline").first.inner_text()
            print(f"screenshots: {ARTIFACTS}/audit-page.png, {ARTIFACTS}/task-instance-tab.png")
        finally:
            browser.close()


def test_the_plugin_is_registered_through_the_provider():
    """Airflow's providers manager lists the plugin (provider info "plugins")."""
    code = (
        "from airflow.providers_manager import ProvidersManager; "
        "print([(p.name, p.plugin_class) for p in ProvidersManager().plugins])"
    )
    out = subprocess.run(
        [str(Path(AIRFLOW).parent / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS)},
    )
    assert "('eos_airflow', 'eos_airflow.plugin.EosAirflowPlugin')" in out.stdout, out.stderr

"""The console in a real browser (Debian's chromium, headless, through chromedriver) against the real stack:
a `ledger api` process, a worker, the projector, webhook delivery and the shared broker. One stack per module.

Screenshots of every page at 1280 px and 360 px wide go to tests/artifacts/console/ (gitignored).
"""

from __future__ import annotations

import asyncio
import csv
import http.server
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from ledger.control.keys import Scope
from ledger.control.store import ControlStore
from ledger.settings import Settings
from tests.conftest import ROOT, ProjectorProcess, WorkerProcess, new_settings, wait_processed
from tests.wall_clock import TICKS_OFF

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "tests" / "artifacts" / "console"
API_PORT = 18510
RECEIVER_PORT = 18511
WIDTHS = (1280, 360)
WAIT_S = 30.0
PLANS_FILE = ROOT / "examples" / "plans.json"
STARTER_TIER = """tier_code: "starter"
display_name: "Starter"
price_amount_cents: 2900
price_interval: "month"
spend_limit_cents: 1500
models:
  - gpt-4o-mini (default)
"""

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.fail("no /usr/bin/chromium or /usr/bin/chromedriver: `make test-deps` installs them "
                "(apt-get install chromium chromium-driver)", pytrace=False)


@dataclass
class Stack:
    settings: Settings
    base: str
    tenant_id: str
    admin_key: str
    read_key: str
    rival_user_id: str
    user_ids: dict[str, str]
    plan_ids: dict[str, str]
    start: datetime

    def api(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=f"{self.base}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)


class _Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


def _usage(user: str, n: int, at: datetime, input_tokens: int = 1000, output_tokens: int = 1000,
           model: str = "gpt-4o-mini") -> dict[str, object]:
    return {"event_id": f"{user}-{n}-{uuid.uuid4().hex[:8]}", "user": user, "model": model,
            "input_tokens": input_tokens, "output_tokens": output_tokens, "session_id": f"{user}-chat",
            "occurred_at": at.isoformat()}


@pytest.fixture(scope="module")
def stack(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from streams.topics import ensure_topics

    home = tmp_path_factory.mktemp("console")
    settings = new_settings(bootstrap, home, partitions=4)
    asyncio.run(ensure_topics(settings))
    store = ControlStore(settings.control_url)
    store.create_schema()
    with store.session() as session:
        tenant_id, admin_key = session.create_tenant("acme")
        read_key = session.create_key(tenant_id, frozenset({Scope.read}), label="console test")
        _rival_id, rival_key = session.create_tenant("rival")
    store.dispose()
    env = {**os.environ, "LEDGER_HOME": str(home), "LEDGER_NAMESPACE": settings.namespace,
           "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "LEDGER_PARTITIONS": str(settings.partitions),
           "LEDGER_WEBHOOK_ALLOW_PRIVATE": "true", "LEDGER_RATE_PER_KEY_PER_S": "1000", "LEDGER_RATE_BURST": "1000",
           **TICKS_OFF}
    now = datetime.now(UTC)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=3)
    worker = WorkerProcess(settings).start()
    projector = ProjectorProcess(settings).start()
    api_log = open(home / "api.log", "ab")
    api = subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "api", "--port", str(API_PORT)], env=env, cwd=ROOT,
                           stdout=api_log, stderr=subprocess.STDOUT)
    hooks_log = open(home / "webhooks.log", "ab")
    hooks = subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "webhooks"], env=env, cwd=ROOT,
                             stdout=hooks_log, stderr=subprocess.STDOUT)
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", RECEIVER_PORT), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{API_PORT}"
    try:
        from ledger.cli.stack import wait_for_http

        wait_for_http(f"{base}/console/sign-in", 60)
        with httpx.Client(base_url=f"{base}/api/v1", headers={"Authorization": f"Bearer {admin_key}"}, timeout=30) as api_:
            created = api_.post("/config/plans", content=PLANS_FILE.read_bytes(),
                                headers={"Content-Type": "application/json"})
            assert created.status_code == 201, created.text
            plan_ids = {p["name"]: p["id"] for p in created.json()["plans"]}
            tiers = api_.post("/config/tiers", content=STARTER_TIER, headers={"Content-Type": "application/yaml"})
            assert tiers.status_code == 201, tiers.text
            hook = api_.post("/webhooks", json={"url": f"http://127.0.0.1:{RECEIVER_PORT}/hook",
                                                "description": "test receiver"})
            assert hook.status_code == 201, hook.text
            user_ids = {}
            for user, plan in (("ana", "free"), ("bo", "free"), ("cy", "pro"), ("dee", "pro")):
                made = api_.post("/users", json={"external_id": user, "plan_id": plan_ids[plan],
                                                 "period_start": start.isoformat()})
                assert made.status_code == 201, made.text
                user_ids[user] = made.json()["id"]
            # ana: 6,000 of 10,000 gpt-4o-mini tokens (under the soft 80%); bo: 10,000 (hard); cy, dee: pro usage.
            at = start + timedelta(hours=2)
            events = [_usage("ana", n, at + timedelta(hours=n)) for n in range(3)]
            events += [_usage("bo", n, at + timedelta(hours=n, minutes=5)) for n in range(5)]
            events += [_usage("cy", n, at + timedelta(days=1, hours=n), 3000, 2000, "gpt-4o") for n in range(6)]
            events += [_usage("dee", n, at + timedelta(days=2, hours=n), 2000, 500) for n in range(4)]
            sent = api_.post("/usage", json={"events": events})
            assert sent.status_code == 202, sent.text
        with httpx.Client(base_url=f"{base}/api/v1", headers={"Authorization": f"Bearer {rival_key}"}, timeout=30) as rival:
            rival_plan = rival.post("/config/plans", content=PLANS_FILE.read_bytes(),
                                    headers={"Content-Type": "application/json"}).json()["plans"][0]["id"]
            rival_user = rival.post("/users", json={"external_id": "ana", "plan_id": rival_plan})
            assert rival_user.status_code == 201, rival_user.text
        wait_processed(settings, worker)
        projector.wait_caught_up()
        yield Stack(settings, base, tenant_id, admin_key, read_key, rival_user.json()["id"], user_ids, plan_ids, start)
    finally:
        receiver.shutdown()
        for proc in (api, hooks):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        projector.stop()
        worker.stop()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


# -- helpers ----------------------------------------------------------------------------------------------------------


def wait_for(driver, condition, timeout_s: float = WAIT_S, what: str = "") -> object:  # type: ignore[no-untyped-def]
    """Poll ``condition`` until it is truthy. An element replaced between finding it and reading it (the live
    overview swaps whole blocks when a gate event arrives) is read again at the next poll, not a failure."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # Added to the default ignored exceptions (NoSuchElementException).
    return WebDriverWait(driver, timeout_s, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(condition, message=what)


def sign_in(driver, stack: Stack, key: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{stack.base}/console/overview")
    assert "/console/sign-in" in driver.current_url
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(driver, lambda d: d.current_url.endswith("/console/overview"), what="signed in")


def click_and_load(driver, by: str, value: str) -> None:  # type: ignore[no-untyped-def]
    """Click what loads a new page, and wait until the old page is gone.

    A click returns before the page a form posts to has replaced this one, so reading straight after it can find
    the old page's elements (or have them go stale under the read).
    """
    from selenium.webdriver.common.by import By

    old_page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(by, value).click()
    wait_for(driver, lambda _: is_stale(old_page), what=f"a new page after clicking {value}")


def is_stale(element) -> bool:  # type: ignore[no-untyped-def]
    """Whether the element has left its document; selenium's `staleness_of`, minus its failure mid-navigation.

    While the old document is being replaced, chromedriver 156 sometimes answers a read of its element with
    "unknown error: unhandled inspector error: Node with given id does not belong to the document" rather than
    a stale element (6 of 300 form posts in one loop); the next read says stale. `staleness_of` lets that error
    escape and fails the test, so it is read as "not yet" here.
    """
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as error:
        if "does not belong to the document" in (error.msg or ""):
            return False
        raise
    return False


def session_client(driver, stack: Stack) -> httpx.Client:  # type: ignore[no-untyped-def]
    """An HTTP client holding the browser's session cookie, to read status codes the browser does not show."""
    cookie = driver.get_cookie("ledger_console")
    return httpx.Client(base_url=stack.base, cookies={"ledger_console": cookie["value"]}, timeout=30,
                        follow_redirects=False)


def screenshot(driver, name: str) -> list[Path]:  # type: ignore[no-untyped-def]
    """The whole page at each width; returns the files."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    written = []
    for width in WIDTHS:
        driver.set_window_size(width, 900)
        time.sleep(0.3)  # charts redraw on resize
        height = driver.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
        driver.set_window_size(width, min(int(height) + 20, 8000))
        time.sleep(0.2)
        # The page is laid out at this width (a browser may keep a window wider than asked) ...
        assert driver.execute_script("return window.innerWidth") == width, f"{name}: the window is not {width} px"
        path = ARTIFACTS / f"{name}-{width}.png"
        driver.save_screenshot(str(path))
        written.append(path)
        # ... and is readable there: nothing but a table's own scroller is wider than the window.
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 1, f"{name} at {width} px scrolls sideways by {overflow} px"
    driver.set_window_size(1280, 900)
    return written


def csp_violations(driver) -> list[str]:  # type: ignore[no-untyped-def]
    return [e["message"] for e in driver.get_log("browser")
            if "Content Security Policy" in e["message"] or "Refused to" in e["message"]]


def text_of(driver, css: str) -> str:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text.strip()


# -- the scenarios -------------------------------------------------------------------------------------------------------


def test_sign_in_with_a_read_key_sets_a_strict_session_cookie_and_never_echoes_the_key(browser, stack):
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(f"{stack.base}/console/sign-in")
    screenshot(browser, "sign-in")
    browser.find_element(By.ID, "key").send_keys("pg_live_" + "x" * 43)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".problem"), what="refused")
    assert "unknown or revoked API key" in browser.page_source and "x" * 43 not in browser.page_source
    sign_in(browser, stack, stack.read_key)
    cookie = browser.get_cookie("ledger_console")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert stack.read_key not in browser.page_source and stack.read_key not in cookie["value"]
    assert text_of(browser, ".tenant") == "acme"
    # A POST without the session's CSRF token is refused, even with the cookie.
    with session_client(browser, stack) as client:
        forged = client.post("/console/sign-out", data={"csrf": "forged"})
        assert forged.status_code == 403, forged.text
    # The API's own logs never saw the key.
    assert stack.read_key not in (stack.settings.home / "api.log").read_text(errors="replace")


def test_a_user_crosses_a_soft_limit_live_without_a_reload(browser, stack):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack, stack.read_key)
    wait_for(browser, lambda d: text_of(d, "#live-status") == "live", what="the gate stream opened")
    browser.execute_script("window.__sameDocument = 'yes'")
    # ana has 6,000 of 10,000 tokens; 2,500 more pass the soft threshold (8,000).
    with stack.api(stack.admin_key) as api:
        at = datetime.now(UTC) - timedelta(minutes=1)
        sent = api.post("/usage", json={"events": [_usage("ana", 99, at, 1500, 1000)]})
        assert sent.status_code == 202, sent.text

    def soft_row(driver):  # type: ignore[no-untyped-def]
        rows = driver.find_elements(By.CSS_SELECTOR, "#gate-rows tr.soft_warning")
        return [r for r in rows if "ana" in r.text and "model_tokens:gpt-4o-mini" in r.text]

    (row,) = wait_for(browser, soft_row, what="ana's soft warning arrived live")
    assert "8,500" in row.text and "10,000" in row.text
    wait_for(browser, lambda d: "ana" in text_of(d, "#pressing"), what="the pressing list refreshed")
    assert browser.execute_script("return window.__sameDocument") == "yes", "the page reloaded"
    assert csp_violations(browser) == []
    screenshot(browser, "overview")


def test_a_users_spend_on_the_page_equals_get_spend_to_the_last_unit(browser, stack):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack, stack.read_key)
    browser.get(f"{stack.base}/console/users?q=c")
    names = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#users tbody a")]
    assert names == ["cy"], names
    browser.get(f"{stack.base}/console/users")
    screenshot(browser, "users")
    browser.find_element(By.LINK_TEXT, "cy").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "figure.chart.drawn canvas"), what="chart drawn")
    with stack.api(stack.read_key) as api:
        live = api.get("/spend/cy")
        assert live.status_code == 200, live.text
        assert "E-" not in live.text, live.text  # an empty reservation once read 0E-12
        expected = live.json(parse_float=Decimal)
    assert Decimal(text_of(browser, "#period-spend")) == expected["period_spend"] > 0
    for use in expected["limits"]:
        row = browser.find_element(By.CSS_SELECTOR, f'#limits tr[data-limit="{use["dimension"]}:{use["model"] or ""}:'
                                                    f'{use["scope"]}"]')
        shown = row.find_element(By.CSS_SELECTOR, ".used").text.replace(",", "")
        assert Decimal(shown) == Decimal(use["used"]), use
        assert row.find_element(By.CSS_SELECTOR, ".status").text == use["status"]
    # The day chart's table adds up to the same spend (the history has caught up: nothing new since).
    day_spend = [Decimal(r.find_elements(By.TAG_NAME, "td")[-1].text)
                 for r in browser.find_elements(By.CSS_SELECTOR, "#days tbody tr")]
    assert sum(day_spend) == expected["period_spend"]
    assert csp_violations(browser) == []
    screenshot(browser, "user")


def test_another_tenants_user_is_a_404_and_a_read_key_cannot_write(browser, stack):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack, stack.read_key)
    browser.get(f"{stack.base}/console/users/{stack.rival_user_id}")
    assert "404" in text_of(browser, "h1")
    with session_client(browser, stack) as client:
        assert client.get(f"/console/users/{stack.rival_user_id}").status_code == 404
        assert client.get(f"/console/users/{stack.user_ids['ana']}").status_code == 200
        assert client.get("/console/webhooks").status_code == 403
    browser.get(f"{stack.base}/console/plans/{stack.plan_ids['free']}")
    field = browser.find_element(By.ID, "max_spend_per_period")
    field.clear()
    field.send_keys("7.00")
    click_and_load(browser, By.CSS_SELECTOR, "form.plan-form button")
    assert "403" in text_of(browser, "h1") and "admin scope" in browser.page_source
    with stack.api(stack.read_key) as api:
        assert api.get(f"/config/plans/{stack.plan_ids['free']}").json()["version"] == 1


def test_an_admin_edits_a_plan_and_sees_version_2(browser, stack):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack, stack.admin_key)
    browser.get(f"{stack.base}/console/plans")
    screenshot(browser, "plans")
    click_and_load(browser, By.LINK_TEXT, "pro")
    field = browser.find_element(By.ID, "max_spend_per_period")
    field.clear()
    field.send_keys("59.00")
    click_and_load(browser, By.CSS_SELECTOR, "form.plan-form button")
    wait_for(browser, lambda d: "saved=2" in d.current_url, what="saved")
    assert text_of(browser, "#plan-version") == "version 2"
    assert "now at version 2" in text_of(browser, ".saved")
    with stack.api(stack.read_key) as api:
        plan = api.get(f"/config/plans/{stack.plan_ids['pro']}").json()
    assert plan["version"] == 2 and Decimal(str(plan["max_spend_per_period"])) == Decimal("59.00")
    screenshot(browser, "plan")
    # A bad figure is a 422 on the form, no new version.
    field = browser.find_element(By.ID, "soft_gate_at")
    field.clear()
    field.send_keys("lots")
    click_and_load(browser, By.CSS_SELECTOR, "form.plan-form button")
    assert "is not a number" in text_of(browser, ".problem")
    browser.get(f"{stack.base}/console/webhooks")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".deliveries .badge.delivered") or d.refresh(),
             what="a delivered webhook in the log")
    screenshot(browser, "webhooks")


def test_reports_have_charts_and_a_csv_download(browser, stack, downloads):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack, stack.read_key)
    for name in ("daily", "top", "limits", "margins"):
        browser.get(f"{stack.base}/console/reports?name={name}")
        wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "figure.chart.drawn canvas"), what=f"{name} chart")
        screenshot(browser, f"reports-{name}")
    assert csp_violations(browser) == []
    browser.get(f"{stack.base}/console/reports?name=daily")
    for old in downloads.glob("*"):
        old.unlink()
    browser.find_element(By.ID, "csv").click()
    wait_for(browser, lambda _d: (downloads / "daily.csv").exists(), what="daily.csv downloaded")
    rows = list(csv.DictReader((downloads / "daily.csv").read_text().splitlines()))
    with stack.api(stack.read_key) as api:
        expected = api.get("/reports/daily").json(parse_float=Decimal)["rows"]
    assert [(r["day"], r["model"], Decimal(r["spend"])) for r in rows] == \
        [(r["day"], r["model"], Decimal(str(r["spend"]))) for r in expected]


def test_what_if_reprices_beside_the_actual_figures(browser, stack):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack, stack.read_key)
    browser.get(f"{stack.base}/console/what-if")
    start = browser.find_element(By.ID, "start")
    browser.execute_script("arguments[0].value = arguments[1]", start, (stack.start - timedelta(days=1)).date().isoformat())
    browser.find_element(By.CSS_SELECTOR, "form.what-if button").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#what-if tr.proposed"), what="what-if result")
    sides = [tuple(td.text for td in r.find_elements(By.TAG_NAME, "td")[:2])
             for r in browser.find_elements(By.CSS_SELECTOR, "#what-if tbody tr")]
    assert ("free", "actual") in sides and ("free", "proposed") in sides
    # The current plans proposed: the proposal reproduces what was recorded.
    spend = {tuple(td.text for td in r.find_elements(By.TAG_NAME, "td")[:2]): r.find_elements(By.TAG_NAME, "td")[9].text
             for r in browser.find_elements(By.CSS_SELECTOR, "#what-if tbody tr")}
    assert spend[("free", "actual")] == spend[("free", "proposed")]
    screenshot(browser, "what-if")


def _csrf_in(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no CSRF field in the page"
    return found.group(1)


def test_every_form_refuses_a_forged_csrf_token_and_the_pages_read_without_javascript(stack):
    """Plain HTTP, no browser: what a page shows with scripts off, and every POST form checked for its token."""
    with httpx.Client(base_url=stack.base, timeout=30, follow_redirects=False) as client:
        # Sign-in: the form's token must come back with the sign-in cookie's.
        token = _csrf_in(client.get("/console/sign-in").text)
        forged = client.post("/console/sign-in", data={"csrf": "forged", "key": stack.admin_key})
        assert forged.status_code == 403 and "ledger_console" not in forged.cookies, forged.text
        signed = client.post("/console/sign-in", data={"csrf": token, "key": stack.admin_key})
        assert signed.status_code == 303, signed.text
        # Without JavaScript, a user's page is the figures themselves: the same period spend as GET /spend.
        page = client.get(f"/console/users/{stack.user_ids['cy']}")
        assert page.status_code == 200
        with stack.api(stack.read_key) as api:
            expected = api.get("/spend/cy").json(parse_float=Decimal)["period_spend"]
        shown = re.search(r'id="period-spend">([^<]+)<', page.text)
        assert shown and Decimal(shown.group(1)) == expected > 0
        overview = client.get("/console/overview").text
        assert re.search(r'<a href="/console/users/[^"]+">bo</a>', overview), "bo (blocked) is not listed"
        assert "not live (needs JavaScript)" in overview
        # Every form of a session: a forged token is a 403 and changes nothing.
        plan_id = stack.plan_ids["free"]
        with stack.api(stack.read_key) as api:
            version = api.get(f"/config/plans/{plan_id}").json()["version"]
        plan_page = client.get(f"/console/plans/{plan_id}").text
        real = _csrf_in(plan_page)
        for path, fields in ((f"/console/plans/{plan_id}", {"max_spend_per_period": "7.00"}),
                             ("/console/what-if", {"start": "2026-01-01", "end": "2026-01-02", "plans": "{}"}),
                             ("/console/sign-out", {"then": "stay"})):  # a field, so that httpx sends a form
            for token_sent in ("forged", None):
                body = {**fields, **({"csrf": token_sent} if token_sent else {})}
                refused = client.post(path, data=body)
                assert refused.status_code == 403 and "CSRF" in refused.text, (path, token_sent, refused.text)
        with stack.api(stack.read_key) as api:
            assert api.get(f"/config/plans/{plan_id}").json()["version"] == version
        # The session is still open (the forged sign-out did nothing), and its own token still works.
        assert client.get("/console/overview").status_code == 200
        assert client.post("/console/sign-out", data={"csrf": real}).status_code == 303

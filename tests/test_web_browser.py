"""The dashboard in a real headless browser (Debian's chromium + chromium-driver, through Selenium):
refused without the token, logs in with it, sees a queue's numbers change live, pauses the queue,
requeues a dead letter and resumes. Skipped without chromium outside CI; fails in CI.

With ``FUNBOOST_LIKE_WEB_SCREENSHOTS=DIR`` it saves a screenshot of each page into DIR (docs/img).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from funboost_like import BrokerEnum
from funboost_like.ops.service import OpsService
from funboost_like.web.server import DashboardServer
from tests.conftest import CI
from tests.test_ops_registry import wait_for
from tests.test_web import consumer, fast_beats, start  # noqa: F401 - fast_beats: an autouse fixture

pytestmark = pytest.mark.ops_registry
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        selenium_missing = True
    else:
        selenium_missing = False
    if selenium_missing or not CHROMIUM or not DRIVER:
        message = "the browser test needs selenium, chromium and chromium-driver"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1000",
                     "--disable-gpu", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def dashboard() -> Iterator[DashboardServer]:
    server = start()
    yield server
    server.shutdown()
    server.server_close()


def shoot(driver: Any, name: str) -> None:
    folder = os.environ.get("FUNBOOST_LIKE_WEB_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def test_log_in_watch_pause_requeue_a_dead_letter_and_resume(browser: Any, dashboard: DashboardServer,
                                                              queue_name: str) -> None:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    def text(selector: str) -> str:
        """The text of the element, or "" while the page that has it is not there (yet)."""
        try:
            return str(browser.find_element(By.CSS_SELECTOR, selector).text)
        except WebDriverException:
            return ""

    def field(name: str) -> str:
        return text(f'td[data-field="{name}"]')

    def click(element_id: str) -> None:
        browser.find_element(By.ID, element_id).click()

    broken = threading.Event()
    broken.set()
    f = consumer(queue_name, broken, status=True)
    f.push(x=1, note="first")
    f.consume()
    service = OpsService(kinds=[BrokerEnum.PERSISTQUEUE])
    wait_for(lambda: service.dead(queue_name), timeout=10, what="a dead letter")
    server = dashboard
    base = server.url.rstrip("/")
    page = f"{base}/queues/{quote(queue_name, safe='')}"

    browser.get(f"{base}/api/queues")
    assert "log in first" in browser.page_source
    browser.get(page)
    assert browser.current_url == f"{base}/login"
    shoot(browser, "login")
    browser.find_element(By.ID, "secret").send_keys("not-the-token")
    click("login")
    wait_for(lambda: "wrong token or password" in browser.page_source, what="the login to be refused")
    assert queue_name not in browser.page_source and browser.current_url == f"{base}/login"

    browser.find_element(By.ID, "secret").send_keys(str(server.dashboard.credentials.token))
    click("login")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, f'tr[data-queue="{queue_name}"]'), what="the overview")
    broken.clear()
    for i in range(20):
        f.push(x=i, note="ok")
    wait_for(lambda: service.tasks(queue_name, state="finished"), what="finished calls")
    if os.environ.get("FUNBOOST_LIKE_WEB_SCREENSHOTS"):  # a chart with some history for the docs
        for i in range(60):
            f.push(x=i, note="more")
            time.sleep(0.15)
    shoot(browser, "overview")

    browser.get(page)
    assert field("paused") == "no" and field("dead_letters") == "1"
    click("pause")
    wait_for(lambda: "pause:" in text("#flash"), what="the pause to be confirmed")
    assert "confirmed 1" in text("#flash") and field("paused") == "yes"
    for i in range(5):
        f.push(x=i, note="while paused")
    wait_for(lambda: field("depth") == "5", timeout=10, what="the live depth to show 5")  # no reload: polling
    purge = browser.find_element(By.ID, "purge")
    browser.find_element(By.ID, "purge-confirm").send_keys("not the name")
    assert not purge.is_enabled()
    browser.execute_script("window.scrollTo(0, 0)")
    shoot(browser, "queue")

    browser.get(f"{page}/dead")
    assert "broken first" in browser.page_source
    shoot(browser, "dead_letters")
    [requeue_one] = browser.find_elements(By.CSS_SELECTOR, "#dead button.requeue-dead-one")  # this letter only
    requeue_one.click()
    wait_for(lambda: "requeue-dead:" in text("#flash"), what="the requeue")
    assert "requeued 1" in text("#flash")
    wait_for(lambda: field("depth") == "6" and field("dead_letters") == "0", timeout=10, what="depth 6, no letter")
    click("resume")
    wait_for(lambda: field("paused") == "no", what="the resume")
    wait_for(lambda: field("depth") == "0", timeout=10, what="the live depth to drop to 0")
    assert service.dead(queue_name) == []

    browser.get(f"{base}/workers")
    assert queue_name in browser.page_source and "live" in browser.page_source
    shoot(browser, "workers")
    browser.get(f"{base}/tasks?" + urlencode({"queue": queue_name}))
    shoot(browser, "tasks")
    broken.set()
    f.push(x=13, note="boom")
    [row] = wait_for(lambda: service.search_tasks(queue_name, search="boom", state="failed")["rows"],
                     what="the failed call's record")
    browser.get(f"{base}/tasks/{row['task_id']}?" + urlencode({"queue": queue_name}))
    assert "Timeline" in browser.page_source and "ValueError: broken boom" in browser.page_source
    shoot(browser, "task")
    browser.get(f"{base}/timing")
    shoot(browser, "timing")

    browser.delete_all_cookies()
    browser.get(page)
    assert browser.current_url == f"{base}/login"

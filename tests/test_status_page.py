"""The status page at GET /, in real headless Chromium (Debian's chromium and chromium-driver) driven by selenium."""

import http.client
import os
import urllib.parse

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service as ChromeDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from arservice.client import ServiceError

from helpers import Service

pytestmark = pytest.mark.timeout(120)

TOKEN = "page-test-token"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOWN_WITHIN_S = 2.0


@pytest.fixture(scope="module")
def service():
    svc = Service("--runner", "local", token=TOKEN).wait_ready()
    yield svc
    assert svc.stop() == 0


@pytest.fixture
def browser(tmp_path):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    # A driver path given: selenium uses it and never runs its driver manager (which would download).
    driver = webdriver.Chrome(options=options, service=ChromeDriver(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")))
    yield driver
    try:
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
        assert errors == [], "the page's script failed"
    finally:
        driver.quit()


def shown(driver, element_id):
    return driver.find_element(By.ID, element_id).is_displayed()


def row(driver, table, key, value):
    """The texts of the cells of the row named data-KEY=VALUE, or None; read in one script call,
    since the page replaces its tables every second."""
    return driver.execute_script("const tr = document.querySelector(arguments[0]);"
                                 "return tr && Array.from(tr.cells, td => td.innerText);",
                                 f"#{table} tbody tr[data-{key}='{value}']")


def wait(driver, condition, timeout, what):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())
    except TimeoutException:
        raise AssertionError(f"the page did not show {what} within {timeout}s") from None


def sign_in(driver, service, token):
    driver.get(service.url + "/")
    wait(driver, lambda: shown(driver, "token-form"), 10, "the token form")
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token + "\n")


def test_the_page_shows_an_instance_live_and_then_its_close(service, browser, tmp_path, capsys):
    sign_in(browser, service, "not-the-token")
    wait(browser, lambda: "refused" in browser.find_element(By.ID, "token-error").text, 10, "that the token was refused")
    assert not shown(browser, "status")
    sign_in(browser, service, TOKEN)
    wait(browser, lambda: shown(browser, "status") and not shown(browser, "token-form"), 10, "the status")
    agent = service.client.available_resources()["agents"][0]["agent_id"]
    wait(browser, lambda: row(browser, "agents", "agent-id", agent), SHOWN_WITHIN_S, "the agent")

    inst = service.http.start_instance({"type": "local"})
    instance_id = inst["instance_id"]
    try:
        cells = wait(browser, lambda: row(browser, "instances", "instance-id", instance_id), SHOWN_WITHIN_S,
                     "the started instance")
        assert cells[:4] == [instance_id, "local", "running", inst["agent_id"]]
        assert cells[5] == "never" and cells[6] == "0"
        service.http.execute(instance_id, "true")
        wait(browser, lambda: (row(browser, "instances", "instance-id", instance_id) or [])[6:] == ["1"],
             SHOWN_WITHIN_S, "the command count")
        # The token stays for this tab: a reload goes straight to the status.
        assert browser.execute_script("return sessionStorage.getItem('arservice.token')") == TOKEN
        browser.refresh()
        wait(browser, lambda: row(browser, "instances", "instance-id", instance_id), SHOWN_WITHIN_S, "the instance after a reload")
        assert not shown(browser, "token-form")
        screenshot = tmp_path / "status-page.png"
        assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
        with capsys.disabled():
            print(f"\nstatus page screenshot: {screenshot}")
    finally:
        service.http.close_instance(instance_id)
    wait(browser, lambda: row(browser, "instances", "instance-id", instance_id) is None, SHOWN_WITHIN_S, "the instance gone")


def test_strings_from_requests_are_shown_as_text(service, browser):
    """An instance id or error message may carry markup: the page shows it, never runs it."""
    hostile = "i-<img src=x onerror=\"document.title='owned'\">"
    with pytest.raises(ServiceError):
        service.http.execute(hostile, "true")
    sign_in(browser, service, TOKEN)
    wait(browser, lambda: "<img src=x" in browser.find_element(By.ID, "errors").text, SHOWN_WITHIN_S, "the error")
    assert browser.find_elements(By.CSS_SELECTOR, "#errors img") == []
    assert browser.title == "arservice status"


def test_slurm_jobs_from_the_runner_report(service, browser):
    """The Slurm section shows what a runner reports with `runner_status`, sent here as the Slurm runner does."""
    agent = service.client.available_resources()["agents"][0]["agent_id"]
    report = {"runner": "slurm", "submit_on": "this host", "job_name": "arservice-pagetest", "max_jobs": 2,
              "min_jobs": 0, "jobs": {"running": 1, "pending": 1}, "submitted": 2, "lost": 0, "released": 0,
              "job_list": [{"job_id": "901", "state": "running", "cancelled": False, "agent_ids": [agent], "instances": 0},
                           {"job_id": "902", "state": "pending", "cancelled": False, "agent_ids": [], "instances": 0}]}
    service.client.request("runner_status", status=report)
    try:
        sign_in(browser, service, TOKEN)
        wait(browser, lambda: row(browser, "jobs", "job-id", "902"), SHOWN_WITHIN_S, "the Slurm jobs")
        assert row(browser, "jobs", "job-id", "901") == ["901", "running", agent, "0"]
        assert "arservice-pagetest" in browser.find_element(By.ID, "slurm-summary").text
    finally:
        service.client.request("runner_status", status={"runner": "local"})
    wait(browser, lambda: not shown(browser, "slurm"), SHOWN_WITHIN_S, "the Slurm section hidden without Slurm")


def test_the_page_is_package_data_with_a_strict_policy(service):
    url = urllib.parse.urlsplit(service.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        for path, kind in (("/", "text/html"), ("/static/status.js", "javascript"), ("/static/status.css", "text/css")):
            conn.request("GET", path)  # no token: the page holds no data
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200 and kind in response.getheader("Content-Type"), (path, response.status)
            if path == "/":
                assert b'src="/static/status.js"' in body and b"http" not in body  # nothing from elsewhere
                assert "default-src 'none'" in response.getheader("Content-Security-Policy")
        conn.request("GET", "/status")
        response = conn.getresponse()
        response.read()
        assert response.status == 401
    finally:
        conn.close()

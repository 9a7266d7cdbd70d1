"""The dashboard: its endpoints over HTTP, and the page in a real headless Chromium
(Selenium + chromedriver, Debian's `chromium` and `chromium-driver` packages) against a
real gunicorn and a real worker.

Without Chromium the browser test is skipped with the reason, except in CI (CI=true),
where it fails: CI installs Chromium (.ci/run). Screenshots go to tests/artifacts/.
"""
from __future__ import annotations

import os
import shutil
import signal

import psycopg
import pytest

from jobrunner import config, queue
from tests.e2e.test_openapi import OpenAPI, check_exchange
from tests.workers import start_worker, wait_until  # noqa: F401 - start_worker is a fixture

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-dashboard-token"
ARTIFACTS = config.ROOT / "tests" / "artifacts"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run")


def seed_orders(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO orders (user_id, total) "
                 "SELECT 1 + mod(i, 6), mod(i * 7919, 5000) FROM generate_series(1, 3000) AS i")


def report_from_sql(conn: psycopg.Connection) -> dict[int, int]:
    return dict(conn.execute("SELECT user_id, sum(total)::bigint FROM orders GROUP BY user_id"))


# --- HTTP ----------------------------------------------------------------------------------

def test_dashboard_endpoints(new_database, gunicorn):
    url = new_database()
    off = gunicorn(url)
    with off.client() as http:
        page = http.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'src="/dashboard/static/dashboard.js"' in page.text
        assert http.get("/dashboard", headers={"If-None-Match": page.headers["etag"]}).status_code == 304
        js = http.get("/dashboard/static/dashboard.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert http.get("/dashboard/static/dashboard.css").headers["content-type"].startswith("text/css")
        missing = http.get("/dashboard/static/..%2Fdashboard.py")
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        # Without ADMIN_TOKEN the admin API, and so the page's data, is off.
        assert http.get("/api/admin/throughput").status_code == 404
        assert http.get("/api/admin/reports/latest").status_code == 404
    off.stop()

    server = gunicorn(url, env={"ADMIN_TOKEN": TOKEN})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with server.client() as http, psycopg.connect(url, autocommit=True) as conn:
        api = OpenAPI(http.get("/openapi.json").json())

        def get(path: str, **kwargs):
            resp = http.get(path, **kwargs)
            check_exchange(api, "GET", path, resp)   # the document tells the truth
            return resp

        assert get("/api/admin/throughput").status_code == 401
        assert get("/api/admin/reports/latest",
                   headers={"Authorization": "Bearer nope"}).status_code == 401
        for bad in ("window=0", "window=abc", "bucket=0", "window=21600&bucket=1", "nope=1"):
            resp = get(f"/api/admin/throughput?{bad}", headers=auth)
            assert resp.status_code == 400, bad
            assert resp.json()["code"] == "invalid_input"
        assert get("/api/admin/reports/latest", headers=auth).json() == {"data": None}

        # Finished jobs land in their buckets; the totals are the database's.
        ids = queue.enqueue_many("jobrunner.noop", [{}] * 7, conn=conn)
        conn.execute("UPDATE jobs SET state = 'succeeded', finished_at = now() - interval '65 seconds' "
                     "WHERE id = ANY(%s)", (ids[:4],))
        conn.execute("UPDATE jobs SET state = 'dead', finished_at = now() WHERE id = ANY(%s)", (ids[4:6],))
        conn.execute("UPDATE jobs SET state = 'cancelled', finished_at = now() - interval '2 hours' "
                     "WHERE id = %s", (ids[6],))   # outside the window
        data = get("/api/admin/throughput?window=600&bucket=30", headers=auth).json()["data"]
        assert data["window_seconds"] == 600 and data["bucket_seconds"] == 30
        assert 20 <= len(data["buckets"]) <= 22
        assert sum(b["succeeded"] for b in data["buckets"]) == 4
        assert sum(b["dead"] for b in data["buckets"]) == 2
        assert sum(b["cancelled"] for b in data["buckets"]) == 0
        assert [b["at"] for b in data["buckets"]] == sorted(b["at"] for b in data["buckets"])
        assert sum(1 for b in data["buckets"] if b["succeeded"]) == 1   # one bucket holds all 4

        # The newest succeeded report, its result as stored.
        seed_orders(conn)
        older = queue.enqueue("report.payments", conn=conn)
        newer = queue.enqueue("jobrunner.noop", conn=conn)
        conn.execute("UPDATE jobs SET kind = 'report.payments', state = 'succeeded', finished_at = now() "
                     "WHERE id = %s", (newer.id,))
        conn.execute("UPDATE jobs SET state = 'succeeded', finished_at = now() - interval '1 minute' "
                     "WHERE id = %s", (older.id,))
        conn.execute("INSERT INTO results (job_id, result, attempts) VALUES "
                     "(%s, '{\"data\": [{\"user_id\": 1, \"total_payment\": 5}]}', 1), "
                     "(%s, '{\"data\": [{\"user_id\": 2, \"total_payment\": 7}]}', 2)",
                     (older.id, newer.id))
        latest = get("/api/admin/reports/latest", headers=auth).json()["data"]
        assert latest["job_id"] == newer.id and latest["attempts"] == 2
        assert latest["result"] == {"data": [{"user_id": 2, "total_payment": 7}]}


# --- the browser -----------------------------------------------------------------------------

def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def browser(tmp_path):
    chromium = _find("chromium", "chromium-browser")
    driver_path = _find("chromedriver")
    if not chromium or not driver_path:
        reason = "Chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + ": CI must install them")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _only_unauthorized(entries: list[dict]) -> bool:
    return all("/api/admin/" in e["message"] and "401" in e["message"] for e in entries)


def test_dashboard_in_chromium(new_database, gunicorn, start_worker, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = new_database()
    server = gunicorn(url, env={"ADMIN_TOKEN": TOKEN})
    worker = start_worker("--concurrency", "4", "--poll-interval", "0.2", url=url)
    worker.wait_listening()
    with psycopg.connect(url, autocommit=True) as conn:
        seed_orders(conn)
        queue.enqueue_many("jobrunner.noop", [{}] * 40, conn=conn)
        doomed = queue.enqueue("jobrunner.fail", {"message": "card processor said no"},
                               max_attempts=1, conn=conn)
        queue.enqueue("jobrunner.noop", queue="nightly", delay=3600, conn=conn)
        wait_until(lambda: conn.execute(
            "SELECT count(*) FILTER (WHERE state IN ('succeeded', 'dead')) = 41 FROM jobs"
        ).fetchone()[0], 60, what="the jobs to finish")

        def text(element_id: str) -> str:
            return browser.find_element(By.ID, element_id).text

        def shown(element_id: str) -> bool:
            return browser.find_element(By.ID, element_id).is_displayed()

        wait = WebDriverWait(browser, 30, poll_frequency=0.1)

        # No token: the data calls get 401; the page says so and shows no data.
        browser.get(server.url("/dashboard"))
        wait.until(lambda d: shown("login"))
        assert "401 Unauthorized" in text("notice") and "needs a token" in text("notice")
        assert not shown("content")
        assert browser.find_elements(By.CSS_SELECTOR, "#problems tbody tr") == []
        assert _only_unauthorized(_severe(browser))

        # A wrong token: 401 again, still nothing shown.
        browser.find_element(By.ID, "token").send_keys("not-the-token")
        browser.find_element(By.ID, "signin").click()
        wait.until(lambda d: "rejected" in text("notice"))
        assert "401 Unauthorized" in text("notice")
        assert not shown("content") and shown("login")
        hidden_figures = [browser.find_element(By.ID, f"kpi-{s}").get_attribute("textContent")
                          for s in ("queued", "running", "failed", "dead", "succeeded", "age")]
        assert hidden_figures == ["–"] * 6
        assert browser.find_elements(By.CSS_SELECTOR, "#problems tbody tr, #queues tbody tr") == []
        assert _only_unauthorized(_severe(browser))

        # The right token: the counts, the dead job, the throughput.
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "signin").click()
        wait.until(lambda d: shown("content") and text("kpi-succeeded") != "–")
        assert not shown("notice") and not shown("login")
        counts = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
        assert text("kpi-succeeded") == str(counts["succeeded"]) == "40"
        assert text("kpi-dead") == str(counts["dead"]) == "1"
        assert text("kpi-queued") == str(counts["queued"]) == "1"
        queue_row = browser.find_element(By.CSS_SELECTOR, '#queues tr[data-queue="default"]')
        assert queue_row.text.split() == ["default", "0", "0", "0", "1", "40"]
        dead_row = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'#problems tr[data-job-id="{doomed.id}"]'))
        assert dead_row.get_attribute("data-state") == "dead"
        assert "card processor said no" in dead_row.text and "1 / 1" in dead_row.text
        assert browser.find_elements(By.CSS_SELECTOR, "#throughput rect.bar-succeeded")

        # Run report: submitted, long-polled, drawn; the bars are the SQL totals.
        browser.find_element(By.ID, "run-report").click()
        wait.until(lambda d: d.find_element(By.ID, "report-status").get_attribute("data-state") == "succeeded")
        expected = report_from_sql(conn)
        bars = browser.find_elements(By.CSS_SELECTOR, "#report-chart g[data-user-id]")
        drawn = {int(b.get_attribute("data-user-id")): int(b.get_attribute("data-total")) for b in bars}
        assert drawn == expected
        chart = browser.find_element(By.ID, "report-chart")
        assert int(chart.get_attribute("data-total")) == sum(expected.values())
        assert f"total {sum(expected.values()):,}" in text("report-meta")
        assert "finished in" in text("report-status")

        assert _severe(browser) == [], "console errors after signing in"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

        # A phone's width (emulated; a headless window cannot be that narrow): the
        # page fits, wide tables scroll inside their cards.
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
        wait.until(lambda d: d.execute_script("return window.innerWidth") == 390)
        assert browser.execute_script("return document.documentElement.scrollWidth") == 390
        assert shown("kpi-dead") and shown("run-report")
        wait.until(lambda d: d.execute_script(   # the charts are redrawn for the width
            "const box = document.getElementById('throughput');"
            "return box.querySelector('svg').viewBox.baseVal.width === Math.max(280, box.clientWidth)"))
        browser.save_screenshot(str(ARTIFACTS / "dashboard-phone.png"))
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

        # Retry the dead job (no worker runs now, so it stays queued).
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        dead_row = browser.find_element(By.CSS_SELECTOR, f'#problems tr[data-job-id="{doomed.id}"]')
        dead_row.find_element(By.CSS_SELECTOR, 'button[data-action="retry"]').click()
        wait_until(lambda: conn.execute("SELECT state FROM jobs WHERE id = %s",
                                        (doomed.id,)).fetchone()[0] == "queued",
                   30, what="the retried job to be queued")
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, f'#problems tr[data-job-id="{doomed.id}"]'))
        wait.until(lambda d: text("kpi-dead") == "0")
        assert text("kpi-queued") == "2"
        assert _severe(browser) == [], "console errors"

    # A server without ADMIN_TOKEN: the admin API is off (404) and the page says so.
    off = gunicorn(url)
    browser.get(off.url("/dashboard"))
    wait.until(lambda d: shown("notice") and "Admin API disabled" in text("notice"))
    assert "ADMIN_TOKEN" in text("notice")
    assert not shown("content") and not shown("login")

"""The /serve page in a real headless Chromium: it loads, names the endpoint, and its
request rate moves when traffic arrives, without a reload.

Needs Debian's ``chromium`` (``.ci/run`` installs it) and Playwright from PyPI, which
drives that browser instead of downloading its own. Skips, saying which is missing,
only where they cannot be had.
"""
from __future__ import annotations

import os
import shutil
import threading
import uuid

import pytest
import requests

TIMEOUT = 30


def _browser() -> str | None:
    for candidate in (os.environ.get("DASKSERVE_CHROMIUM"), "chromium", "chromium-browser",
                      "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def hello(request):
    return "hello"


@pytest.mark.slow
def test_serve_page_shows_endpoints_and_live_rate(dask_client, serve_client, base_url,
                                                   tmp_path):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    executable = _browser()
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium could not run "
                    "here); the page test needs a real browser")
    endpoint = f"greeter_{uuid.uuid4().hex[:6]}"
    serve_client.create_backend(endpoint, hello)
    serve_client.create_endpoint(endpoint, backend=endpoint, route=f"/{endpoint}")
    page_url = dask_client.dashboard_link.rsplit("/", 1)[0] + "/serve"

    stop = threading.Event()
    sent = []

    def traffic() -> None:
        with requests.Session() as session:
            for _ in range(20_000):  # bounded; the test stops it once the page shows a rate
                if stop.is_set():
                    return
                session.get(f"{base_url}/{endpoint}", timeout=TIMEOUT)
                sent.append(1)

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(page_url)
            row = f'#endpoints tr[data-endpoint="{endpoint}"]'
            page.wait_for_selector(row, timeout=TIMEOUT * 1000)
            assert page.text_content(f"{row} td.name") == endpoint
            assert page.text_content(f"{row} td:nth-child(2)") == f"/{endpoint}"
            before = page.text_content(f"{row} td.rate")
            assert before in ("–", "0.00")  # no traffic yet

            sender = threading.Thread(target=traffic, daemon=True)
            sender.start()
            try:
                # The same page, never reloaded, shows a positive rate.
                page.wait_for_function(
                    """selector => {
                         const cell = document.querySelector(selector);
                         return cell && parseFloat(cell.textContent) > 0;
                       }""", arg=f"{row} td.rate", timeout=90_000)
            finally:
                stop.set()
                sender.join(TIMEOUT)
            assert sent
            assert float(page.text_content(f"{row} td.rate")) > 0
            assert page.locator("#charts canvas").count() >= 2  # rate and latency plots
            replicas = page.locator("#replicas tbody tr", has_text=endpoint)
            assert replicas.count() == 1
            page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()

"""`rqgen serve` in a real headless browser: the page loads, a click generates, the images
appear (decoded by the browser), and a screenshot is kept in test-output/serve.png."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_train_vae import ENV

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SHOTS = Path(__file__).resolve().parents[1] / "test-output"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and "
                       "chromium-driver (make test installs them when it runs as root)"),
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"rqgen serve exited:\n{proc.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # headless as root, and quiet: this machine's network is closed, so no background
    # connections (sync, component updates) that would only fail
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                 f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(DRIVER))


def test_the_web_demo_generates_in_a_real_browser(class_ar, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen([sys.executable, "-m", "rqgen", "serve", "--model", str(class_ar),
                             "--port", str(port), "--device", "cpu"],
                            env={**ENV, "SE_OFFLINE": "true"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    driver = None
    try:
        _wait_for(url, proc)
        os.environ["SE_OFFLINE"] = "true"  # selenium must not look for drivers online
        driver = _browser(tmp_path / "profile")
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        button = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#generate")))
        assert "rqgen" in driver.title
        button.click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#samples img"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#strip img"))
        wait.until(lambda d: "40 sample(s)" in d.find_element(By.CSS_SELECTOR, "#status").text)
        # every image decoded by the browser (a broken src has naturalWidth 0); the gallery
        # loads lazily, so the ones out of view are switched to eager loading first
        script = ("const imgs = Array.from(document.querySelectorAll('#samples img, #strip img'));"
                  "imgs.forEach(i => { i.loading = 'eager'; });"
                  "return imgs.map(i => i.complete ? i.naturalWidth : -1);")  # fmt: skip
        wait.until(lambda d: all(w != -1 for w in d.execute_script(script)))
        widths = driver.execute_script(script)
        assert len(widths) == 2 and all(w > 0 for w in widths), widths
        SHOTS.mkdir(exist_ok=True)
        shot = SHOTS / "serve.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(timeout=30)

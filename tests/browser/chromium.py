"""Headless Chromium for the visualiser tests: find (or, when allowed, install) Debian's chromium, drive it with
selenium + chromedriver, and serve a folder over HTTP on 127.0.0.1.

Installing is opt-in (`HRM_INSTALL_CHROMIUM=1`, root, apt-get present) because it changes the machine; otherwise
a missing binary skips the browser tests with a message naming it. No browser is ever downloaded by selenium:
the driver path is given explicitly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
]


def _binaries() -> tuple[str | None, str | None]:
    return shutil.which("chromium"), shutil.which("chromedriver")


def find_or_install_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or pytest.skip with what is missing and how to get it."""
    browser, driver = _binaries()
    if browser and driver:
        return browser, driver
    can_install = os.environ.get("HRM_INSTALL_CHROMIUM") == "1" and os.geteuid() == 0 and shutil.which("apt-get")
    if can_install:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
            check=False,
            env=env,
            capture_output=True,
            timeout=600,
        )
        browser, driver = _binaries()
        if browser and driver:
            return browser, driver
    missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p)
    pytest.skip(
        f"browser test needs {missing} on PATH (apt-get install -y chromium chromium-driver, "
        f"or set HRM_INSTALL_CHROMIUM=1 when running as root)"
    )


def start_driver(user_data_dir: Path):
    """A selenium Chrome session on the local chromium binary."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="browser test needs the selenium package (dev extra)")
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_or_install_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(directory: Path):
    """`python -m http.server` on 127.0.0.1 serving `directory`; yields its base URL and stops it afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"http.server on port {port} did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

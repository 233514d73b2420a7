"""`clv dashboard`: the Streamlit dashboard over the DuckDB snapshot (app.py), how to start it, and
how to photograph it in headless Chromium (README screenshots, browser tests).

Streamlit and Playwright are the optional `dashboard` extra: nothing here imports them until a
dashboard is started or photographed, so the worker image never needs them.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from state.auth import is_loopback

APP = Path(__file__).with_name("app.py")
CHROMIUM = "/usr/bin/chromium"  # Debian's package; the test set-up installs it
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
READY = '[data-testid="stMetricValue"]'  # the KPI cards: the page has read the snapshot
# Every element shown has drawn: Streamlit loads an element's code on first use and shows a
# skeleton in its place until then (a busy machine can photograph a page of skeletons), and a
# chart draws into a canvas or svg after that; charts on tabs not shown draw when shown.
DRAWN = (
    "() => !document.querySelector('[data-testid=\"stSkeleton\"]') && "
    "[...document.querySelectorAll('[data-testid=\"stVegaLiteChart\"]')]"
    ".filter(c => c.checkVisibility()).every(c => c.querySelector('canvas, svg'))"
)
PAGE_END = ".st-key-page-end"  # app.py's last element: the script run has reached the end
# How tall the page's content is: the bottom of Streamlit's block container in its scrolling pane.
MAIN_HEIGHT = (
    "(() => { const b = document.querySelector('[data-testid=\"stMainBlockContainer\"]');"
    " return b.getBoundingClientRect().bottom + b.parentElement.scrollTop; })()"
)


class DashboardError(RuntimeError):
    """The extra is missing, or the dashboard never answered: one line for the user."""


def require(module: str) -> None:
    """DashboardError naming the extra when `module` is missing, instead of an ImportError."""
    if importlib.util.find_spec(module) is None:
        raise DashboardError(f"{module} is not installed: pip install -e '.[dashboard]'")


def command(snapshot: Path, host: str, port: int, model: str | None) -> list[str]:
    """The Streamlit server for one snapshot: headless, no usage statistics, no file watcher."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless=true",
        f"--server.address={host}",
        f"--server.port={port}",
        "--browser.gatherUsageStats=false",
        "--server.fileWatcherType=none",
        "--client.toolbarMode=viewer",
        "--global.developmentMode=false",
        "--",
        "--snapshot",
        str(snapshot),
        *(["--model", model] if model else []),
    ]


def healthy(url: str) -> bool:
    """Streamlit's own health endpoint answers: the server is up (the page may still load)."""
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until the server answers; DashboardError as soon as it exits or the time is up."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if proc.poll() is not None:
            raise DashboardError(f"the dashboard exited with {proc.returncode} before answering")
        if time.monotonic() > deadline:
            raise DashboardError(f"the dashboard did not answer at {url} within {timeout:.0f}s")
        time.sleep(0.3)


@contextmanager
def browser(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A page in a fresh headless Chromium (Debian's, never a downloaded build), closed after."""
    require("playwright")
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise DashboardError(f"{CHROMIUM} is missing: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="clv-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": width, "height": height},
            accept_downloads=True,
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def open_ready(page: Any, url: str, timeout_s: float = 60) -> None:
    """Load the dashboard and wait until it shows the snapshot, has stopped running and has
    drawn every element."""
    page.goto(url)
    page.wait_for_selector(READY, timeout=timeout_s * 1000)
    settle(page, timeout_s)
    page.wait_for_selector(PAGE_END, timeout=timeout_s * 1000)
    page.wait_for_function(DRAWN, timeout=timeout_s * 1000)


def settle(page: Any, timeout_s: float = 60) -> None:
    """Wait for the script run a widget started to finish (Streamlit shows a running status)."""
    page.wait_for_timeout(300)
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=timeout_s * 1000)


def screenshot(snapshot: Path, out: Path, model: str | None, port: int) -> None:
    """Start the dashboard on loopback, photograph the whole page into `out` (PNG), stop it."""
    require("streamlit")
    require("playwright")
    if not snapshot.is_file():
        raise DashboardError(f"no snapshot at {snapshot} to photograph")
    from playwright.sync_api import Error as BrowserError

    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        command(snapshot, "127.0.0.1", port, model),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_healthy(url, proc)
        with browser() as page:
            open_ready(page, url)
            # The page scrolls inside Streamlit's main pane, not the window: a window as tall as
            # that pane shows all of it, once the pane has stopped growing.
            heights = [0]
            while len(heights) < 60 and heights[-3:] != [heights[-1]] * 3:
                page.wait_for_timeout(250)
                heights.append(int(page.evaluate(MAIN_HEIGHT)))
                if heights[-1] != heights[-2]:
                    page.set_viewport_size({"width": page.viewport_size["width"], "height": heights[-1] + 40})
            settle(page)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
    except BrowserError as exc:
        raise DashboardError(f"the page did not show {snapshot}: {str(exc).splitlines()[0]}") from None
    finally:
        proc.terminate()
        proc.wait(30)


def serve(snapshot: Path, host: str, port: int, model: str | None) -> int:
    """Run the dashboard until Ctrl-C or SIGTERM (both stop Streamlit and exit 0)."""
    require("streamlit")
    if not is_loopback(host):  # Streamlit has no login: say so rather than refuse
        print(
            f"warning: the dashboard on {host} answers anyone who can reach it (it has no login); "
            "keep it on loopback or behind a proxy that authenticates",
            file=sys.stderr,
            flush=True,
        )
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    proc = subprocess.Popen(command(snapshot, host, port, model))
    try:
        wait_healthy(f"http://{host}:{port}", proc)
        print(f"dashboard on http://{host}:{port} (snapshot {snapshot}); Ctrl-C stops it", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)

"""Retake the README's screenshots of every page (assets/app-*.png) from the real classroom demo.

Starts the app (`python app.py`) on a free loopback port with an empty temporary runs folder,
opens it in Debian's chromium (driven by Playwright) at 1400x1000 and presses *Start the demo*
as a teacher would. While the baseline trains it shoots Monitor, Start, Data and Train; once
both runs have trained and been measured (the Start page lists both as finished), Memorization
(the baseline's copies), its presentation view, Compare (both runs, picked by the page itself)
and Learn. Every wait is on what the page shows (text, elements, loaded images), never a fixed
sleep; each shot waits until no progress indicator is showing and every image has loaded.

    python docs/screenshots.py                    # into assets/, the README's
    python docs/screenshots.py --out shots --timeout-minutes 120

Needs Debian's chromium (`apt-get install -y chromium`) and playwright (requirements-dev.txt).
The demo trains two runs: about 5 minutes on 2 idle CPU cores, longer on a busy machine. On a
machine shared with other work, `OMP_NUM_THREADS=1 python docs/screenshots.py` (the app inherits
it) trains several times faster: torch's threads otherwise wait on each other.
"""
from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIEWPORT = {"width": 1400, "height": 1000}
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MONITOR_SHARE = 0.3  # Monitor is shot once the baseline is this far through its rounds
PAGE_TIMEOUT_MS = 120_000  # one page's own events, on a machine busy training

# True once nothing on the page is loading: every rendered image has arrived (lazy ones are
# made eager first) and Gradio shows no progress indicator.
SETTLED_JS = """() => {
  const shown = el => el.getClientRects().length > 0;
  const images = [...document.images].filter(shown);
  const loaded = images.every(img => img.complete && img.naturalWidth > 0);
  const busy = [...document.querySelectorAll('.wrap.translucent, .eta-bar, .progress-bar, .progress-text, .loading')]
    .some(shown);
  return loaded && !busy;
}"""
# The Monitor status line "round r of n ... min left" with r at least this share of n.
MONITOR_JS = """share => {
  const text = document.querySelector('#monitor-status')?.innerText || '';
  const round = text.match(/round (\\d+) of (\\d+)/);
  return round && +round[1] >= Math.max(1, Math.ceil(share * +round[2])) && /min left|under a minute left/.test(text);
}"""
# Every row of the Compare table shows a measured copy share ("48.4% (31/64)").
COMPARED_JS = """count => {
  const rows = [...document.querySelectorAll('#compare-table .virtual-row')];
  return rows.length === count && rows.every(row => /\\d%\\s*\\(\\d+\\/\\d+\\)/.test(row.innerText));
}"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(runs_dir: Path, port: int, log) -> subprocess.Popen:
    """The app as `python app.py` would run it, on this port and runs folder."""
    return subprocess.Popen([sys.executable, "app.py", "--runs-dir", str(runs_dir), "--host", "127.0.0.1",
                             "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_listening(url: str, server: subprocess.Popen, timeout: float) -> None:
    """Until the app answers (it offers no event to wait on); fails at once if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with code {server.returncode} before listening (see its log)")
        try:
            if urllib.request.urlopen(url, timeout=5).status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the app did not answer on {url} within {timeout:.0f} s")
        time.sleep(0.5)


def shoot(page, path: Path, locator=None) -> None:
    """Load every lazy image, wait until the page has settled, then shoot it whole (or one element)."""
    page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(img => img.loading = 'eager')")
    page.wait_for_function(SETTLED_JS, polling=250)
    (locator or page).screenshot(path=path, **({} if locator else {"full_page": True}))
    print(f"  {path}", flush=True)


def open_page(page, url: str, heading: str) -> None:
    page.goto(url)
    page.get_by_role("heading", name=heading, exact=True).wait_for()


def take(url: str, out: Path, timeout_ms: float) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=BROWSER_ARGS)
        page = browser.new_context(viewport=VIEWPORT).new_page()  # one session: the teacher's
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        started = time.monotonic()

        open_page(page, url, "Do diffusion models copy their training images?")
        page.locator("#start-demo").click()
        page.locator("#demo-message").get_by_text("Queued").wait_for()
        print("demo started; waiting for the baseline to train", flush=True)

        open_page(page, url + "monitor", "Monitor a run")
        page.wait_for_function(MONITOR_JS, arg=MONITOR_SHARE, polling=1000, timeout=timeout_ms)
        page.locator("#ratio-histogram .js-plotly-plot").wait_for()
        shoot(page, out / "app-monitor.png")

        open_page(page, url, "Do diffusion models copy their training images?")
        runs = page.locator("#runs-table .virtual-row")
        runs.filter(has_text=re.compile("running|queued")).nth(1).wait_for()  # side by side on a CPU, else queued
        shoot(page, out / "app-start.png")

        open_page(page, url + "data", "Choose the training data")
        page.get_by_text(re.compile(r"^\d+ images · \d+×\d+")).wait_for()
        page.locator("#data-preview img").wait_for()
        shoot(page, out / "app-data.png")

        open_page(page, url + "train", "Train")
        page.locator("#train-status").get_by_text(re.compile(r"round \d+ of \d+")).wait_for()
        shoot(page, out / "app-train.png")

        print("waiting for both runs to train and be measured", flush=True)
        open_page(page, url, "Do diffusion models copy their training images?")
        finished = page.locator("#runs-table .virtual-row").filter(has_text="✓ finished")
        finished.nth(1).wait_for(timeout=timeout_ms)  # "evaluating" until measured, then "finished"
        print(f"both runs trained and measured {(time.monotonic() - started) / 60:.1f} min after the click", flush=True)

        open_page(page, url + "memorization", "Is the model copying?")  # the session's run: the baseline
        page.locator("#presentation-view img").first.wait_for()
        page.locator("#pairs img").first.wait_for()
        page.locator(".js-plotly-plot").first.wait_for()
        shoot(page, out / "app-memorization.png")
        shoot(page, out / "app-presentation.png", page.locator("#presentation-view"))

        open_page(page, url + "compare", "Compare runs")  # the page picks the two newest finished runs
        page.wait_for_function(COMPARED_JS, arg=2)
        page.locator(".js-plotly-plot").nth(3).wait_for()
        shoot(page, out / "app-compare.png")

        open_page(page, url + "learn", "Learn: memorization and how IET-AGC tries to reduce it")
        page.locator(".js-plotly-plot").first.wait_for()
        shoot(page, out / "app-learn.png")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets", help="folder for the PNGs (default: assets/)")
    parser.add_argument("--timeout-minutes", type=float, default=90,
                        help="longest wait for the demo's training and measuring (default 90)")
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        sys.exit("needs Debian's chromium: apt-get install -y chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="iet-screenshots-") as tmp:
        port, log_path = free_port(), Path(tmp) / "app.log"
        url = f"http://127.0.0.1:{port}/"
        with open(log_path, "w") as log:
            server = start_app(Path(tmp) / "runs", port, log)
            try:
                wait_listening(url, server, timeout=300)
                take(url, args.out, timeout_ms=60_000 * args.timeout_minutes)
            except Exception:
                print(f"the app's log:\n{log_path.read_text()[-4000:]}", file=sys.stderr)
                raise
            finally:
                server.terminate()
                server.wait(timeout=120)


if __name__ == "__main__":
    main()

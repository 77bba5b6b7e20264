"""The app in a real browser (Debian chromium driven by Playwright): every page loads, a tiny
run started from the Train page shows its loss-ratio histogram on the Monitor page.

Screenshots go to $IET_SCREENSHOTS when set (else the test's temporary folder)."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium")
# Skipped only outside CI: in CI (CI=true) a missing chromium fails these tests instead.
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="needs Debian's chromium (apt-get install -y chromium; .ci/run installs it)")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = [("", "Do diffusion models copy their training images?"), ("data", "Choose the training data"),
         ("train", "Train"), ("monitor", "Monitor a run"), ("memorization", "Is the model copying?"),
         ("compare", "Compare runs"), ("learn", "Learn: memorization and how IET-AGC tries to reduce it")]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_server):
    """A fresh browser tab (a new session) that fails the test on uncaught page errors and on
    any request that leaves the local server."""
    url, _ = app_server
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    errors, outside = [], []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    tab.on("request", lambda request: outside.append(request.url)
           if not request.url.startswith((url.rstrip("/"), "data:", "blob:")) else None)
    tab.set_default_timeout(30_000)
    yield tab
    context.close()
    assert not errors, f"errors in the page: {errors}"
    assert not outside, f"the page reached outside the app: {outside}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("IET_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def start_on_train_page(page, url: str, data_text: str, rounds: int, batch_size: int) -> None:
    """Start a run of 10 local steps per round from the Train page's form, on the chosen data."""
    page.goto(url + "train")
    page.get_by_text(data_text).wait_for()  # loaded: the page's own events have run
    page.get_by_text("steps", exact=True).click()
    for label, value in (("Rounds", str(rounds)), ("Local epochs (or steps) per proxy", "10"),
                         ("Batch size", str(batch_size)), ("Samples shown per round", "0")):
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("button", name="▶ Start training").click()
    page.locator("#train-started").get_by_text("Started").wait_for()


def test_every_page_loads(app_server, page, shots):
    url, _ = app_server
    for path, heading in PAGES:
        page.goto(url + path)
        page.get_by_role("heading", name=heading, exact=True).wait_for()
        page.screenshot(path=shots / f"page-{path or 'start'}.png", full_page=True)
    page.goto(url + "learn")  # a drawn figure, not only text
    page.locator(".js-plotly-plot").first.wait_for()


def test_a_loaded_page_runs_its_own_events(app_server, page):
    """Page events need the cookie a page's HTML sets (pages/access.py); a browser gets it and
    keeps it from the page's scripts."""
    url, _ = app_server
    page.goto(url + "data")
    page.get_by_text(re.compile(r"^64 images · 8×8")).wait_for()  # written by the page's load event
    cookie = next(c for c in page.context.cookies() if c["name"] == "iet-page")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "iet-page" not in page.evaluate("document.cookie")


def test_upload_shows_count_preview_and_rejected_files(app_server, page, tmp_path):
    from PIL import Image

    url, ctx = app_server
    for i, colour in enumerate((0, 128, 255)):
        Image.new("RGB", (20, 24), (colour, 255 - colour, 40)).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    page.goto(url + "data")
    page.get_by_text(re.compile(r"^64 images · 8×8")).wait_for()
    page.get_by_text("Upload images or a .zip / .npz").click()
    page.locator("input[type=file]").set_input_files([tmp_path / f for f in ("img0.png", "img1.png", "img2.png", "broken.png")])
    page.get_by_label("Number of images (0 = all)").fill("0")
    page.get_by_role("button", name="Load and preview").click()
    page.get_by_text(re.compile(r"^3 images · 8×8 · greyscale · 1 rejected")).wait_for()
    page.get_by_text("not a readable image").filter(visible=True).first.wait_for()
    saved = list((ctx.runs_root / "datasets").glob("*.npz"))
    assert len(saved) == 1  # kept under the runs folder, so runs on it can resume after a restart


def test_a_captioned_zip_upload_shows_its_captions_and_the_rejected_entry(app_server, page, tmp_path):
    import json
    import zipfile

    from PIL import Image

    url, _ = app_server
    with zipfile.ZipFile(tmp_path / "captioned.zip", "w") as archive:
        for i, colour in enumerate((0, 128, 255)):
            Image.new("RGB", (20, 24), (colour, 255 - colour, 40)).save(tmp_path / f"{i}.png")
            archive.write(tmp_path / f"{i}.png", f"{i}.png")
        archive.writestr("broken.png", b"not an image")  # captioned, but not an image
        archive.writestr("metadata.jsonl", "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"a colour card {i}"})
                                                     for i in (0, 1, 2, "broken")))
    page.goto(url + "data")
    page.get_by_text(re.compile(r"^64 images · 8×8")).wait_for()
    page.get_by_text("Upload images or a .zip / .npz").click()
    page.locator("input[type=file]").set_input_files(tmp_path / "captioned.zip")
    page.get_by_role("button", name="Load and preview").click()
    page.get_by_text(re.compile(r"^3 images · 8×8 · colour · captioned · 1 rejected")).wait_for()
    page.get_by_text("not a readable image").filter(visible=True).first.wait_for()
    page.locator("#data-captions").get_by_text("a colour card 1").wait_for()
    assert page.get_by_label("Colour (RGB)").is_checked()  # the form shows what was loaded
    page.goto(url + "train")  # the choice is kept for the Train page, where the fine-tune takes it
    page.get_by_text(re.compile(r"colour · captioned")).wait_for()
    page.get_by_label("Model", exact=True).click()
    page.get_by_role("option", name="text-to-image fine-tune (Stable Diffusion)").click()
    page.get_by_text("LoRA rank (0 = full UNet fine-tune)").wait_for()


def test_train_page_shows_only_the_settings_of_the_chosen_mode(app_server, page):
    url, _ = app_server
    page.goto(url + "train")
    page.get_by_text("64 images · 8×8").wait_for()  # loaded: the page's own events have run
    msr = page.get_by_text("MSR: move when skip rate >")
    shards = page.get_by_text("Shards K (proxies)")
    lam = page.get_by_text("Skip threshold λ")
    page.get_by_text("IET-AGC+ (+ MSR and TAA)").click()
    msr.wait_for()
    assert shards.is_visible() and lam.is_visible()
    page.get_by_text("Baseline DDPM (one model, all data)").click()
    msr.wait_for(state="hidden")
    lam.wait_for(state="hidden")
    shards.wait_for(state="hidden")


def test_a_run_started_on_the_train_page_shows_its_histogram_on_the_monitor_page(app_server, page, shots):
    url, ctx = app_server
    page.goto(url + "data")
    page.get_by_text(re.compile(r"^64 images · 8×8")).wait_for()  # the page has shown the default data
    page.get_by_label("Number of images (0 = all)").fill("16")
    page.get_by_role("button", name="Load and preview").click()
    page.get_by_text(re.compile(r"^16 images · 8×8")).wait_for()

    start_on_train_page(page, url, "16 images · 8×8", rounds=1, batch_size=16)  # the data chosen on the Data page
    page.screenshot(path=shots / "train-started.png", full_page=True)
    runs = ctx.jobs.list_runs()
    config = ctx.jobs.run(runs[0]["run_id"]).config
    assert (runs[0]["mode"], config.data.subset, config.train.local_steps, config.train.rounds) == ("iet-agc", 16, 10, 1)

    page.goto(url + "monitor")
    histogram = page.locator("#ratio-histogram")
    histogram.get_by_text(re.compile("Loss ratio")).wait_for(timeout=120_000)
    page.locator("#monitor-status").get_by_text("✓ finished").wait_for(timeout=120_000)
    assert ctx.jobs.status(runs[0]["run_id"])["state"] == "finished"
    page.locator("#most-skipped img").first.wait_for()  # the gallery of training images under AGC's eye
    what_if = page.get_by_role("spinbutton", name="number input for What-if λ")
    what_if.fill("0.9")  # the what-if redraws the histogram with a second line
    what_if.press("Enter")
    histogram.get_by_text("what-if 0.90").wait_for()
    page.screenshot(path=shots / "monitor-tiny-run.png", full_page=True)


def timer_events(url: str, output_elem_id: str) -> set[int]:
    """The ids of the timer events that redraw the component `output_elem_id` (from the app's config)."""
    import json
    import urllib.request

    config = json.load(urllib.request.urlopen(url + "config"))
    ids = {c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == output_elem_id}
    ticks = {d["id"] for d in config["dependencies"]
             if any(t[1] == "tick" for t in d["targets"]) and ids & set(d["outputs"])}
    assert ticks, "no timer redraws " + output_elem_id
    return ticks


def wait_for_ticks(page, ticks: set[int], count: int) -> None:
    """Wait until the page has sent `count` requests of these timer events (a tick is sent
    only after the previous one finished)."""
    for _ in range(count):
        page.wait_for_event("request", lambda r: "/queue/join" in r.url
                            and (r.post_data_json or {}).get("fn_index") in ticks)


def test_the_presentation_view_shows_whole_copies_side_by_side(app_server, page, shots):
    from helpers import tiny_config
    from iet_core.config import EvalConfig
    from pages.memorization import PRESENTED

    url, ctx = app_server
    config = tiny_config("ddpm", rounds=1)
    config.eval = EvalConfig(num_samples=8, steps=5, after_training=True)  # measured as soon as it finishes
    run_id = ctx.jobs.submit(config, "owner-presentation-test")
    page.goto(url + "memorization")
    page.get_by_role("combobox", name="Run").first.click()
    page.get_by_role("option", name=re.compile(run_id[-6:])).click()
    images = page.locator("#presentation img")
    images.nth(PRESENTED - 1).wait_for(timeout=120_000)  # the page shows the new evaluation without a click
    assert images.count() == PRESENTED
    for i in range(PRESENTED):
        box = images.nth(i).evaluate("img => { const r = img.getBoundingClientRect(); return "
                                     "{w: r.width, h: r.height, nw: img.naturalWidth, nh: img.naturalHeight, "
                                     "fit: getComputedStyle(img).objectFit}; }")
        assert box["w"] >= 2 * box["h"] and box["w"] >= 300, box  # side by side, big enough for a room
        assert abs(box["w"] / box["h"] - box["nw"] / box["nh"]) < 0.02 * box["nw"] / box["nh"], box  # not cropped
        assert box["fit"] in ("fill", "contain"), box
    page.get_by_text("nearest training image").first.wait_for()
    page.locator("#presentation").screenshot(path=shots / "memorization-presentation.png")


def test_a_finished_baseline_offers_neither_pause_nor_apply(app_server, page):
    from helpers import tiny_config

    url, ctx = app_server
    run_id = ctx.jobs.submit(tiny_config("ddpm", rounds=1), "owner-baseline-test")
    assert ctx.jobs.wait(run_id, 120) == "finished"
    page.goto(url + "monitor")
    page.get_by_role("combobox", name="Run").first.click()
    page.get_by_role("option", name=re.compile(run_id[-6:])).click()
    page.locator("#monitor-status").get_by_text("✓ finished").wait_for()
    # Delete applies to a finished run: once the page has enabled it, it has set every control.
    page.wait_for_function("() => !document.querySelector('#delete-run').disabled")
    assert page.locator("#pause-run").is_disabled() and page.locator("#apply-lambda").is_disabled()


def test_while_a_run_trains_time_left_rounds_and_lambda_agree_everywhere(app_server, page, shots):
    url, ctx = app_server
    start_on_train_page(page, url, "64 images · 8×8", rounds=40, batch_size=8)

    page.goto(url + "monitor")
    status = page.locator("#monitor-status")
    status.get_by_text(re.compile(r"about \d+ min left|under a minute left")).wait_for(timeout=120_000)
    status.get_by_text(re.compile(r"round ([3-9]|\d\d) of 40")).wait_for(timeout=120_000)
    page.screenshot(path=shots / "monitor-training.png", full_page=True)
    page.locator("#pause-run").click()
    status.get_by_text("paused").wait_for()
    ticks = timer_events(url, "ratio-histogram")
    wait_for_ticks(page, ticks, 2)  # the page has drawn the paused run
    shown = int(re.search(r"round (\d+) of 40", status.inner_text()).group(1))
    picker = page.get_by_role("combobox", name="Run").first.input_value()
    assert f"round {shown}/40" in picker
    page.locator("#shards-chart").get_by_text(f"Proxies in round {shown}").wait_for()

    what_if = page.get_by_role("spinbutton", name="number input for What-if λ")
    what_if.fill("0.7")
    what_if.press("Enter")
    wait_for_ticks(page, ticks, 2)
    assert what_if.input_value() == "0.7"
    page.locator("#what-if-text").get_by_text("λ = 0.70").wait_for()
    page.locator("#ratio-histogram").get_by_text("what-if 0.70").wait_for()
    page.locator("#stop-run").click()
    status.get_by_text("stopped").wait_for(timeout=60_000)


def test_the_demo_button_trains_both_runs_side_by_side_on_the_cpu_cores(browser, tmp_path):
    """The Start page's one click: a baseline and an IET-AGC run of the classroom recipe, trained
    at once by a server that runs two jobs, each on its share of the CPU threads."""
    import app
    from iet_core.jobs import CPU_THREADS

    demo, ctx = app.build_app(tmp_path / "runs", max_jobs=2)
    _, url, _ = app.launch(demo, ctx, prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    tab = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
    try:
        tab.goto(url)
        tab.get_by_text("side by side (30 rounds each").wait_for()
        tab.locator("#start-demo").click()
        tab.locator("#demo-message").get_by_text("Queued ddpm and iet-agc").wait_for()
        tab.locator("#runs-table .virtual-row").filter(has_text="running").nth(1).wait_for(timeout=60_000)
        runs = {row["mode"]: ctx.jobs.run(row["run_id"]).config for row in ctx.jobs.list_runs()}
        assert set(runs) == {"ddpm", "iet-agc"} and ctx.jobs.running_count() == 2
        assert ctx.jobs.cpu_threads_per_job() == max(1, CPU_THREADS // 2)
        for config in runs.values():  # the classroom recipe: the digits at their own 8x8, 30 rounds
            assert (config.data.resolution, config.train.rounds, config.train.time_budget_minutes) == (8, 30, 6)
    finally:
        ctx.jobs.shutdown(timeout=60)
        tab.context.close()
        demo.close()

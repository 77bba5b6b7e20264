"""What every page shares: the app context, the browser session, the run picker, images."""
from __future__ import annotations

import base64
import collections
import functools
import hashlib
import io
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from iet_core.config import ConfigError, DataConfig, RunConfig, recipe_config
from iet_core.evaluate import EvaluationGate
from iet_core.sample import Cancelled
from iet_core.data import ImageDataset
from iet_core.jobs import JobManager
from iet_core.owners import new_owner_token

# Samples x sampling steps one evaluation may ask of the server (64 samples of 1,000 DDPM
# steps); admins change it with --max-eval-work.
MAX_EVAL_WORK = 64_000
SESSION_KEY = "iet-agc-app-session"
SESSION_DEFAULT = {"owner": "", "run_id": "", "data": None}
DEMO_PRESET = "classroom"  # the Start page's demo; its data is every page's default data
# Plain symbols that every system font has (emoji need a colour-emoji font).
STATE_ICONS = {"queued": "…", "running": "▶", "paused": "❚❚", "stopping": "■", "stopped": "■",
               "finished": "✓", "evaluating": "…", "failed": "✗", "created": "○", "interrupted": "!",
               "damaged": "✗"}


@dataclass
class AppContext:
    jobs: JobManager
    runs_root: Path
    # Both kept in the runs folder, so sessions and open pages survive a restart. `secret`
    # encrypts the browser session and is sent to every page (Gradio encrypts in the browser);
    # `page_key` signs the page cookie (pages/access.py) and never leaves the server.
    secret: str
    page_key: str
    evaluations: EvaluationGate = field(default_factory=EvaluationGate)
    max_eval_work: int = MAX_EVAL_WORK
    proxy_hops: int = 0  # proxies in front of the server (see access.client_address)
    _datasets: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    _datasets_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, runs_root: str | Path, jobs: JobManager, **settings) -> "AppContext":
        root = Path(runs_root)
        root.mkdir(parents=True, exist_ok=True)
        return cls(jobs=jobs, runs_root=root, secret=_kept_secret(root / ".app-secret"),
                   page_key=_kept_secret(root / ".page-key"), **settings)

    def dataset(self, run_id: str) -> ImageDataset:
        """A run's training images (a few kept in memory: galleries need them on every update)."""
        with self._datasets_lock:
            if run_id in self._datasets:
                self._datasets.move_to_end(run_id)
                return self._datasets[run_id]
        dataset = self.jobs.run(run_id).dataset()
        with self._datasets_lock:
            self._datasets[run_id] = dataset
            while len(self._datasets) > 4:
                self._datasets.popitem(last=False)
        return dataset


def _kept_secret(path: Path) -> str:
    """A random secret kept in a file only the server's user can read (made on first use)."""
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


# -- the browser session --------------------------------------------------------------------

def session_state(ctx: AppContext) -> gr.BrowserState:
    """The session in the browser's localStorage: owner token, selected run, chosen data.
    Every page makes one with the same key, so they all see the same values."""
    return gr.BrowserState(dict(SESSION_DEFAULT), storage_key=SESSION_KEY, secret=ctx.secret)


def ensure_owner(session: dict | None) -> dict:
    """The session with an owner token (made on first use)."""
    session = {**SESSION_DEFAULT, **(session or {})}
    if not session["owner"]:
        session["owner"] = new_owner_token()
    return session


def session_data(session: dict | None) -> DataConfig | None:
    """The data chosen on the Data page, if any. The session comes from the browser, and any
    client can send any session, so it is read like every other input (None if invalid)."""
    chosen = (session or {}).get("data")
    try:
        return RunConfig.from_dict({"data": chosen}).data if chosen else None
    except ConfigError:
        return None


def chosen_data(session: dict | None) -> DataConfig:
    """The data chosen on the Data page, or the demo's digits."""
    return session_data(session) or recipe_config(DEMO_PRESET).data


def user_errors(fn):
    """Show ConfigError (bad input, with what to do) and cancelled work as a message in the
    page instead of a crash."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, Cancelled) as err:
            raise gr.Error(str(err), print_exception=False) from None
    return wrapper


# -- runs -------------------------------------------------------------------------------------

def run_label(row: dict) -> str:
    """"▶ demo-ddpm (ddpm) · running, round 3/30 · 11-22 14:59 a1b2c3": the run id's date and
    suffix tell apart runs of the same name."""
    state = row["state"] or "?"
    where = f"#{row['queue_position']} in queue" if row.get("queue_position") else progress_text(row)
    run_id = row["run_id"]
    try:  # ids made by the engine start with the creation time
        when = f"{time.strftime('%m-%d %H:%M', time.strptime(run_id[:15], '%Y%m%d-%H%M%S'))} {run_id[-6:]}"
    except ValueError:
        when = run_id
    return f"{STATE_ICONS.get(state, '')} {row['name']} ({row['mode']}) · {state}, {where} · {when}"


def round_shown(status: dict) -> int:
    """The round a run is in, counted from 1, as every page shows it (the engine counts from 0;
    a finished run has gone past its last round)."""
    return min(int(status.get("round") or 0) + 1, int(status.get("rounds") or 1))


def time_left(seconds: float | None) -> str:
    """'about 7 min left' from the engine's measured pace ('' before it is measured)."""
    if seconds is None:
        return ""
    return "under a minute left" if seconds < 60 else f"about {math.ceil(seconds / 60)} min left"


def progress_text(status: dict) -> str:
    """'round 3/20 · about 7 min left' for the run lists."""
    left = time_left(status.get("seconds_left"))
    return f"round {round_shown(status)}/{status.get('rounds')}" + (f" · {left}" if left else "")


def run_choices(ctx: AppContext) -> list[tuple[str, str]]:
    return [(run_label(row), row["run_id"]) for row in ctx.jobs.list_runs()]


def default_run(ctx: AppContext, session: dict | None, choices: list[tuple[str, str]]) -> str | None:
    """The session's run if it still exists, else a live one, else the newest."""
    ids = [run_id for _, run_id in choices]
    wanted = (session or {}).get("run_id")
    if wanted in ids:
        return wanted
    for run_id in ids:
        if ctx.jobs.status(run_id)["state"] in ("running", "paused", "queued"):
            return run_id
    return ids[0] if ids else None


def run_picker(label: str = "Run") -> tuple[gr.Dropdown, gr.Button]:
    with gr.Row(equal_height=False):
        picker = gr.Dropdown(choices=[], label=label, scale=8, elem_classes=["run-picker"])
        refresh = gr.Button("↻ Refresh", scale=0, min_width=110, size="sm")
    return picker, refresh


def wire_run_picker(ctx: AppContext, page: gr.Blocks, picker: gr.Dropdown, refresh: gr.Button,
                    session: gr.BrowserState) -> None:
    """Fill the picker when the page opens (with the session's run) and remember the choice."""
    def fill(session, current=None):
        choices = run_choices(ctx)
        ids = [c[1] for c in choices]
        value = current if current in ids else default_run(ctx, session, choices)
        return gr.update(choices=choices, value=value)

    # The owner token is made when a page opens, so no two events of a fresh session race to make it.
    page.load(lambda session: (fill(session), ensure_owner(session)), session, [picker, session],
              api_visibility="private")
    refresh.click(fill, [session, picker], picker, api_visibility="private")

    def remember(run_id, session):
        session = ensure_owner(session)
        if run_id:
            session["run_id"] = run_id
        return session

    picker.change(remember, [picker, session], session, api_visibility="private")


@dataclass
class RunControls:
    buttons: dict[str, gr.Button]  # pause, resume, stop, delete
    message: gr.Markdown


CANCELLED = "\x00cancelled"  # what the delete button sends when its confirmation is declined
CONFIRM_DELETE_JS = (f"(run_id, session) => [confirm('Delete this run and everything it saved? This cannot be undone.')"
                     f" ? run_id : {CANCELLED!r}, session]")


def run_controls(ctx: AppContext, picker: gr.Dropdown, session: gr.BrowserState) -> RunControls:
    """Pause / resume / stop / delete buttons for the picked run; only the session that started
    a run may steer or delete it. Pages enable the buttons that apply to the run's state."""
    with gr.Row():
        buttons = {"pause": gr.Button("❚❚ Pause", size="md", interactive=False, elem_id="pause-run"),
                   "resume": gr.Button("▶ Resume", size="md", interactive=False, elem_id="resume-run"),
                   "stop": gr.Button("■ Stop (saves a checkpoint)", size="md", variant="stop", interactive=False,
                                   elem_id="stop-run"),
                   "delete": gr.Button("Delete run", size="md", interactive=False, elem_id="delete-run")}
    message = gr.Markdown()
    done = {"pause": "Pausing after the current step.", "resume": "Resuming (a stopped run continues from its "
            "latest checkpoint, after any queued runs).", "stop": "Stopping: a checkpoint is saved, resume any time.",
            "delete": "Deleted: the run's folder is gone (↻ Refresh the list)."}

    for action, button in buttons.items():
        @user_errors
        def act(run_id, session, action=action):
            session = ensure_owner(session)
            if run_id == CANCELLED:
                return "Not deleted.", session
            if not run_id:
                raise gr.Error("Pick a run first.", print_exception=False)
            getattr(ctx.jobs, action)(run_id, session["owner"])
            return done[action], session

        button.click(act, [picker, session], [message, session], api_visibility="private",
                     js=CONFIRM_DELETE_JS if action == "delete" else None)
    return RunControls(buttons, message)


def control_states(status: dict, agc: bool = False) -> dict[str, bool]:
    """Which controls apply to a run in this state (the others are shown disabled); `apply`
    is the Monitor's "apply this λ", for runs with AGC."""
    state = status.get("state")
    live = state in ("running", "paused", "queued", "stopping", "evaluating")
    return {"pause": state == "running", "resume": state in ("paused", "stopped", "interrupted"),
            "stop": state in ("running", "paused", "queued"), "delete": not live,
            "apply": agc and state in ("running", "paused")}


def status_text(status: dict, skip_lambda: float | None = None) -> str:
    """A run's status as one markdown line (plus its message, if any)."""
    state = status.get("state") or "?"
    parts = [f"**{STATE_ICONS.get(state, '')} {state}**"]
    if status.get("queue_position"):
        parts.append(f"**#{status['queue_position']} in the queue**: starts when the run before it ends")
    total, step = status.get("total_steps"), status.get("global_step") or 0
    parts.append(f"round {round_shown(status)} of {status.get('rounds', '?')} · step {step}"
                 + (f" of {total} ({100 * step / total:.0f}%)" if total else ""))
    if status.get("seconds_left") is not None:
        parts.append(f"**{time_left(status['seconds_left'])}**")
    if status.get("last_round"):
        parts.append(f"stops after round {status['last_round']}")
    shorter = status.get("shorter")
    if shorter:
        parts.append(f"**this machine is slower than the schedule expects**: all {status.get('rounds')} rounds need "
                     f"about {math.ceil(shorter['minutes'])} min; {shorter['rounds']} rounds fit the planned time "
                     f"(*Shorter schedule* below)")
    if skip_lambda is not None:
        parts.append(f"skip threshold λ = **{skip_lambda:.2f}**")
    message = status.get("error") or status.get("message") or ""
    return " · ".join(parts) + (f"  \n{message}" if message else "")


DOWNLOAD_ROOT = Path(tempfile.gettempdir()) / "iet-app-downloads"
# Downloads (zipped checkpoints, exported pipelines, CSVs) share one concurrency group: copying
# and zipping are heavy on disk, so a few at a time however many clients ask.
DOWNLOADS = {"concurrency_id": "downloads", "concurrency_limit": 2}
DOWNLOAD_TTL_SECONDS = 600  # gradio has copied a download into its own cache long before this


def download_dir(prefix: str) -> Path:
    """A fresh temporary folder for a file to download: gradio copies what a handler returns
    into its own cache, and nothing in the runs folder is served directly. Folders older than
    DOWNLOAD_TTL_SECONDS are removed first, so downloads never pile up in the temp folder."""
    DOWNLOAD_ROOT.mkdir(exist_ok=True)
    cutoff = time.time() - DOWNLOAD_TTL_SECONDS
    for old in DOWNLOAD_ROOT.iterdir():
        try:
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # removed meanwhile by another request
            continue
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=DOWNLOAD_ROOT))


# -- images ------------------------------------------------------------------------------------

def display_image(image: np.ndarray, min_size: int = 96) -> np.ndarray:
    """(C, H, W) or (H, W[, C]) uint8 to (H, W, 3) scaled up by an integer factor (pixels
    stay sharp) so small training images are visible."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    factor = max(1, int(np.ceil(min_size / max(image.shape[0], 1))))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def image_grid(images: np.ndarray, columns: int = 8, min_tile: int = 48, gap: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) as one (H, W, 3) grid image with white gaps."""
    tiles = [display_image(image, min_tile) for image in images]
    if not tiles:
        return np.full((min_tile, min_tile, 3), 255, np.uint8)
    h, w, _ = tiles[0].shape
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_FOLDER = Path(tempfile.gettempdir()) / "iet-app-images"


def image_file(image: np.ndarray) -> str:
    """An (H, W[, 3]) uint8 image as a PNG file named by its content, written once and never
    replaced: galleries get these paths, so a file is never rewritten while it is being served
    (gradio rewrites the file of an array it is given on every update)."""
    data = png_bytes(image)
    path = IMAGE_FOLDER / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.exists():
        IMAGE_FOLDER.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}-{secrets.token_hex(4)}.png")
        partial.write_bytes(data)
        os.replace(partial, path)
    return str(path)


def data_uri(image: np.ndarray) -> str:
    """An image inlined in HTML as a PNG data: URI (small images only)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def read_image(path: Path) -> np.ndarray:
    """An image file (e.g. a run's preview grid) as an (H, W, 3) array: nothing in the runs
    folder is served as a file."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def training_images(ctx: AppContext, run_id: str, sample_ids, captions) -> list[tuple[np.ndarray, str]]:
    """Gallery items for training images given by global id (none when the run's data cannot
    be loaded any more, e.g. a Hub dataset offline: the rest of the page still works)."""
    try:
        dataset = ctx.dataset(run_id)
    except ConfigError:
        return []
    position = {int(i): p for p, i in enumerate(dataset.ids.tolist())}
    return [(image_file(display_image(dataset.images[position[int(i)]].numpy())), caption)
            for i, caption in zip(sample_ids, captions) if int(i) in position]


TERMS = {
    "proxy": "one of the K models of a round; each trains on its own shard, then all K are averaged into the global model",
    "shard": "one of the K parts the training images are split into",
    "bank[t]": "AGC's memory bank: the recent average loss at noise level t (each visit moves it a little)",
    "loss ratio": "a visit's loss divided by bank[t]; far below 1 means suspiciously easy, the sign of a memorized image",
    "λ": "AGC's skip threshold: a visit whose loss ratio is below λ gives no gradient",
    "EMA": "a slowly moving average of the weights, often sampled instead of the raw weights; early in training it lags behind",
    "copy": "a generated sample less than a third as far from its nearest training image as from the second nearest",
    "MQ": "the reference code's memorization measure: distance to the nearest training image over the mean distance to the 50 nearest",
    "FID / feature FD": "how far the samples' image statistics are from real images' (lower is better); feature FD is the offline stand-in",
}


def glossary(*names: str) -> None:
    """A folded list of the terms a page uses, one line each."""
    with gr.Accordion("Terms used on this page", open=False):
        gr.Markdown("\n".join(f"- **{name}**: {TERMS[name]}" for name in names))


def page_header(title: str, text: str) -> None:
    gr.Markdown(f"# {title}\n{text}")

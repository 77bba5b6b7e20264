"""The web app: see, measure and reduce memorization in diffusion models (IET-AGC, IET-AGC+).

    python app.py                       # http://127.0.0.1:7860, runs kept in ./runs
    python app.py --runs-dir /data/runs --max-jobs 1 --port 7860

The same file is a Hugging Face Space's entry point (see README). Training runs in background
threads owned by a JobManager; pages only poll it, so closing or refreshing a tab never stops
a run, and runs from earlier sessions are listed from the runs folder.
"""
from __future__ import annotations

import os

# Before gradio is imported: no usage analytics, nothing fetched from the network at launch.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import atexit
import signal
from pathlib import Path

import gradio as gr

from iet_core.jobs import JobManager
from pages import common, compare, data, learn, memorization, monitor, start, train

DEFAULT_RUNS_DIR = "runs"
# System fonts only: the default theme fonts are fetched from Google, which a classroom
# machine or an offline laptop cannot reach.
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="amber",
                       font=["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])
CSS = """
.gradio-container {max-width: 1400px !important; margin: auto;}
.big-number {font-size: 1.6em; font-weight: 600;}
.explain {font-size: 0.95em; opacity: 0.85;}
"""


def build_app(runs_root: str | Path, max_jobs: int = 1, max_runs_per_user: int | None = None,
              max_disk_per_user_mb: float | None = None) -> tuple[gr.Blocks, common.AppContext]:
    """The Gradio app and its context (job manager, runs folder) for a runs folder."""
    max_bytes = None if max_disk_per_user_mb is None else int(max_disk_per_user_mb * 2**20)
    jobs = JobManager(runs_root, max_running=max_jobs, max_runs_per_owner=max_runs_per_user, max_bytes_per_owner=max_bytes)
    ctx = common.AppContext.create(runs_root, jobs)
    with gr.Blocks(title="Memorization in diffusion models · IET-AGC") as demo:
        start.build(ctx, demo)
    for module in (data, train, monitor, memorization, compare, learn):
        with demo.route(module.TITLE, module.PATH) as page:
            module.build(ctx, page)
    return demo, ctx


def launch(demo: gr.Blocks, **kwargs):
    """Launch with the app's look and without anything that reaches the network."""
    kwargs.setdefault("share", False)
    return demo.queue(default_concurrency_limit=4).launch(theme=THEME, css=CSS, footer_links=["api"], **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default=os.environ.get("IET_RUNS_DIR", DEFAULT_RUNS_DIR),
                        help="where runs are kept (env IET_RUNS_DIR; default ./runs)")
    parser.add_argument("--max-jobs", type=int, default=int(os.environ.get("IET_MAX_JOBS", "1")),
                        help="training jobs that run at once; more wait in a queue (env IET_MAX_JOBS; default 1)")
    parser.add_argument("--max-runs-per-user", type=int, default=int(os.environ.get("IET_MAX_RUNS_PER_USER", "50")),
                        help="runs one browser session may keep (env IET_MAX_RUNS_PER_USER; default 50)")
    parser.add_argument("--max-disk-per-user-mb", type=float,
                        default=float(os.environ.get("IET_MAX_DISK_PER_USER_MB", "5000")),
                        help="disk one browser session's runs may use (env IET_MAX_DISK_PER_USER_MB; default 5000)")
    parser.add_argument("--cleanup-days", type=float, default=float(os.environ.get("IET_CLEANUP_DAYS", "0")) or None,
                        help="admin: at start, delete runs not updated for this many days (env IET_CLEANUP_DAYS)")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; a Space sets its own)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or the next free one)")
    args = parser.parse_args(argv)
    demo, ctx = build_app(args.runs_dir, max_jobs=args.max_jobs, max_runs_per_user=args.max_runs_per_user,
                          max_disk_per_user_mb=args.max_disk_per_user_mb)
    if args.cleanup_days:
        removed = ctx.jobs.cleanup(args.cleanup_days)
        print(f"cleanup: removed {len(removed)} run(s) not updated for {args.cleanup_days:g} days")
    # On Ctrl+C or SIGTERM (a Space restarting) the server closes, then running jobs stop;
    # stopping saves a checkpoint, so they resume after the restart.
    atexit.register(ctx.jobs.shutdown)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    launch(demo, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()

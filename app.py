"""The web app: see, measure and reduce memorization in diffusion models (IET-AGC, IET-AGC+).

    python app.py                       # http://127.0.0.1:7860, runs kept in ./runs
    python app.py --runs-dir /data/runs --max-jobs 1 --port 7860
    python app.py --data-dir /data/images        # users may also train on folders in there
    python app.py --model-dir /data/models       # ... and fine-tune the Stable Diffusion pipelines in there
    python app.py --no-hub                       # visitors name no Hub dataset or model (default on a Space)

The same file is a Hugging Face Space's entry point (see README). Training runs in background
threads owned by a JobManager; pages only poll it, so closing or refreshing a tab never stops
a run, and runs from earlier sessions are listed from the runs folder.
"""
from __future__ import annotations

import os

# Before gradio is imported: no usage analytics, nothing fetched from the network at launch.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Client addresses (for the per-client limits) are the app's to read, by --proxy-hops: uvicorn
# would otherwise take X-Forwarded-For as the client from any process on this machine.
os.environ.setdefault("FORWARDED_ALLOW_IPS", "")

import argparse
import atexit
import signal
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from iet_core.data import SourcePolicy
from iet_core.evaluate import EvaluationGate
from iet_core.jobs import JobManager
from iet_core.neighbours import resolve_device
from iet_core.runs import DATASETS_DIR
from pages import access, api, common, compare, data, learn, memorization, monitor, start, train

DEFAULT_RUNS_DIR = "runs"
MAX_UPLOAD_MB = 200  # one uploaded file, refused by the server before it is stored
# Gradio's own copies of uploads and downloads: every 10 minutes, remove those over an hour old
# (uploaded data is kept as an .npz in the runs folder, so the originals are not needed).
CACHE_CLEANUP = (600, 3600)
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
              max_disk_per_user_mb: float | None = None, data_dirs: tuple[str | Path, ...] = (),
              model_dirs: tuple[str | Path, ...] = (),
              claim_cli_runs: bool = False, max_live_jobs: int | None = None, max_steps_per_run: int | None = None,
              max_eval_work: int = common.MAX_EVAL_WORK, max_live_jobs_per_client: int | None = None,
              max_evals_per_client: int | None = None, proxy_hops: int = 0,
              hub: bool = True) -> tuple[gr.Blocks, common.AppContext]:
    """The Gradio app and its context (job manager, runs folder) for a runs folder. Users may
    train on built-in data, Hub datasets, their uploads and the admin's `data_dirs`, and fine-tune
    Hub models and what the admin's `model_dirs` hold (pipelines, copy-detection extractors);
    with `hub` off, no Hub dataset or model (the server downloads nothing for a visitor).
    Per-client limits count by network address: the connection's, or behind `proxy_hops`
    proxies the one they forward (access.client_address)."""
    max_bytes = None if max_disk_per_user_mb is None else int(max_disk_per_user_mb * 2**20)
    sources = SourcePolicy.allowing(Path(runs_root) / DATASETS_DIR, *data_dirs, models=model_dirs, hub=hub)
    jobs = JobManager(runs_root, max_running=max_jobs, max_runs_per_owner=max_runs_per_user, max_bytes_per_owner=max_bytes,
                      sources=sources, claim_unowned=claim_cli_runs, max_live_jobs=max_live_jobs,
                      max_steps_per_run=max_steps_per_run, max_live_jobs_per_client=max_live_jobs_per_client,
                      client_of=lambda: access.current_client(proxy_hops))
    ctx = common.AppContext.create(runs_root, jobs, max_eval_work=max_eval_work, proxy_hops=proxy_hops,
                                   evaluations=EvaluationGate(per_client=max_evals_per_client))
    with gr.Blocks(title="Memorization in diffusion models · IET-AGC", delete_cache=CACHE_CLEANUP) as demo:
        start.build(ctx, demo)
    for module in (data, train, monitor, memorization, compare, learn):
        with demo.route(module.TITLE, module.PATH) as page:
            module.build(ctx, page)
    return demo, ctx


def launch(demo: gr.Blocks, ctx: common.AppContext, **kwargs):
    """Launch with the app's look, its plain HTTP routes (served before Gradio's own), page
    events refused to callers that loaded no page, and without anything that reaches the network."""
    kwargs.setdefault("share", False)
    kwargs.setdefault("max_file_size", MAX_UPLOAD_MB * 2**20)
    # On a Space (Hugging Face sets SPACE_ID) the app is shown in an iframe of another site.
    page_only = Middleware(access.PageOnlyEvents, blocks=demo, key=ctx.page_key, cross_site=bool(os.environ.get("SPACE_ID")))
    return demo.queue(default_concurrency_limit=4).launch(
        theme=THEME, css=CSS, footer_links=["api"],
        app_kwargs={"routes": api.status_routes(ctx), "middleware": [page_only]}, **kwargs)


def default_max_jobs() -> int:
    """Training jobs at once: IET_MAX_JOBS if set, else 1 with a GPU (one job uses it best) and 2
    on a CPU, where jobs side by side split the cores and both finish sooner than one after the
    other (the classroom demo's two runs: bench/demo_speed.py --side-by-side)."""
    return int(os.environ.get("IET_MAX_JOBS") or (1 if resolve_device("auto").type == "cuda" else 2))


def default_hub() -> bool:
    """Hub downloads for visitors: IET_HUB if set, else on for a local or classroom server and
    off on a Hugging Face Space (SPACE_ID set), where anyone could fill its disk with models."""
    setting = os.environ.get("IET_HUB", "").strip().lower()
    if setting:
        return setting not in ("0", "false", "no", "off")
    return not os.environ.get("SPACE_ID")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default=os.environ.get("IET_RUNS_DIR", DEFAULT_RUNS_DIR),
                        help="where runs are kept (env IET_RUNS_DIR; default ./runs)")
    parser.add_argument("--max-jobs", type=int, default=default_max_jobs(),
                        help="training jobs that run at once, sharing the CPU cores; more wait in a queue (env "
                             "IET_MAX_JOBS; default 1 with a GPU, 2 without)")
    parser.add_argument("--max-runs-per-user", type=int, default=int(os.environ.get("IET_MAX_RUNS_PER_USER", "50")),
                        help="runs one browser session may keep (env IET_MAX_RUNS_PER_USER; default 50)")
    parser.add_argument("--max-disk-per-user-mb", type=float,
                        default=float(os.environ.get("IET_MAX_DISK_PER_USER_MB", "5000")),
                        help="disk one browser session's runs may use (env IET_MAX_DISK_PER_USER_MB; default 5000)")
    parser.add_argument("--data-dir", action="append", default=[],
                        help="admin: a folder of datasets users may train on by path (repeatable; otherwise only "
                             "built-in data, Hub ids and uploads)")
    parser.add_argument("--model-dir", action="append", default=[],
                        help="admin: a folder of models users may fine-tune or measure copies with, listed by name on "
                             "the Train page: diffusers Stable Diffusion pipeline folders, and SSCD TorchScript files or "
                             "DINOv2 / CLIP folders as feature extractors (repeatable; otherwise only Hub ids)")
    parser.add_argument("--hub", action=argparse.BooleanOptionalAction, default=default_hub(),
                        help="admin: whether visitors may name Hugging Face Hub datasets and models, which the server "
                             "then downloads (--no-hub: only built-in data, uploads and the admin's folders; env "
                             "IET_HUB=0/1; default on, off on a Hugging Face Space)")
    parser.add_argument("--claim-cli-runs", action="store_true",
                        help="admin: let any user resume or evaluate runs made with the command line (they have no owner)")
    parser.add_argument("--max-live-jobs", type=int, default=int(os.environ.get("IET_MAX_LIVE_JOBS", "20")),
                        help="runs training or queued at once, all users together (env IET_MAX_LIVE_JOBS; default 20)")
    parser.add_argument("--max-steps-per-run", type=int, default=int(os.environ.get("IET_MAX_STEPS_PER_RUN", "1000000")),
                        help="training steps one run may ask for (env IET_MAX_STEPS_PER_RUN; default 1,000,000)")
    parser.add_argument("--max-eval-work", type=int, default=common.MAX_EVAL_WORK,
                        help=f"samples x sampling steps one evaluation may ask for (default {common.MAX_EVAL_WORK:,})")
    parser.add_argument("--max-live-jobs-per-client", type=int,
                        default=int(os.environ.get("IET_MAX_LIVE_JOBS_PER_CLIENT", "4")),
                        help="runs training or queued at once from one network address, whatever its owner tokens "
                             "(env IET_MAX_LIVE_JOBS_PER_CLIENT; default 4; a class behind one router shares it)")
    parser.add_argument("--max-evals-per-client", type=int, default=int(os.environ.get("IET_MAX_EVALS_PER_CLIENT", "2")),
                        help="evaluations running or waiting from one network address (env IET_MAX_EVALS_PER_CLIENT; "
                             "default 2)")
    parser.add_argument("--proxy-hops", type=int, default=int(os.environ.get("IET_PROXY_HOPS", "0")),
                        help="admin: proxies in front of the app that append to X-Forwarded-For (a Hugging Face "
                             "Space: 1); per-client limits then count the address they forward (env IET_PROXY_HOPS; "
                             "default 0: the connection's address, the header ignored)")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                        help=f"largest file a user may upload (default {MAX_UPLOAD_MB})")
    parser.add_argument("--cleanup-days", type=float, default=float(os.environ.get("IET_CLEANUP_DAYS", "0")) or None,
                        help="admin: at start, delete runs not updated for this many days (env IET_CLEANUP_DAYS)")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; a Space sets its own)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or the next free one)")
    args = parser.parse_args(argv)
    if args.proxy_hops < 0 or min(args.max_live_jobs_per_client, args.max_evals_per_client) < 1:
        parser.error("--proxy-hops counts proxies (0 or more); the per-client limits allow at least 1.")
    demo, ctx = build_app(args.runs_dir, max_jobs=args.max_jobs, max_runs_per_user=args.max_runs_per_user,
                          max_disk_per_user_mb=args.max_disk_per_user_mb, data_dirs=tuple(args.data_dir),
                          model_dirs=tuple(args.model_dir),
                          claim_cli_runs=args.claim_cli_runs, max_live_jobs=args.max_live_jobs,
                          max_steps_per_run=args.max_steps_per_run, max_eval_work=args.max_eval_work,
                          max_live_jobs_per_client=args.max_live_jobs_per_client,
                          max_evals_per_client=args.max_evals_per_client, proxy_hops=args.proxy_hops, hub=args.hub)
    if args.cleanup_days:
        removed = ctx.jobs.cleanup(args.cleanup_days)
        print(f"cleanup: removed {len(removed)} run(s) not updated for {args.cleanup_days:g} days")
    # On Ctrl+C or SIGTERM (a Space restarting) the server closes, then evaluations are cancelled
    # and waited for (torch must not be running in a thread while Python shuts down), then
    # running jobs stop; stopping saves a checkpoint, so they resume after the restart.
    atexit.register(ctx.jobs.shutdown)
    atexit.register(ctx.evaluations.close)  # runs first: atexit calls in reverse order
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    launch(demo, ctx, server_name=args.host, server_port=args.port, max_file_size=int(args.max_upload_mb * 2**20))


if __name__ == "__main__":
    main()

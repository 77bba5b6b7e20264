"""Status polling and queueing under load: many clients poll /run_status while a run trains.

    python bench/status_load.py --callers 200 --json bench/results/status_load.json

Starts the app in-process on a fresh runs folder and a long tiny run, waits until it trains,
then measures /run_status one call at a time (the baseline), then `callers` calls at once,
each from its own thread through gradio_client, as many users' pages poll (again with the
run paused, to tell the training's share from the server's); each of these also through the
plain HTTP route GET /status/<run id> (outside Gradio's queue), side by side; then `queued`
runs submitted at once behind the training one: their /start_run latency and whether the
queue positions come back 1..queued. A benchmark, not a test: it prints figures, asserts none.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def small_config(mode: str, rounds: int):
    """A run of 12 digits at 8x8 with the tiny UNet: training loads the machine without
    hiding the server's own cost."""
    from iet_core.config import demo_config

    config = demo_config(mode)
    config.data.resolution, config.data.subset = 8, 12
    config.train.rounds, config.train.local_steps, config.train.batch_size = rounds, 3, 4
    config.train.preview_samples = 0
    return config


def percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"count": len(ordered), "p50_ms": 1e3 * statistics.median(ordered), "p95_ms": 1e3 * pick(0.95),
            "max_ms": 1e3 * ordered[-1]}


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def parallel(call, callers: int) -> list[float]:
    """`callers` calls at once, each from its own thread."""
    with ThreadPoolExecutor(callers) as pool:
        return list(pool.map(lambda _: timed(call), range(callers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=200, help="parallel status calls per endpoint (at most 1000)")
    parser.add_argument("--baseline", type=int, default=20, help="sequential status calls per endpoint")
    parser.add_argument("--queued", type=int, default=5, help="runs submitted at once behind the training one")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if not 1 <= args.callers <= 1000 or not 1 <= args.baseline <= 1000 or not 1 <= args.queued <= 50:
        parser.error("--callers and --baseline go from 1 to 1000, --queued from 1 to 50")

    import app
    from pages.api import run_summary
    from gradio_client import Client

    owner = "bench-owner-token"
    with tempfile.TemporaryDirectory() as runs:
        demo, ctx = app.build_app(runs, max_runs_per_user=None)
        _, url, _ = app.launch(demo, ctx, prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
        try:
            client = Client(url, verbose=False)
            long_run = small_config("iet-agc", rounds=10_000)
            run_id = client.predict(long_run.to_json(), owner, api_name="/start_run")["run_id"]
            deadline = time.monotonic() + 600
            while ctx.jobs.status(run_id)["state"] != "running" or not ctx.jobs.status(run_id).get("global_step"):
                if time.monotonic() > deadline:
                    raise SystemExit("the run did not start training within 10 minutes")
                time.sleep(0.1)  # a benchmark may poll: it measures, it does not assert
            status = lambda: client.predict(run_id, api_name="/run_status")  # noqa: E731
            plain = lambda: urllib.request.urlopen(f"{url}status/{run_id}", timeout=120).read()  # noqa: E731
            figures = {"machine": platform.machine(), "callers": args.callers,
                       "handler_alone": percentiles([timed(lambda: run_summary(ctx, run_id)) for _ in range(args.baseline)])}
            for name, call in (("run_status", status), ("http_status", plain)):
                figures[f"{name}_one_at_a_time"] = percentiles([timed(call) for _ in range(args.baseline)])
                figures[f"{name}_parallel"] = percentiles(parallel(call, args.callers))
            figures["load_average_1min_while_training"] = os.getloadavg()[0]
            client.predict(run_id, owner, api_name="/pause_run")  # the same calls without training alongside
            while ctx.jobs.status(run_id)["state"] != "paused":
                time.sleep(0.1)
            for name, call in (("run_status", status), ("http_status", plain)):
                figures[f"{name}_parallel_training_paused"] = percentiles(parallel(call, args.callers))
            client.predict(run_id, owner, api_name="/resume_run")
            configs = [small_config("ddpm", rounds=2).to_json() for _ in range(args.queued)]

            def submit(config: str) -> tuple[float, int | None]:
                start = time.perf_counter()
                row = client.predict(config, owner, api_name="/start_run")
                return time.perf_counter() - start, row["queue_position"]

            with ThreadPoolExecutor(args.queued) as pool:
                submitted = list(pool.map(submit, configs))
        finally:
            ctx.jobs.shutdown(timeout=60)
            demo.close()
    figures["start_run_parallel"] = percentiles([s for s, _ in submitted])
    figures["queue_positions"] = sorted(p for _, p in submitted)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

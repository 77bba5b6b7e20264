"""The app's programmatic API (gradio_client, `/gradio_api/...`): plain values in and out.

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    owner = "any-random-string-you-keep"          # identifies you as the run's owner
    run = client.predict(config_json, owner, api_name="/start_run")
    client.predict(run["run_id"], api_name="/run_status")
    urllib.request.urlopen(f"http://127.0.0.1:7860/status/{run['run_id']}")  # the same, outside the queue
    client.predict(run["run_id"], 64, 20, owner, api_name="/evaluate_run")

The pages call the same JobManager methods; this module only adapts types.
"""
from __future__ import annotations

from typing import Callable

import gradio as gr
from fastapi import HTTPException
from fastapi.routing import APIRoute
from gradio.context import LocalContext

from iet_core.config import ConfigError, EvalConfig, RunConfig
from iet_core.evaluate import evaluate_run, load_eval
from iet_core.owners import JobError, owner_digest
from pages.access import current_client
from pages.common import AppContext, user_errors
from pages.train import demo_run_config

EVAL_CONCURRENCY = "evaluation"  # UI and API evaluations share one gate (AppContext.evaluations)
STATUS_PATH = "/status/{run_id}"


def run_summary(ctx: AppContext, run_id: str) -> dict:
    """A run's status with its name and mode, in JSON-friendly values."""
    status = ctx.jobs.status(run_id)
    config = ctx.jobs.config(run_id)
    return {"run_id": run_id, "name": config.name, "mode": config.method.mode, "rounds": config.train.rounds,
            **{k: status.get(k) for k in ("state", "queue_position", "round", "global_step", "total_steps",
                                          "message", "error")}}


def evaluation_config(ctx: AppContext, run_id: str, num_samples: int, steps: int) -> EvalConfig:
    """The run's eval settings with these counts, within what this server allows one evaluation."""
    counts = RunConfig.from_dict({"eval": {"num_samples": num_samples, "steps": steps}}).eval
    config = ctx.jobs.run(run_id).config.eval
    config.num_samples, config.steps = counts.num_samples, counts.steps
    config.validate()
    work = config.num_samples * config.steps
    if work > ctx.max_eval_work:
        raise ConfigError(f"{config.num_samples} samples x {config.steps} steps = {work:,} sampling steps; this server "
                          f"allows {ctx.max_eval_work:,} per evaluation: ask for fewer samples or steps (the command "
                          "line has no such limit).")
    return config


def client_gone() -> Callable[[], bool]:
    """Whether the client of the event being handled has left (closed the tab or the
    connection, or cancelled). Gradio marks such an event dead but cannot stop the thread
    running it, so long handlers ask this and stop themselves."""
    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    seen = False

    def gone() -> bool:
        nonlocal seen
        if queue is None or event_id is None:  # called outside an event (tests)
            return False
        for events in list(queue.active_jobs):
            for event in events or ():
                if event._id == event_id:
                    seen = True
                    return not event.alive
        return seen  # no longer active once seen: cancelled
    return gone


def run_evaluation(ctx: AppContext, run_id: str, config: EvalConfig, owner: str, progress=None,
                   step: int | None = None):
    """Evaluate a run's checkpoint of global step `step` (None: the latest) for its owner through
    the server's evaluation gate, stopping early when the client leaves or the server stops."""
    ctx.jobs.check_owner(run_id, owner, "evaluate")
    with ctx.evaluations.slot(owner_digest(owner), client_gone(), current_client(ctx.proxy_hops)) as cancelled:
        return evaluate_run(ctx.jobs.run(run_id), config, dataset=ctx.dataset(run_id), progress=progress,
                            cancelled=cancelled, step=step)


def status_routes(ctx: AppContext) -> list[APIRoute]:
    """`GET /status/<run id>`: the JSON of /run_status as a plain HTTP route, outside Gradio's
    queue, so that many pages or scripts polling one server do not wait behind each other's
    events (bench/status_load.py compares the two). Read-only; an unknown or malformed id is a
    404, a run whose files cannot be read a 422, both with the message /run_status gives."""

    def run_status(run_id: str) -> dict:
        try:
            return run_summary(ctx, run_id)
        except JobError as err:
            raise HTTPException(404, str(err)) from None
        except ConfigError as err:
            raise HTTPException(422, str(err)) from None

    return [APIRoute(STATUS_PATH, run_status, methods=["GET"])]


def register(ctx: AppContext) -> None:
    """Add the API endpoints to the Blocks being built (the home page)."""

    @user_errors
    def start_run(config_json: str, owner: str) -> dict:
        """Queue a training run from a RunConfig as JSON ("" for the classroom demo's IET-AGC run)."""
        config = RunConfig.from_json(config_json) if config_json.strip() else demo_run_config("iet-agc")
        return run_summary(ctx, ctx.jobs.submit(config.validate(), _owner(owner)))

    @user_errors
    def run_status(run_id: str) -> dict:
        """State, queue position, round and step of a run."""
        return run_summary(ctx, run_id)

    @user_errors
    def list_runs() -> list[dict]:
        """Every run in the runs folder, newest first."""
        return ctx.jobs.list_runs()

    @user_errors
    def pause_run(run_id: str, owner: str) -> dict:
        ctx.jobs.pause(run_id, _owner(owner))
        return run_summary(ctx, run_id)

    @user_errors
    def resume_run(run_id: str, owner: str) -> dict:
        """Un-pause, or continue a stopped run from its latest checkpoint."""
        ctx.jobs.resume(run_id, _owner(owner))
        return run_summary(ctx, run_id)

    @user_errors
    def stop_run(run_id: str, owner: str) -> dict:
        """Stop (saving a checkpoint), or take a queued run off the queue."""
        ctx.jobs.stop(run_id, _owner(owner))
        return run_summary(ctx, run_id)

    @user_errors
    def delete_run(run_id: str, owner: str) -> list[dict]:
        """Delete a run you started (not while it trains); returns the remaining runs."""
        ctx.jobs.delete(run_id, _owner(owner))
        return ctx.jobs.list_runs()

    @user_errors
    def set_skip_lambda(run_id: str, skip_lambda: float, owner: str) -> dict:
        """Change a running run's AGC threshold from its next step."""
        ctx.jobs.set_skip_lambda(run_id, float(skip_lambda), _owner(owner))
        return run_summary(ctx, run_id)

    @user_errors
    def evaluate(run_id: str, num_samples: int, steps: int, owner: str) -> dict:
        """Sample a run you own and measure memorization; returns the summary and the per-sample table.
        One evaluation per owner at a time; it stops when the client disconnects."""
        config = evaluation_config(ctx, run_id, num_samples, steps)
        result = run_evaluation(ctx, run_id, config, _owner(owner))
        return {"summary": result.summary, "table": result.table.to_dict("records")}

    @user_errors
    def latest_evaluation(run_id: str) -> dict:
        """The newest saved evaluation of a run."""
        result = load_eval(ctx.jobs.run(run_id))
        return {"summary": result.summary, "table": result.table.to_dict("records")}

    for fn in (start_run, run_status, list_runs, pause_run, resume_run, stop_run, delete_run, set_skip_lambda,
               latest_evaluation):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None)
    gr.api(evaluate, api_name="evaluate_run", concurrency_limit=ctx.evaluations.capacity, concurrency_id=EVAL_CONCURRENCY)


def _owner(owner: str) -> str:
    if not owner or len(owner) < 8:
        raise gr.Error("Give an owner token of at least 8 characters (any random string you keep): it marks "
                       "the runs you start as yours.", print_exception=False)
    return owner

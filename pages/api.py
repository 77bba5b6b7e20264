"""The app's programmatic API (gradio_client, `/gradio_api/...`): plain values in and out.

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    owner = "any-random-string-you-keep"          # identifies you as the run's owner
    run = client.predict(config_json, owner, api_name="/start_run")
    client.predict(run["run_id"], api_name="/run_status")
    client.predict(run["run_id"], 64, 20, api_name="/evaluate_run")

The pages call the same JobManager methods; this module only adapts types.
"""
from __future__ import annotations

import gradio as gr

from iet_core.config import EvalConfig, RunConfig
from iet_core.evaluate import evaluate_run, load_eval
from pages.common import AppContext, user_errors
from pages.train import demo_run_config

EVAL_CONCURRENCY = "evaluation"  # one evaluation at a time (UI and API alike): it is heavy


def run_summary(ctx: AppContext, run_id: str) -> dict:
    """A run's status with its name and mode, in JSON-friendly values."""
    status = ctx.jobs.status(run_id)
    config = ctx.jobs.run(run_id).config
    return {"run_id": run_id, "name": config.name, "mode": config.method.mode, "rounds": config.train.rounds,
            **{k: status.get(k) for k in ("state", "queue_position", "round", "global_step", "total_steps",
                                          "message", "error")}}


def evaluation_config(ctx: AppContext, run_id: str, num_samples: int, steps: int) -> EvalConfig:
    config = ctx.jobs.run(run_id).config.eval
    config.num_samples, config.steps = int(num_samples), int(steps)
    config.validate()
    return config


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
    def evaluate(run_id: str, num_samples: int, steps: int) -> dict:
        """Sample the run and measure memorization; returns the summary and the per-sample table."""
        result = evaluate_run(ctx.jobs.run(run_id), evaluation_config(ctx, run_id, num_samples, steps))
        return {"summary": result.summary, "table": result.table.to_dict("records")}

    @user_errors
    def latest_evaluation(run_id: str) -> dict:
        """The newest saved evaluation of a run."""
        result = load_eval(ctx.jobs.run(run_id))
        return {"summary": result.summary, "table": result.table.to_dict("records")}

    for fn in (start_run, run_status, list_runs, pause_run, resume_run, stop_run, delete_run, set_skip_lambda,
               latest_evaluation):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None)
    gr.api(evaluate, api_name="evaluate_run", concurrency_limit=1, concurrency_id=EVAL_CONCURRENCY)


def _owner(owner: str) -> str:
    if not owner or len(owner) < 8:
        raise gr.Error("Give an owner token of at least 8 characters (any random string you keep): it marks "
                       "the runs you start as yours.", print_exception=False)
    return owner

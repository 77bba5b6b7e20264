"""5 · Compare: two or more runs side by side: memorization and quality numbers in a table,
curves and histograms overlaid."""
from __future__ import annotations

import gradio as gr
import numpy as np
import pandas as pd

from iet_core.config import MEMORIZATION_THRESHOLD, ConfigError
from iet_core.evaluate import load_eval
from pages import charts, common

TITLE, PATH = "5 · Compare", "compare"


def round_axis(steps: pd.DataFrame) -> pd.DataFrame:
    """Steps with a `round` axis: the round plus the share of its steps done, so runs with
    different numbers of proxies (4x the steps per round for K=4) line up round by round."""
    if not len(steps):
        return steps.assign(rounds=[])
    first = steps.groupby("round")["global_step"].transform("min")
    span = steps.groupby("round")["global_step"].transform("max") - first + 1
    return steps.assign(rounds=steps["round"] + (steps["global_step"] - first + 1) / span)


def percent(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{100 * value:.1f}%"


def compare_row(ctx: common.AppContext, run_id: str) -> dict:
    """One run's numbers, formatted for the table ("–": not evaluated or not available)."""
    config = ctx.jobs.run(run_id).config
    history = ctx.jobs.history(run_id)
    steps = history.steps()
    row = {"run": config.name, "mode": config.method.mode, "state": ctx.jobs.status(run_id).get("state"),
           "data": f"{config.data.subset or 'all'} × {config.data.source.split('/')[-1]} {config.data.resolution}px",
           "steps": int(steps["global_step"].max() + 1) if len(steps) else 0,
           "final loss": f"{steps['loss'].tail(max(1, len(steps) // 20)).mean():.4f}" if len(steps) else "–",
           "skipped": percent(history.summary()["skipped_share"])}
    try:
        summary = load_eval(ctx.jobs.run(run_id)).summary
    except ConfigError:  # not evaluated yet
        summary = {}
    row.update({"copies": percent(summary.get("memorized_fraction")),
                "MQ < 0.3": percent(summary.get("mq_shares", {}).get("0.3")),
                "FID": f"{summary['fid']:.1f}" if summary.get("fid") is not None else "–",
                "distinct nearest": summary.get("distinct_nearest", "–"),
                "eval samples": summary.get("num_samples", "–"), "id": run_id[-6:]})
    return row


def build(ctx: common.AppContext, page: gr.Blocks) -> None:
    common.page_header("Compare runs", "Pick two or more runs, e.g. the baseline and IET-AGC demo runs on the same "
                       "data. Evaluate each on the Memorization page first to fill in the copy numbers.")
    with gr.Row(equal_height=False):
        picker = gr.Dropdown(choices=[], multiselect=True, label="Runs to compare", scale=8, elem_id="compare-picker")
        refresh = gr.Button("↻ Refresh", scale=0, min_width=110, size="sm")
    table = gr.Dataframe(label="Memorization and quality", interactive=False, wrap=True, elem_id="compare-table")
    gr.Markdown("<span class='explain'>**copies**: share of generated samples whose nearest training image is less "
                "than a third as far as the second nearest (lower is better) · **MQ < 0.3**: the reference code's metric · "
                "**FID**: image quality, lower is better (needs the Inception weights) · **skipped**: share of "
                "training visits AGC skipped.</span>")
    with gr.Row():
        loss_plot = gr.Plot(show_label=False)
        kept_plot = gr.Plot(show_label=False)
    with gr.Row():
        ratio_plot = gr.Plot(show_label=False)
        memo_plot = gr.Plot(show_label=False)
    samples = gr.Gallery(label="Samples after the last round of each run: the quality side of the comparison",
                         columns=4, height=320, fit_columns=False)

    def fill(current=None):
        choices = common.run_choices(ctx)
        ids = [c[1] for c in choices]
        kept = [r for r in (current or []) if r in ids]
        if not kept:  # the two newest finished runs: usually the demo's baseline and IET-AGC
            kept = [r["run_id"] for r in ctx.jobs.list_runs() if r["state"] == "finished"][:2]
        return gr.update(choices=choices, value=kept)

    page.load(fill, None, picker, api_visibility="private")
    refresh.click(fill, picker, picker, api_visibility="private")

    def compare(run_ids):
        run_ids = run_ids or []
        if not run_ids:
            empty = charts.empty_figure("Pick runs to compare.")
            return None, empty, empty, empty, empty, []
        rows = pd.DataFrame([compare_row(ctx, r) for r in run_ids])
        names = {r: f"{row['run']} ({row['mode']}, {row['id']})" for r, row in zip(run_ids, rows.to_dict("records"))}
        steps = {names[r]: round_axis(ctx.jobs.history(r).steps(max_points=3000)) for r in run_ids}
        ratios, copies = {}, {}
        for r in run_ids:
            latest = ctx.jobs.history(r).window(1.0, min_visits=2048)
            ratios[names[r]] = latest.values() if latest is not None else np.zeros(0)
            try:
                copies[names[r]] = load_eval(ctx.jobs.run(r)).table["memorization_ratio"].to_numpy()
            except ConfigError:
                copies[names[r]] = np.zeros(0)
        return (rows,
                charts.overlay_lines(steps, "rounds", "loss", "Training loss (smoothed)", "loss", log_y=True),
                charts.overlay_lines(steps, "rounds", "kept_fraction", "Kept share of each batch", "kept"),
                charts.overlay_histograms(ratios, "Loss ratio at the end of training", "loss / bank[t]", (0, 3), 0.05),
                charts.overlay_histograms(copies, "Nearest / second-nearest distance of samples", "ratio", (0, 1),
                                          0.025, line=MEMORIZATION_THRESHOLD),
                [(common.read_image(paths[-1]), names[r]) for r in run_ids if (paths := ctx.jobs.run(r).preview_paths())])

    picker.change(compare, picker, [table, loss_plot, kept_plot, ratio_plot, memo_plot, samples],
                  api_visibility="private")

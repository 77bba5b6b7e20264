"""Start (home): what the app shows, a one-click demo, and every run in the runs folder."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from pages import api, common
from pages.train import PRESET_LABELS, demo_run_config

POLL_SECONDS = 3.0


def intro(demo, side_by_side: bool) -> str:
    """The home page's text, with the demo's numbers read from its recipe; `side_by_side`: the
    server trains two runs at once (on a CPU it splits the cores between them)."""
    train = demo.train
    budget = f", planned for about {train.time_budget_minutes:g} minutes on 2 CPU cores" if train.time_budget_minutes else ""
    order = "side by side" if side_by_side else "one after the other"
    return f"""
# Do diffusion models copy their training images?
Trained on few images, a diffusion model starts to **reproduce its training images** instead of making new ones.
This app trains small models live, shows the moment they start copying, and puts to the test how **IET-AGC**
(ECCV 2024) and **IET-AGC+** aim to reduce it: split the data among several models (IET) and skip training samples
whose loss is suspiciously low (AGC).

**New here?** Press *Start the demo*: it trains a baseline and an IET-AGC model on {demo.data.subset} handwritten
digits, {order} ({train.rounds} rounds each{budget}; the Monitor shows the time left as measured on
this machine, and offers a shorter schedule when the machine is slower). Each run's copies are measured as soon as
it finishes. Then follow the pages in order: **Monitor** while they train, **Memorization** to see the copies,
**Compare** to put them side by side. **Learn** explains the ideas.

**What to expect, honestly:** the baseline starts copying in the second half of its run. The IET-AGC run reaches
about the same quality on these digits and copies far less: measured with 512 samples of this very recipe in three
seeds, 1-1.4% against the baseline's 39-62%. Trained twice as long it does start to copy (17-18% against 76-90%):
later and less, not never. With 64 samples the demo's own figures are rough (±12 points), so read them with their
interval and quality on **Compare**. It is not a general result: with dropout an early baseline checkpoint copied as
little at the same quality, IET without AGC copied almost as little as IET-AGC (22-28% at twice the steps), and
with fewer, longer rounds IET-AGC delayed copying more than it prevented it (Learn, step 7).
"""


def runs_table(ctx: common.AppContext) -> pd.DataFrame:
    rows = ctx.jobs.list_runs()
    columns = ["run", "mode", "state", "progress", "run id"]
    if not rows:
        return pd.DataFrame(columns=columns)
    return pd.DataFrame([{
        "run": row["name"], "mode": row["mode"],
        "state": f"{common.STATE_ICONS.get(row['state'], '')} {row['state']}",
        "progress": (f"#{row['queue_position']} in queue" if row.get("queue_position")
                     else common.progress_text(row)),
        "run id": row["run_id"]} for row in rows], columns=columns)


def build(ctx: common.AppContext, page: gr.Blocks) -> None:
    session = common.session_state(ctx)
    gr.Markdown(intro(demo_run_config("ddpm"), side_by_side=ctx.jobs.max_running >= 2))
    with gr.Row():
        demo_both = gr.Button("▶ Start the demo: baseline and IET-AGC", variant="primary", size="lg",
                              elem_id="start-demo", scale=2)
        demo_baseline = gr.Button("Baseline DDPM only", size="lg", scale=1)
        demo_agc = gr.Button("IET-AGC only", size="lg", scale=1)
    demo_message = gr.Markdown(elem_id="demo-message")
    gr.Markdown(f"The demo uses the preset *{PRESET_LABELS[common.DEMO_PRESET]}* on the built-in digits: no download, no setup.")
    gr.Markdown("## Runs\nEvery run in the runs folder, newest first, including runs from before a restart "
                "(stopped runs can be resumed from the Train page).")
    table = gr.Dataframe(runs_table(ctx), interactive=False, wrap=True, elem_id="runs-table")
    timer = gr.Timer(POLL_SECONDS)

    @common.user_errors
    def start_demo(session, modes):
        session = common.ensure_owner(session)
        started = [ctx.jobs.submit(demo_run_config(mode), session["owner"]) for mode in modes]
        session["run_id"] = started[0]
        names = " and ".join(f"**{mode}**" for mode in modes)
        return (f"Queued {names}. [Watch on the Monitor page →](monitor) · When a run has finished, measure it on the "
                "[Memorization page](memorization).", session, runs_table(ctx))

    for button, modes in ((demo_both, ["ddpm", "iet-agc"]), (demo_baseline, ["ddpm"]), (demo_agc, ["iet-agc"])):
        button.click(lambda session, modes=modes: start_demo(session, modes), session,
                     [demo_message, session, table], api_visibility="private")
    timer.tick(lambda: runs_table(ctx), None, table, concurrency_limit=None, show_progress="hidden",
               api_visibility="private")
    page.load(lambda session: common.ensure_owner(session), session, session, api_visibility="private")
    api.register(ctx)

"""3 · Monitor: live curves, the loss-ratio histogram with the skip threshold, and the
threshold what-if, for the selected run. Polls the job store; never reads logs per tick."""
from __future__ import annotations

import shutil

import gradio as gr

from iet_core.jobs import JobError
from pages import charts, common

TITLE, PATH = "3 · Monitor", "monitor"
POLL_SECONDS = 2.0


def current_lambda(history, config) -> float:
    return history.skip_lambda(config.method.agc.skip_lambda)


def build(ctx: common.AppContext, page: gr.Blocks) -> None:
    session = common.session_state(ctx)
    common.page_header("Monitor a run", "Watch a run learn, live. The **loss-ratio histogram** is the heart of AGC: "
                       "each training visit's loss divided by the recent loss at the same noise level. Visits far "
                       "below 1 are suspiciously easy, the sign of an image being memorized; AGC skips those left "
                       "of the red line λ.")
    picker, refresh_list = common.run_picker()
    status = gr.Markdown("Pick a run.", elem_id="monitor-status")
    controls_message = common.run_controls(ctx, picker, session)
    with gr.Row():
        loss_plot = gr.Plot(label="Loss", show_label=False)
        kept_plot = gr.Plot(label="Kept vs skipped", show_label=False)
    with gr.Row():
        with gr.Column(scale=3):
            hist_plot = gr.Plot(label="Loss-ratio histogram", show_label=False, elem_id="ratio-histogram")
            with gr.Row():
                scrub = gr.Slider(0, 100, value=100, step=1, label="History: scrub back through training (100 = live)",
                                  scale=3)
                overlay = gr.Checkbox(value=True, label="Overlay the early histogram (grey)", scale=1)
        with gr.Column(scale=2):
            gr.Markdown("### Threshold what-if\nMove λ to see at once how many visits AGC would skip and which "
                        "training images those are. **Apply** changes the running run from its next step; the "
                        "curves mark the change.")
            what_if = gr.Slider(0.05, 1.0, value=0.5, step=0.01, label="What-if λ")
            what_if_text = gr.Markdown()
            apply = gr.Button("Apply this λ to the running run", variant="primary")
            what_if_gallery = gr.Gallery(fit_columns=False, label="Training images below the what-if λ (recent visits)", columns=4,
                                         height=280, allow_preview=False)
    with gr.Row(equal_height=False):
        shards_plot = gr.Plot(label="Shards", show_label=False)
        previews = gr.Gallery(fit_columns=False, label="Samples after each round (newest first)", columns=4, height=300)
    skipped_gallery = gr.Gallery(fit_columns=False, label="Most-skipped training images (skipped / visits)", columns=10, height=250,
                                 allow_preview=False, elem_id="most-skipped")
    with gr.Accordion("Downloads", open=False):
        with gr.Row():
            get_checkpoint = gr.Button("Checkpoint (.zip)")
            get_pipeline = gr.Button("diffusers pipeline (.zip)")
            get_metrics = gr.Button("Metrics (.csv)")
        download = gr.File(label="Download", interactive=False, visible=False)
    view = gr.State({})
    timer = gr.Timer(POLL_SECONDS)

    def histogram_outputs(run_id, scrub_value, overlay_on, what_if_value, telemetry=None, config=None):
        """Histogram figure, what-if text, and the training images visited below the what-if
        lambda as (ids, captions)."""
        telemetry = telemetry or ctx.jobs.history(run_id)
        config = config or ctx.jobs.run(run_id).config
        current = telemetry.window(scrub_value / 100)
        skip_lambda = current_lambda(telemetry, config)
        early = telemetry.early_window() if overlay_on else None
        figure = charts.ratio_histogram(current, skip_lambda, early, what_if_value)
        if current is None or current.visits == current.unseen:
            return figure, "No ratios yet.", ((), ())
        share_now = current.share_below(skip_lambda)
        share_new = current.share_below(what_if_value)
        label = "AGC skips" if config.method.agc.enabled else "AGC would skip (this run trains without AGC)"
        text = (f"<span class='big-number'>{100 * share_new:.1f}%</span> of visits below λ = {what_if_value:.2f}  \n"
                f"{label} {100 * share_now:.1f}% at the current λ = {skip_lambda:.2f} "
                f"(steps {current.first_step}–{current.last_step}).")
        below = telemetry.visits_below(what_if_value)
        return figure, text, (tuple(below["sample_id"]), tuple(f"{r.below}/{r.visits}" for r in below.itertuples()))

    def most_skipped(telemetry, agc: bool) -> tuple[str, tuple, tuple]:
        """The gallery's label and the training images to show, as (label, ids, captions)."""
        skipped, top = telemetry.most_skipped()
        if agc and skipped:
            return ("Most-skipped training images (skipped / visits)", tuple(top["sample_id"]),
                    tuple(f"{r.skips}/{r.visits}" for r in top.itertuples()))
        # Nothing skipped (yet, or no AGC): show what AGC would skip first.
        return ("Lowest loss ratios: what AGC would skip first (nothing skipped so far)", tuple(top["sample_id"]),
                tuple(f"ratio {r.last_ratio:.2f}" for r in top.itertuples()))

    def refresh(run_id, scrub_value, overlay_on, what_if_value, view_state):
        """The timer's handler: status always, the rest only when the run's store changed, and
        each gallery only when what it shows changed (images are encoded and sent each time)."""
        nothing = [gr.skip()] * 8
        if not run_id:
            return ["Pick a run (or start one on the Train page).", *nothing, view_state, gr.skip()]
        try:
            status_value = ctx.jobs.status(run_id)
        except JobError as err:  # e.g. deleted in another tab: say so, and offer the runs that are left
            return [str(err), *nothing, {}, gr.update(choices=common.run_choices(ctx), value=None)]
        run = ctx.jobs.run(run_id)
        config = run.config
        telemetry = ctx.jobs.history(run_id)
        text = common.status_text(status_value, current_lambda(telemetry, config) if config.method.agc.enabled else None)
        # The key holds the histogram controls too: a tick that started before a control moved
        # may land after the control's own redraw, and the next tick then puts it right.
        key = (run_id, telemetry.version, status_value.get("state"), scrub_value, overlay_on, what_if_value)
        if view_state.get("key") == key:
            return [text, *nothing, view_state, gr.skip()]
        shown = dict(view_state.get("shown", {})) if view_state.get("key", (None,))[0] == run_id else {}

        def when_changed(name, token, make):
            if shown.get(name) == token:
                return gr.skip()
            shown[name] = token
            return make()

        # A new state (e.g. finished) also shows in the run list's labels.
        relabel = (gr.update(choices=common.run_choices(ctx), value=run_id)
                   if view_state.get("key") and view_state["key"][2] != key[2] else gr.skip())
        steps, settings, rounds = telemetry.steps(max_points=2000), telemetry.settings(), telemetry.rounds()
        hist, what_if_md, (below, captions) = histogram_outputs(run_id, scrub_value, overlay_on, what_if_value,
                                                                telemetry, config)
        what_if_images = when_changed("what_if", [list(below), list(captions)],
                                      lambda: common.training_images(ctx, run_id, below, captions))
        plan = telemetry.round_plan() or {"round": 0, "steps_per_proxy": None}
        shards = charts.shard_progress(telemetry.proxies(), config.method.num_shards, plan["round"],
                                       plan["steps_per_proxy"])
        paths = run.preview_paths()
        previews_value = when_changed("previews", [p.name for p in paths], lambda: [
            (common.read_image(path), f"round {int(path.stem.split('-')[-1])}") for path in reversed(paths)])
        label, ids, skipped_captions = most_skipped(telemetry, config.method.agc.enabled)
        skipped = when_changed("skipped", [label, list(ids), list(skipped_captions)], lambda: gr.update(
            value=common.training_images(ctx, run_id, ids, skipped_captions), label=label))
        return [text, charts.loss_figure(steps, settings, rounds), charts.kept_figure(steps, settings, rounds), hist,
                what_if_md, what_if_images, shards, previews_value, skipped, {"key": key, "shown": shown}, relabel]

    outputs = [status, loss_plot, kept_plot, hist_plot, what_if_text, what_if_gallery, shards_plot, previews,
               skipped_gallery, view]
    timer.tick(refresh, [picker, scrub, overlay, what_if, view], [*outputs, picker], concurrency_limit=None,
               show_progress="hidden", api_visibility="private", trigger_mode="always_last")

    def select(run_id, view_state):
        """A new run: reset the view and start the what-if at its current lambda (a refreshed
        list that keeps the same run changes nothing)."""
        if not run_id or view_state.get("key", (None,))[0] == run_id:
            return [gr.skip()] * 12
        telemetry = ctx.jobs.history(run_id)
        skip_lambda = current_lambda(telemetry, ctx.jobs.run(run_id).config)
        return [*refresh(run_id, 100, True, skip_lambda, {})[:-1], 100, skip_lambda]

    picker.change(select, [picker, view], [*outputs, scrub, what_if], concurrency_limit=None, api_visibility="private")

    def redraw(run_id, scrub_value, overlay_on, what_if_value):
        if not run_id:
            return gr.skip(), gr.skip(), gr.skip()
        figure, text, (below, captions) = histogram_outputs(run_id, scrub_value, overlay_on, what_if_value)
        return figure, text, common.training_images(ctx, run_id, below, captions)

    for control in (scrub, overlay, what_if):
        control.change(redraw, [picker, scrub, overlay, what_if], [hist_plot, what_if_text, what_if_gallery],
                       concurrency_limit=None, show_progress="hidden", api_visibility="private",
                       trigger_mode="always_last")

    @common.user_errors
    def apply_lambda(run_id, value, session):
        session = common.ensure_owner(session)
        if not run_id:
            raise gr.Error("Pick a run first.")
        ctx.jobs.set_skip_lambda(run_id, float(value), session["owner"])
        return f"λ = {value:.2f} applies from the next step (marked on the curves).", session

    apply.click(apply_lambda, [picker, what_if, session], [controls_message, session], api_visibility="private")

    for button, make in ((get_checkpoint, checkpoint_zip), (get_pipeline, pipeline_zip), (get_metrics, metrics_csv)):
        @common.user_errors
        def prepare(run_id, make=make):
            if not run_id:
                raise gr.Error("Pick a run first.", print_exception=False)
            return gr.update(value=make(ctx.jobs.run(run_id)), visible=True)

        button.click(prepare, picker, download, api_visibility="private")
    common.wire_run_picker(ctx, page, picker, refresh_list, session)


def checkpoint_zip(run) -> str:
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise gr.Error("This run has no checkpoint yet: it saves one after every round and when stopped.")
    folder = common.download_dir(run.id)
    staging = folder / f"{run.id}-{checkpoint.name}"
    shutil.copytree(checkpoint, staging / checkpoint.name)
    shutil.copy2(run.path / "config.json", staging / "config.json")
    return shutil.make_archive(str(staging), "zip", staging)


def pipeline_zip(run) -> str:
    if run.latest_checkpoint() is None:
        raise gr.Error("This run has no checkpoint yet: it saves one after every round and when stopped.")
    folder = common.download_dir(run.id)
    exported = run.export(folder / f"{run.id}-pipeline")
    return shutil.make_archive(str(exported), "zip", exported)


def metrics_csv(run) -> str:
    source = run.path / "metrics.csv"
    if not source.exists():
        raise gr.Error("This run has not logged any steps yet.")
    target = common.download_dir(run.id) / f"{run.id}-metrics.csv"
    shutil.copy2(source, target)
    return str(target)

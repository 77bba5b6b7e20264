"""3 · Monitor: live curves, the loss-ratio histogram with the skip threshold, and the
threshold what-if, for the selected run. Polls the job store; never reads logs per tick.

The page is wiring only: what each output shows is computed by the module-level view
functions below (`status_view`, `histogram_view`, `most_skipped`, `tick`, ...), which tests call
without a browser."""
from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass

import gradio as gr

from iet_core.config import RunConfig
from iet_core.history import RATIO_BIN_WIDTH, RunHistory
from iet_core.jobs import JobError
from pages import charts, common

TITLE, PATH = "3 · Monitor", "monitor"
POLL_SECONDS = 2.0
MAX_PINS = 3  # candidate lambdas kept side by side
BELOW_SHOWN = 18  # training images shown below a what-if lambda


# -- view functions ------------------------------------------------------------------------

def current_lambda(history: RunHistory, config: RunConfig) -> float:
    """The lambda in force: the latest step's, or the configured one before any step."""
    return history.skip_lambda(config.method.agc.skip_lambda)


@dataclass
class HistogramView:
    figure: object
    text: str
    below_ids: tuple  # training images visited below the what-if lambda, most often first
    below_captions: tuple


def histogram_view(history, config: RunConfig, scrub: float, overlay: bool, what_if: float) -> HistogramView:
    """The ratio histogram coloured at the what-if lambda, the what-if text, and the training
    images recently visited below the what-if lambda."""
    current = history.window(scrub / 100)
    agc = config.method.agc.enabled
    applied = current_lambda(history, config) if agc else None
    early = history.early_window() if overlay else None
    figure = charts.ratio_histogram(current, what_if, applied, early)
    if current is None or current.visits == current.unseen:
        return HistogramView(figure, "No ratios yet.", (), ())
    share_new = current.share_below(what_if)
    if agc:
        now = f"AGC skips {100 * current.share_below(applied):.1f}% at the λ in force, {applied:.2f}"
    else:
        now = "This run trains without AGC: nothing is skipped, these are the visits AGC would skip"
    text = (f"<span class='big-number'>{100 * share_new:.1f}%</span> of visits below the what-if "
            f"λ = **{what_if:.2f}**  \n{now} (steps {current.first_step}–{current.last_step}).")
    ids, captions = visits_below(history, what_if)
    return HistogramView(figure, text, ids, captions)


def visits_below(history, value: float, limit: int = BELOW_SHOWN) -> tuple[tuple, tuple]:
    """Training images recently visited with a ratio below `value`, most often first, captioned
    "times below / visits"."""
    below = history.visits_below(value, limit)
    return tuple(below["sample_id"]), tuple(f"{r.below}/{r.visits}" for r in below.itertuples())


def most_skipped(history, agc: bool) -> tuple[str, tuple, tuple]:
    """The gallery's label and the training images to show, as (label, ids, captions)."""
    skipped, top = history.most_skipped()
    if agc and skipped:
        return ("Most-skipped training images (skipped / visits)", tuple(top["sample_id"]),
                tuple(f"{r.skips}/{r.visits}" for r in top.itertuples()))
    # Nothing skipped (yet, or no AGC): show what AGC would skip first.
    return ("Lowest loss ratios: what AGC would skip first (nothing skipped so far)", tuple(top["sample_id"]),
            tuple(f"ratio {r.last_ratio:.2f}" for r in top.itertuples()))


def config_with_lambda(config: RunConfig, value: float) -> str:
    """Markdown with the run's config at a new lambda, as JSON and as the CLI command that
    trains it (for the long run on a GPU machine)."""
    tree = config.to_dict()
    tree["method"]["agc"]["skip_lambda"] = round(float(value), 4)
    tree["name"] = f"{config.name}-lambda{value:.2f}"
    checked = RunConfig.from_dict(tree).validate()
    return (f"**This run's settings with λ = {value:.2f}**: save them as `{checked.name}.json`, then train with "
            f"`python -m iet_core train --config {shlex.quote(checked.name)}.json` (add `--device cuda` on a GPU "
            f"machine).\n\n```json\n{checked.to_json()}\n```")


def pinned_view(history, config: RunConfig, pins: list[float]) -> list[tuple[str, list]]:
    """For each pinned lambda: a line with its skipped share and the images below it."""
    current = history.window()
    views = []
    for value in pins:
        share = current.share_below(value) if current is not None else 0.0
        ids, captions = visits_below(history, value, limit=8)
        views.append((f"**λ = {value:.2f}**: {100 * share:.1f}% of recent visits below", list(zip(ids, captions))))
    return views


def status_view(ctx: common.AppContext, run_id: str, status: dict | None = None) -> tuple[str, dict]:
    """The status line and the state of each control for a run."""
    status = status or ctx.jobs.status(run_id)
    config = ctx.jobs.run(run_id).config
    agc = config.method.agc.enabled
    skip_lambda = current_lambda(ctx.jobs.history(run_id), config) if agc else None
    return common.status_text(status, skip_lambda), common.control_states(status, agc)


def tick(ctx: common.AppContext, run_id: str, scrub: float, overlay: bool, what_if: float, view_state: dict) -> dict:
    """What the periodic refresh changes, by output name. The status always; the rest only when
    the run's store changed, and each gallery only when what it shows changed (images are sent
    again each time). Missing names are left as they are."""
    status = ctx.jobs.status(run_id)
    status_line, controls = status_view(ctx, run_id, status)
    out = {"status": status_line, "controls": controls, "shorter": status.get("shorter")}
    run = ctx.jobs.run(run_id)
    config = run.config
    history = ctx.jobs.history(run_id)
    state = status.get("state")
    listed = (state, common.round_shown(status))  # what the run list's label says of the run
    key = (run_id, history.version, listed, scrub, overlay, what_if)
    if view_state.get("key") == key:
        out["view"] = view_state
        return out
    shown = dict(view_state.get("shown", {})) if view_state.get("key", (None,))[0] == run_id else {}

    def changed(name, token) -> bool:
        if shown.get(name) == token:
            return False
        shown[name] = token
        return True

    if view_state.get("key") and view_state["key"][2] != listed:  # a new state or round shows in the run list
        out["relabel"] = True
    steps, settings, rounds = history.steps(max_points=2000), history.settings(), history.rounds()
    out["loss"] = charts.loss_figure(steps, settings, rounds)
    out["kept"] = charts.kept_figure(steps, settings, rounds)
    view = histogram_view(history, config, scrub, overlay, what_if)
    out["histogram"], out["what_if_text"] = view.figure, view.text
    if changed("what_if", [list(view.below_ids), list(view.below_captions)]):
        out["what_if_images"] = common.training_images(ctx, run_id, view.below_ids, view.below_captions)
    plan = history.round_plan() or {"round": 0, "steps_per_proxy": None}
    # The round the status line shows (a stopped run's unfinished round, a finished run's last one).
    out["shards"] = charts.shard_progress(history.proxies(), config.method.num_shards, common.round_shown(status) - 1,
                                          plan["steps_per_proxy"])
    out["drift"] = charts.drift_figure(history.drift())
    previews = run.previews()
    if changed("previews", [number for number, _ in previews]):
        out["previews"] = [(common.image_file(common.read_image(path)), f"round {number}")
                           for number, path in reversed(previews)]
    label, ids, captions = most_skipped(history, config.method.agc.enabled)
    if changed("skipped", [label, list(ids), list(captions)]):
        out["skipped"] = (label, common.training_images(ctx, run_id, ids, captions))
    out["view"] = {"key": key, "shown": shown}
    return out


# -- downloads -------------------------------------------------------------------------------

def checkpoint_zip(run) -> str:
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise gr.Error("This run has no checkpoint yet: it saves one after every round and when stopped.")
    staging = run.bundle_checkpoint(common.download_dir(run.id) / f"{run.id}-{checkpoint.name}")
    return shutil.make_archive(str(staging), "zip", staging)


def pipeline_zip(run) -> str:
    if run.latest_checkpoint() is None:
        raise gr.Error("This run has no checkpoint yet: it saves one after every round and when stopped.")
    folder = common.download_dir(run.id)
    exported = run.export(folder / f"{run.id}-pipeline")
    return shutil.make_archive(str(exported), "zip", exported)


def metrics_csv(run) -> str:
    source = run.metrics_path
    if not source.exists():
        raise gr.Error("This run has not logged any steps yet.")
    target = common.download_dir(run.id) / f"{run.id}-metrics.csv"
    shutil.copy2(source, target)
    return str(target)


# -- the page --------------------------------------------------------------------------------

def build(ctx: common.AppContext, page: gr.Blocks) -> None:
    session = common.session_state(ctx)
    common.page_header("Monitor a run", "Watch a run learn, live. The **loss-ratio histogram** is the heart of AGC: "
                       "each training visit's loss divided by the recent loss at the same noise level. Visits far "
                       "below 1 are suspiciously easy, the sign of an image being memorized; AGC skips those left "
                       "of the red line λ.")
    common.glossary("proxy", "shard", "bank[t]", "loss ratio", "λ", "EMA")
    picker, refresh_list = common.run_picker()
    status = gr.Markdown("Pick a run.", elem_id="monitor-status")
    controls = common.run_controls(ctx, picker, session)
    shorten = gr.Button(visible=False, variant="primary", elem_id="shorter-schedule")
    gr.Markdown("<span class='explain'>Left: the training loss of every step, all proxies together (grey lines: "
                "round ends; red dashes: λ changed). Right: the share of each batch AGC kept and skipped.</span>")
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
                        "training images those are; the histogram is coloured at this λ. **Apply** changes the "
                        "running run from its next step; the curves mark the change.")
            what_if = gr.Slider(0.05, 1.0, value=0.5, step=RATIO_BIN_WIDTH, label="What-if λ", elem_id="what-if")
            what_if_text = gr.Markdown(elem_id="what-if-text")
            with gr.Row():
                apply = gr.Button("Apply this λ to the running run", variant="primary", interactive=False,
                                  elem_id="apply-lambda")
                pin = gr.Button("Pin this λ", size="md")
                copy_config = gr.Button("Copy config with this λ", size="md")
            what_if_gallery = gr.Gallery(fit_columns=False, label="Training images below the what-if λ (recent visits)",
                                         columns=4, height=280, allow_preview=False)
    with gr.Row(visible=False) as pins_row:
        pin_texts, pin_galleries = [], []
        for _ in range(MAX_PINS):
            with gr.Column(min_width=200):
                pin_texts.append(gr.Markdown())
                pin_galleries.append(gr.Gallery(fit_columns=False, columns=4, height=160, allow_preview=False,
                                                show_label=False))
        clear_pins = gr.Button("Clear pins", size="sm", scale=0)
    config_text = gr.Markdown(visible=False, elem_id="config-with-lambda")
    gr.Markdown("<span class='explain'>Left: how far each proxy is through the current round. Right: samples "
                "drawn from the global model after each round. Below: the training images AGC skipped most.</span>")
    with gr.Row(equal_height=False):
        shards_plot = gr.Plot(label="Shards", show_label=False, elem_id="shards-chart")
        drift_plot = gr.Plot(label="Proxy drift", show_label=False, elem_id="drift-plot")
        previews = gr.Gallery(fit_columns=False, label="Samples after each round (newest first)", columns=4, height=300)
    skipped_gallery = gr.Gallery(fit_columns=False, label="Most-skipped training images (skipped / visits)", columns=10,
                                 height=250, allow_preview=False, elem_id="most-skipped")
    with gr.Accordion("Downloads", open=False):
        with gr.Row():
            get_checkpoint = gr.Button("Checkpoint (.zip)")
            get_pipeline = gr.Button("diffusers pipeline (.zip)")
            get_metrics = gr.Button("Metrics (.csv)")
        download = gr.File(label="Download", interactive=False, visible=False)
    view = gr.State({})
    # The what-if value the page shows, updated in place the moment the slider moves: a tick
    # reads it when it draws, so a tick that started before the slider moved never draws the
    # older value over the newer one.
    what_if_now = gr.State({"value": 0.5})
    pins = gr.State([])
    timer = gr.Timer(POLL_SECONDS)

    buttons = {**controls.buttons, "apply": apply}
    tick_outputs = [status, loss_plot, kept_plot, hist_plot, what_if_text, what_if_gallery, shards_plot, drift_plot, previews,
                    skipped_gallery, view, picker, *buttons.values(), shorten]

    def outputs_of(run_id: str, out: dict) -> list:
        """tick()'s dict as the values of tick_outputs (gr.skip() where nothing changed)."""
        values = [out["status"]] + [out.get(name, gr.skip()) for name in
                                    ("loss", "kept", "histogram", "what_if_text", "what_if_images", "shards",
                                     "drift", "previews")]
        skipped = out.get("skipped")
        values.append(gr.update(label=skipped[0], value=skipped[1]) if skipped else gr.skip())
        values.append(out["view"])
        values.append(gr.update(choices=common.run_choices(ctx), value=run_id) if out.get("relabel") else gr.skip())
        values += [gr.update(interactive=out["controls"][name]) for name in buttons]
        shorter = out["shorter"]
        values.append(gr.update(visible=bool(shorter), value=f"Shorter schedule: stop after round {shorter['rounds']}")
                      if shorter else gr.update(visible=False))
        return values

    def refresh(run_id, scrub_value, overlay_on, now, view_state):
        if not run_id:
            return ["Pick a run (or start one on the Train page).", *[gr.skip()] * (len(tick_outputs) - 1)]
        try:
            return outputs_of(run_id, tick(ctx, run_id, scrub_value, overlay_on, now["value"], view_state))
        except JobError as err:  # e.g. deleted in another tab: say so, and offer the runs that are left
            nothing = [gr.skip()] * (len(tick_outputs) - 4 - len(buttons))
            return [str(err), *nothing, {}, gr.update(choices=common.run_choices(ctx), value=None),
                    *[gr.update(interactive=False)] * len(buttons), gr.update(visible=False)]

    timer.tick(refresh, [picker, scrub, overlay, what_if_now, view], tick_outputs, concurrency_limit=None,
               show_progress="hidden", api_visibility="private", trigger_mode="always_last")

    def select(run_id, now, view_state):
        """A new run: reset the view and start the what-if at its current lambda (a refreshed
        list that keeps the same run changes nothing)."""
        if not run_id or view_state.get("key", (None,))[0] == run_id:
            return [gr.skip()] * (len(tick_outputs) + 2)
        config = ctx.jobs.run(run_id).config
        now["value"] = current_lambda(ctx.jobs.history(run_id), config)
        return [*refresh(run_id, 100, True, now, {}), 100, now["value"]]

    picker.change(select, [picker, what_if_now, view], [*tick_outputs, scrub, what_if], concurrency_limit=None,
                  api_visibility="private")

    def redraw(run_id, scrub_value, overlay_on, value, now):
        now["value"] = float(value)
        if not run_id:
            return gr.skip(), gr.skip(), gr.skip()
        shown = histogram_view(ctx.jobs.history(run_id), ctx.jobs.run(run_id).config, scrub_value, overlay_on,
                               float(value))
        return shown.figure, shown.text, common.training_images(ctx, run_id, shown.below_ids, shown.below_captions)

    for control in (scrub, overlay, what_if):
        control.change(redraw, [picker, scrub, overlay, what_if, what_if_now],
                       [hist_plot, what_if_text, what_if_gallery], concurrency_limit=None, show_progress="hidden",
                       api_visibility="private", trigger_mode="always_last")

    @common.user_errors
    def apply_lambda(run_id, value, session):
        session = common.ensure_owner(session)
        if not run_id:
            raise gr.Error("Pick a run first.")
        ctx.jobs.set_skip_lambda(run_id, float(value), session["owner"])
        return f"λ = {value:.2f} applies from the next step (marked on the curves).", session

    apply.click(apply_lambda, [picker, what_if, session], [controls.message, session], api_visibility="private")

    @common.user_errors
    def shorten_schedule(run_id, session):
        session = common.ensure_owner(session)
        shorter = ctx.jobs.status(run_id).get("shorter") if run_id else None
        if not shorter:
            raise gr.Error("This run has no shorter schedule to offer.", print_exception=False)
        ctx.jobs.shorten(run_id, shorter["rounds"], session["owner"])
        return (f"The run stops after round {shorter['rounds']} (a checkpoint is saved), then its copies are "
                "measured.", session)

    shorten.click(shorten_schedule, [picker, session], [controls.message, session], api_visibility="private")

    def show_pins(run_id, values):
        if not run_id or not values:
            return [gr.update(visible=False), *[""] * MAX_PINS, *[[]] * MAX_PINS]
        views = pinned_view(ctx.jobs.history(run_id), ctx.jobs.run(run_id).config, values)
        views += [("", [])] * (MAX_PINS - len(views))
        return [gr.update(visible=True), *[text for text, _ in views],
                *[common.training_images(ctx, run_id, [i for i, _ in items], [c for _, c in items])
                  for _, items in views]]

    def add_pin(run_id, value, values):
        values = sorted({*values, round(float(value), 2)})[-MAX_PINS:]
        return [values, *show_pins(run_id, values)]

    pin_outputs = [pins, pins_row, *pin_texts, *pin_galleries]
    pin.click(add_pin, [picker, what_if, pins], pin_outputs, api_visibility="private")
    clear_pins.click(lambda run_id: [[], *show_pins(run_id, [])], picker, pin_outputs, api_visibility="private")

    @common.user_errors
    def copy_with_lambda(run_id, value):
        if not run_id:
            raise gr.Error("Pick a run first.", print_exception=False)
        return gr.update(value=config_with_lambda(ctx.jobs.run(run_id).config, float(value)), visible=True)

    copy_config.click(copy_with_lambda, [picker, what_if], config_text, api_visibility="private")

    for button, make in ((get_checkpoint, checkpoint_zip), (get_pipeline, pipeline_zip), (get_metrics, metrics_csv)):
        @common.user_errors
        def prepare(run_id, make=make):
            if not run_id:
                raise gr.Error("Pick a run first.", print_exception=False)
            return gr.update(value=make(ctx.jobs.run(run_id)), visible=True)

        button.click(prepare, picker, download, api_visibility="private", **common.DOWNLOADS)
    common.wire_run_picker(ctx, page, picker, refresh_list, session)

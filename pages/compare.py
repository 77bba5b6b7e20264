"""5 · Compare: two or more runs side by side: memorization and quality numbers in a table,
curves and histograms overlaid."""
from __future__ import annotations

import gradio as gr
import numpy as np
import pandas as pd

from iet_core.config import MEMORIZATION_THRESHOLD, ConfigError, EvalConfig
from iet_core.evaluate import evaluation_warnings, flips_in_training, load_eval
from iet_core.metrics import proportion_interval
from iet_core import quality
from iet_core.quality import quality_text
from iet_core.runs import checkpoint_step
from pages import api, charts, common

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


# What a comparison rests on first (copies beside their quality, step and weights), what the runs were after.
COLUMNS = ["run", "mode", "copies", "95% interval", "quality", "eval step", "weights", "samples", "skipped",
           "trained steps", "final loss", "state", "data", "id"]


def newest_evaluation(ctx: common.AppContext, run_id: str):
    """The run's newest saved evaluation (None when not evaluated yet)."""
    try:
        return load_eval(ctx.jobs.run(run_id))
    except ConfigError:
        return None


QUALITY_GAP = 2.0  # a run whose quality figure is this many times the best run's is not comparable


def run_warnings(names: list[str], summaries: list[dict]) -> dict[str, list[str]]:
    """Per evaluated run, why its copy share means little: the engine's warnings (noise, an EMA
    that has not caught up), and a quality far worse than the best run's (same measure only)."""
    done = {n: s for n, s in zip(names, summaries) if s}
    warnings = {n: evaluation_warnings(s) for n, s in done.items()}
    measured = {n: s["quality"] for n, s in done.items() if (s.get("quality") or {}).get("measure")}
    if len({(q["measure"], q["reference"]) for q in measured.values()}) == 1 and len(measured) > 1:
        best_name, best = min(measured.items(), key=lambda item: item[1]["value"])
        for name, figure in measured.items():
            if figure["value"] > QUALITY_GAP * best["value"] and figure["low"] > best["high"]:
                warnings[name].append(f"its samples are far worse than {best_name}'s ({figure['measure']} "
                                      f"{figure['value']:.2f} against {best['value']:.2f}): its copy share is not "
                                      "comparable with theirs")
    return {n: w for n, w in warnings.items() if w}


def share_cells(summary: dict, warned: bool = False) -> dict:
    """An evaluation's copy share with its evidence, as table cells; `warned`: it means nothing
    yet (the notes say why), and the cell says so first."""
    count, total = summary["memorized_count"], summary["num_samples"]
    low, high = proportion_interval(count, total)
    return {"copies": f"{'⚠ means nothing yet: ' if warned else ''}{100 * count / total:.1f}% ({count}/{total})",
            "95% interval": f"{100 * low:.0f}–{100 * high:.0f}%", "eval step": summary.get("checkpoint_step", "–"),
            "weights": {"ema": "EMA", "model": "raw"}.get(summary.get("weights"), "–"),
            "quality": quality_text(summary), "samples": total}


def compare_row(ctx: common.AppContext, run_id: str, summary: dict, warned: bool = False) -> dict:
    """One run's numbers, formatted for the table ("–": not evaluated or not available). A copy
    share always comes with its sample count, interval, checkpoint step, weights and quality."""
    config = ctx.jobs.run(run_id).config
    history = ctx.jobs.history(run_id)
    steps = history.steps()
    row = {"run": config.name, "mode": config.method.mode, "state": ctx.jobs.status(run_id).get("state"),
           "data": f"{config.data.subset or 'all'} × {config.data.source.split('/')[-1]} {config.data.resolution}px",
           "trained steps": int(steps["global_step"].max() + 1) if len(steps) else 0,
           "final loss": f"{steps['loss'].tail(max(1, len(steps) // 20)).mean():.4f}" if len(steps) else "–",
           "skipped": percent(history.summary()["skipped_share"]),
           "id": run_id[-6:]}
    if summary:
        row.update(share_cells(summary, warned))
    return {column: row.get(column, "–") for column in COLUMNS}


def fairness_notes(names: list[str], summaries: list[dict]) -> str:
    """What makes these runs' copy shares not comparable as they stand, one warning a line."""
    notes = [f"{name}: {warning}." for name, found in run_warnings(names, summaries).items() for warning in found]
    missing = [n for n, s in zip(names, summaries) if not s]
    if missing:
        notes.append(f"Not evaluated yet: {', '.join(missing)} (Memorization page, or *Evaluate all the same way*).")
    done = [(n, s) for n, s in zip(names, summaries) if s]
    for field, what in (("checkpoint_step", "training steps"), ("weights", "weights (EMA or raw)"),
                        ("num_samples", "sample counts"), ("steps", "sampling steps"), ("flip_aware", "mirror settings")):
        values = {str(s.get(field)) for _, s in done}
        if len(values) > 1:
            listed = ", ".join(f"{n}: {s.get(field)}" for n, s in done)
            notes.append(f"Evaluated with different {what} ({listed}): compare like with like.")
    if len(done) > 1 and not any(s.get("fid") is not None or (s.get("quality") or {}).get("measure") for _, s in done):
        notes.append("No quality figure: a run that copies less may simply make worse images.")
    return "\n".join(f"⚠ {note}  " for note in notes) if notes else "✓ Evaluated alike: same step, weights and samples."


def run_name(ctx: common.AppContext, run_id: str) -> str:
    """How the page names a run: "demo-ddpm (ddpm, 3f9a2c)"."""
    config = ctx.jobs.run(run_id).config
    return f"{config.name} ({config.method.mode}, {run_id[-6:]})"


def compare_view(ctx: common.AppContext, run_ids: list[str]) -> tuple:
    """The page's outputs for the picked runs: table, notes on fairness, four charts, samples."""
    if not run_ids:
        empty = charts.empty_figure("Pick runs to compare.")
        return pd.DataFrame(columns=COLUMNS), "", empty, empty, empty, empty, []
    evaluations = {r: newest_evaluation(ctx, r) for r in run_ids}
    summaries = [e.summary if e is not None else {} for e in evaluations.values()]
    names = {r: run_name(ctx, r) for r in run_ids}
    warned = run_warnings(list(names.values()), summaries)
    rows = [compare_row(ctx, r, summary, names[r] in warned) for r, summary in zip(run_ids, summaries)]
    steps = {names[r]: round_axis(ctx.jobs.history(r).steps(max_points=3000)) for r in run_ids}
    ratios, copies = {}, {}
    for r in run_ids:
        latest = ctx.jobs.history(r).window(1.0, min_visits=2048)
        ratios[names[r]] = latest.values() if latest is not None else np.zeros(0)
        if (evaluation := evaluations[r]) is not None:  # each share's histogram named with its step and quality
            summary = evaluation.summary
            label = f"{names[r]} · step {summary.get('checkpoint_step', '?')}, {quality_text(summary, brief=True)}"
            copies[label] = evaluation.table["memorization_ratio"].to_numpy()
        else:
            copies[names[r]] = np.zeros(0)  # keeps each run's colour
    return (pd.DataFrame(rows, columns=COLUMNS), fairness_notes([names[r] for r in run_ids], summaries),
            charts.overlay_lines(steps, "rounds", "loss", "Training loss (smoothed)", "loss", log_y=True),
            charts.overlay_lines(steps, "rounds", "kept_fraction", "Kept share of each batch", "kept"),
            charts.overlay_histograms(ratios, "Loss ratio at the end of training", "loss / bank[t]", (0, 3), 0.05),
            charts.overlay_histograms(copies, "Nearest / second-nearest distance of samples", "ratio", (0, 1),
                                      0.025, line=MEMORIZATION_THRESHOLD),
            [(common.image_file(common.read_image(previews[-1][1])), names[r])
             for r in run_ids if (previews := ctx.jobs.run(r).previews())])


def alike_configs(ctx: common.AppContext, run_ids: list[str], count: int, use_ema: bool) -> dict[str, EvalConfig]:
    """One evaluation setting for all the runs: these samples and weights, and one mirror
    setting (compared with mirrored training images when any run saw them)."""
    mirrored = any(flips_in_training(ctx.jobs.run(r).config) for r in run_ids)
    configs = {}
    for run_id in run_ids:
        configs[run_id] = api.evaluation_config(ctx, run_id, count, EvalConfig.steps)
        configs[run_id].use_ema, configs[run_id].flip_aware = bool(use_ema), mirrored
    return configs


def made_with(summary: dict, config: EvalConfig) -> bool:
    """Whether a saved evaluation was made with these settings and measured quality."""
    wanted = {"weights": "ema" if config.use_ema else "model", "num_samples": config.num_samples,
              "sampler": config.sampler, "steps": config.steps, "seed": config.seed, "flip_aware": config.flip_aware}
    return all(summary.get(k) == v for k, v in wanted.items()) and bool((summary.get("quality") or {}).get("measure"))


def quality_points(ctx: common.AppContext, run_ids: list[str], configs: dict[str, EvalConfig], owner: str,
                   progress=None) -> dict[str, list[dict]]:
    """Each run's evaluations made with its config, at every kept checkpoint and at any earlier
    step evaluated alike: saved ones are reused, the kept checkpoints not evaluated yet are
    evaluated now (through the server's evaluation gate)."""
    points, todo = {}, []
    for run_id in run_ids:
        run = ctx.jobs.run(run_id)
        found = {}
        for name in run.eval_names():  # newest first: the newest evaluation of each step counts
            summary = load_eval(run, name).summary
            if made_with(summary, configs[run_id]):
                found.setdefault(summary["checkpoint_step"], summary)
        points[run_id] = found
        todo += [(run_id, checkpoint_step(c)) for c in run.checkpoints() if checkpoint_step(c) not in found]
    for i, (run_id, step) in enumerate(todo):
        if progress is not None:
            progress(i / len(todo), desc=f"evaluating {ctx.jobs.run(run_id).config.name} at step {step}")
        points[run_id][step] = api.run_evaluation(ctx, run_id, configs[run_id], owner, step=step).summary
    return {run_id: [found[step] for step in sorted(found)] for run_id, found in points.items()}


EQUAL_COLUMNS = ["run", "eval step", "weights", "samples", "copies", "95% interval", "quality", "matched quality"]


def equal_quality_view(names: dict[str, str], points: dict[str, list[dict]]) -> tuple[pd.DataFrame, str]:
    """Each run at its evaluated checkpoint nearest a common quality, the best the worst run
    reaches: a table (copies with their evidence) and what it means, said plainly when no
    matched quality exists."""
    rows = [{"run": names[r], "step": s["checkpoint_step"], "value": s["quality"]["value"], "low": s["quality"]["low"],
             "high": s["quality"]["high"], "summary": s}
            for r, found in points.items() for s in found if (s.get("quality") or {}).get("measure")]
    empty = pd.DataFrame(columns=EQUAL_COLUMNS)
    unmeasured = [names[r] for r, found in points.items() if not any(row["run"] == names[r] for row in rows)]
    if unmeasured:
        return empty, (f"⚠ No quality figure for {', '.join(unmeasured)} (text-to-image runs have none yet, or no "
                       "checkpoint is left to evaluate): there is no quality to match.")
    measures = {(row["summary"]["quality"]["measure"], row["summary"]["quality"]["reference"]) for row in rows}
    if len(measures) > 1:
        listed = "; ".join(f"{m} against {ref}" for m, ref in sorted(measures))
        return empty, f"⚠ The runs' quality is measured differently ({listed}): there is no common quality to match."
    picks, target = quality.equal_quality(pd.DataFrame(rows))
    measure = target["summary"]["quality"]["measure"]
    lines = [f"**Target: {measure} {target['value']:.2f} (95% interval {target['low']:.2f}–{target['high']:.2f})**, "
             f"the best quality {target['run']} reaches (step {target['step']}); each run at its evaluated checkpoint "
             "nearest to it. Lower is better."]
    table = []
    for pick in picks.to_dict("records"):
        warnings = evaluation_warnings(pick["summary"])
        matched = "yes" if pick["matched"] else f"no: {pick['side']}"
        table.append({"run": pick["run"], **share_cells(pick["summary"], bool(warnings) or not pick["matched"]),
                      "quality": f"{pick['value']:.2f} ({pick['low']:.2f}–{pick['high']:.2f})", "matched quality": matched})
        if pick["always_better"]:
            lines.append(f"⚠ No matched quality for {pick['run']}: it is better than {target['run']} at every evaluated "
                         f"checkpoint, so {target['run']} never reaches its quality. Evaluate earlier checkpoints of "
                         f"{pick['run']} (keep more with train.keep_checkpoints) or train {target['run']} longer.")
        elif not pick["matched"]:
            lines.append(f"⚠ No matched quality for {pick['run']}: its evaluated checkpoints jump past the target "
                         f"(nearest: step {pick['step']}, {pick['value']:.2f}). Keep more checkpoints "
                         "(train.keep_checkpoints) to evaluate the steps in between.")
        lines += [f"⚠ {pick['run']}: {warning}." for warning in warnings]
    return pd.DataFrame(table, columns=EQUAL_COLUMNS), "  \n".join(lines)


def build(ctx: common.AppContext, page: gr.Blocks) -> None:
    common.page_header("Compare runs", "Pick two or more runs, e.g. the baseline and IET-AGC demo runs on the same "
                       "data, and evaluate them the same way: the same checkpoint step, the same weights, the same "
                       "number of samples. A copy share means little without its quality: a model that has not "
                       "learned yet makes noise, and noise copies nothing.")
    common.glossary("copy", "EMA", "FID / feature FD", "λ")
    session = common.session_state(ctx)
    with gr.Row(equal_height=False):
        picker = gr.Dropdown(choices=[], multiselect=True, label="Runs to compare", scale=8, elem_id="compare-picker")
        refresh = gr.Button("↻ Refresh", scale=0, min_width=110, size="sm")
    with gr.Row():
        num_samples = gr.Slider(8, 1024, value=64, step=8, label="Samples per run", scale=2)
        weights = gr.Radio([("raw (averaged) weights", False), ("EMA weights", True)], value=False,
                           label="Weights", info="EMA lags behind the raw weights early in training.", scale=2)
        evaluate_all = gr.Button("Evaluate all the same way", variant="primary", scale=1, elem_id="evaluate-all")
        at_equal_quality = gr.Button("Compare at equal quality", scale=1, elem_id="equal-quality")
    table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), label="Memorization and quality", interactive=False,
                         wrap=False, elem_id="compare-table")
    notes = gr.Markdown(elem_id="compare-notes")
    with gr.Accordion("At equal quality", open=False) as equal_section:
        gr.Markdown("<span class='explain'>A run that copies less may only be further from the data. Here every kept "
                    "checkpoint of each run is evaluated the same way (saved evaluations are reused), and each run is "
                    "shown at the checkpoint whose quality is nearest the best quality the worst run reaches.</span>")
        equal_notes = gr.Markdown(elem_id="equal-quality-notes")
        equal_table = gr.Dataframe(pd.DataFrame(columns=EQUAL_COLUMNS), label="Memorization at equal quality",
                                   interactive=False, wrap=False, elem_id="equal-quality-table")
    gr.Markdown("<span class='explain'>**copies**: share of generated samples whose nearest training image is less "
                "than a third as far as the second nearest (lower is better), with the number of samples and a 95% "
                "interval: with 64 samples, gaps under ~15 points are noise · **eval step**: the checkpoint "
                "evaluated · **quality**: FID, or the offline feature FD against held-out images (pixel FD where "
                "none are held out), lower is better, with its 95% interval · **skipped**: share of "
                "training visits AGC skipped.</span>")
    with gr.Row():
        loss_plot = gr.Plot(show_label=False)
        kept_plot = gr.Plot(show_label=False)
    with gr.Row():
        ratio_plot = gr.Plot(show_label=False)
        memo_plot = gr.Plot(show_label=False)
    samples = gr.Gallery(label="Samples after the last round of each run: the quality side of the comparison",
                         columns=4, height=320, fit_columns=False)
    outputs = [table, notes, loss_plot, kept_plot, ratio_plot, memo_plot, samples]

    def fill(current=None):
        choices = common.run_choices(ctx)
        ids = [c[1] for c in choices]
        kept = [r for r in (current or []) if r in ids]
        if not kept:  # the two newest finished runs: usually the demo's baseline and IET-AGC
            kept = [r["run_id"] for r in ctx.jobs.list_runs() if r["state"] == "finished"][:2]
        return gr.update(choices=choices, value=kept)

    page.load(fill, None, picker, api_visibility="private")
    refresh.click(fill, picker, picker, api_visibility="private")
    picker.change(lambda run_ids: compare_view(ctx, run_ids or []), picker, outputs, api_visibility="private")

    @common.user_errors
    def evaluate_alike(run_ids, count, use_ema, session, progress=gr.Progress()):
        if not run_ids:
            raise gr.Error("Pick runs to compare first.", print_exception=False)
        for i, (run_id, config) in enumerate(alike_configs(ctx, run_ids, count, use_ema).items()):
            progress(i / len(run_ids), desc=f"evaluating {ctx.jobs.run(run_id).config.name}")
            api.run_evaluation(ctx, run_id, config, common.ensure_owner(session)["owner"])
        return compare_view(ctx, run_ids)

    @common.user_errors
    def compare_at_equal_quality(run_ids, count, use_ema, session, progress=gr.Progress()):
        if not run_ids or len(run_ids) < 2:
            raise gr.Error("Pick two or more runs to compare first.", print_exception=False)
        found = quality_points(ctx, run_ids, alike_configs(ctx, run_ids, count, use_ema),
                               common.ensure_owner(session)["owner"], progress)
        frame, text = equal_quality_view({r: run_name(ctx, r) for r in run_ids}, found)
        return frame, text, gr.update(open=True)

    evaluate_all.click(evaluate_alike, [picker, num_samples, weights, session], outputs,
                       concurrency_limit=ctx.evaluations.capacity, concurrency_id=api.EVAL_CONCURRENCY,
                       api_visibility="private")
    at_equal_quality.click(compare_at_equal_quality, [picker, num_samples, weights, session],
                           [equal_table, equal_notes, equal_section], concurrency_limit=ctx.evaluations.capacity,
                           concurrency_id=api.EVAL_CONCURRENCY, api_visibility="private")

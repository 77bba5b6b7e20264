"""4 · Memorization: generate samples from a run and put each next to its nearest training
image; the share of copies, MQ, FID when available, and the most-copied training images with
their skip history from training."""
from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from iet_core.config import MEMORIZATION_THRESHOLD, ConfigError
from iet_core.evaluate import COPY_DETECTION, evaluation_warnings, list_evals, load_eval
from iet_core.metrics import proportion_interval
from iet_core.quality import quality_text
from pages import api, charts, common

TITLE, PATH = "4 · Memorization", "memorization"
PAIRS_SHOWN = 48
POLL_SECONDS = 3.0
COPIED_COLUMNS = ("training_id", "times_nearest", "times_memorized", "shard", "visits", "skips", "skip_rate")
PRESENTED = 6  # pairs in the presentation view: big enough to read from the back of a room


def share_line(summary: dict) -> str:
    """A memorized share with everything needed to judge it: count of samples, 95% interval,
    checkpoint step, weights, and a quality figure. Text-to-image runs: the share of
    generations above the copy similarity, and the feature space it was measured in."""
    if summary.get("kind") == COPY_DETECTION:
        count, total = summary["copy_count"], summary["num_samples"]
        share = (f"copies · Similarity above {summary['copy_threshold']:g} to the nearest training image: {count} of "
                 f"{total} generations from {summary['num_captions']} training captions")
        measure = f" · guidance {summary.get('guidance_scale', '?')}  \nMeasured with **{summary['measure']}**"
    else:
        count, total = summary["memorized_count"], summary["num_samples"]
        share, measure = f"copies: {count} of {total} samples", ""
    low, high = proportion_interval(count, total)
    return (f"<span class='big-number'>{100 * count / total:.0f}%</span> {share} (95% interval "
            f"{100 * low:.0f}–{100 * high:.0f}%) · {provenance(summary)} · {quality_text(summary)}{measure}"
            + "".join(f"  \n⚠ **{warning}**" for warning in evaluation_warnings(summary)))


def provenance(summary: dict) -> str:
    """Which model made the samples: "step 2000, EMA weights"."""
    weights = {"ema": "EMA weights", "model": "raw weights"}.get(summary.get("weights"), "weights ?")
    step = summary.get("checkpoint_step")
    return f"step {step if step is not None else '?'}, {weights}"


def summary_markdown(summary: dict) -> str:
    mq = summary.get("mq_shares", {})
    mq_low = next(iter(mq.items()), None)
    lines = [
        share_line(summary),
        f"A copy: nearest / second-nearest training image distance < {summary['memorization_threshold']:.2f}"
        + (f" · MQ share below {mq_low[0]}: **{100 * mq_low[1]:.0f}%**" if mq_low else "") +
        f" · {summary['distinct_nearest']} different training images are nearest to some sample",
        f"Checkpoint `{summary.get('checkpoint', '?')}` · {summary.get('sampler', '')} {summary.get('steps', '')} steps"
        f"{' · compared with mirrored training images too' if summary.get('flip_aware') else ''}",
    ]
    if summary.get("kind") == COPY_DETECTION:  # a text-to-image run: the distance ratio in the same feature space
        low, high = proportion_interval(summary["memorized_count"], summary["num_samples"])
        lines[1] = (f"Distance ratio nearest / second nearest below {summary['memorization_threshold']:.2f} in that "
                    f"space: {summary['memorized_count']} of {summary['num_samples']} (95% interval "
                    f"{100 * low:.0f}–{100 * high:.0f}%) · {summary['distinct_nearest']} different training images "
                    "are nearest to some generation")
        if summary.get("clip_score") is not None:
            lines.append(f"CLIP score {summary['clip_score']:.2f} (95% interval {summary['clip_score_low']:.2f}–"
                         f"{summary['clip_score_high']:.2f}, {summary['clip_score_count']} generations; their captions' "
                         f"training images: {summary['clip_score_training']:.2f})")
        elif summary.get("clip_message"):
            lines.append(f"<span class='explain'>CLIP score: {summary['clip_message']}</span>")
    if summary.get("fid_message"):
        lines.append(f"<span class='explain'>{summary['fid_message']}</span>")
    return "  \n".join(lines)


def mq_markdown(summary: dict) -> str:
    """The share of samples whose MQ ratio is below each threshold, as a two-row table."""
    shares = summary.get("mq_shares", {})
    if not shares:
        return ""
    rows = "\n".join(f"| {threshold} | {100 * share:.0f}% |" for threshold, share in shares.items())
    return ("**MQ**, the reference code's metric: share of samples whose squared distance to the nearest training "
            "image, over the mean of the 50 nearest, is below each threshold.\n\n"
            f"| MQ below | samples |\n|---|---|\n{rows}")


def pair_gallery(result, limit: int) -> list[tuple]:
    """(sample | nearest) images with short captions, most copied first (the order of `pairs`)."""
    rows = result.table.sort_values(["memorization_ratio", "sample_id"]).head(limit)
    captions = [verdict(row, short=True) for row in rows.itertuples()]
    return [(common.image_file(common.display_image(image, 80)), caption)
            for (image, _), caption in zip(result.pairs(limit), captions)]


def verdict(row, short: bool = False) -> str:
    """A pair's figure and whether it counts as a copy: the similarity for text-to-image runs
    (with the prompt in short form), the distance ratio otherwise."""
    if hasattr(row, "similarity"):
        copy = " copy" if row.copy else ""
        return (f"{row.caption[:60]} · sim {row.similarity:.2f}{copy}" if short
                else f"similarity {row.similarity:.2f} · {'copy' if row.copy else 'not a copy'}")
    copy = " copy" if row.memorized else ""
    return f"{row.memorization_ratio:.2f}{copy}" if short else f"ratio {row.memorization_ratio:.2f} · {'copy' if row.memorized else 'not a copy'}"


def presentation_html(result, limit: int = PRESENTED) -> str:
    """The most copied samples as large, uncropped side-by-side pairs for a projector: the
    generated image on the left, its nearest training image on the right, with the distance ratio."""
    rows = result.table.sort_values(["memorization_ratio", "sample_id"]).head(limit)
    figures = []
    for (image, _), row in zip(result.pairs(limit), rows.itertuples()):
        prompt = (f"<div style='text-align:center;font-size:1.2em'>“{html.escape(row.caption[:120])}”</div>"
                  if hasattr(row, "caption") else "")
        figures.append(
            f"<figure class='copy-pair' style='margin:0'>"
            f"<img src='{common.data_uri(image)}' alt='generated sample {row.sample_id} next to training image "
            f"{row.nearest_id}' style='width:100%;height:auto;image-rendering:pixelated;display:block'>"
            "<figcaption style='display:flex;font-size:1.3em'><span style='flex:1;text-align:center'>generated</span>"
            "<span style='flex:1;text-align:center'>nearest training image</span></figcaption>"
            f"{prompt}<div style='text-align:center;font-size:1.5em;font-weight:600'>{verdict(row)}</div></figure>")
    return ("<div id='presentation' style='display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:28px'>"
            + "".join(figures) + "</div>")


def copied_table(most_copied: pd.DataFrame, limit: int = 20) -> pd.DataFrame:
    columns = [c for c in COPIED_COLUMNS if c in most_copied]
    top = most_copied[most_copied["times_nearest"] > 0].head(limit)[columns]
    return top.round({"skip_rate": 3})


def result_view(ctx: common.AppContext, run_id: str, result) -> tuple:
    """The page's outputs for an evaluation: summary, presentation, histogram, MQ table, pairs,
    most-copied gallery and table."""
    most = copied_table(result.most_copied)
    captions = [f"×{n}" for n in most.head(12)["times_nearest"]]
    return (summary_markdown(result.summary), presentation_html(result),
            charts.memorization_histogram(result.table["memorization_ratio"].to_numpy(),
                                          result.summary["memorization_threshold"]),
            mq_markdown(result.summary), pair_gallery(result, PAIRS_SHOWN),
            common.training_images(ctx, run_id, most.head(12)["training_id"], captions), most)


def newest_eval(ctx: common.AppContext, run_id: str) -> str:
    """The name of the run's newest saved evaluation ("" when none, or the run is gone)."""
    try:
        names = list_evals(ctx.jobs.run(run_id))
    except ConfigError:
        return ""
    return names[0] if names else ""


def saved_view(ctx: common.AppContext, run_id: str) -> tuple:
    """The run's newest saved evaluation, or a note that there is none."""
    try:
        return result_view(ctx, run_id, load_eval(ctx.jobs.run(run_id)))
    except ConfigError:
        return ("No evaluation of this run yet: press *Generate and measure*.", "",
                charts.memorization_histogram([], MEMORIZATION_THRESHOLD), "", [], [],
                pd.DataFrame(columns=COPIED_COLUMNS))


def build(ctx: common.AppContext, page: gr.Blocks) -> None:
    session = common.session_state(ctx)
    common.page_header("Is the model copying?", "Generate samples and find each one's nearest training image. A "
                       "sample much closer to its nearest training image than to the second nearest (ratio below "
                       "a third) is counted as a **copy**. Pairs are sorted most-copied first.")
    common.glossary("copy", "MQ", "EMA", "FID / feature FD")
    picker, refresh_list = common.run_picker()
    with gr.Row():
        num_samples = gr.Slider(8, 1024, value=64, step=8, label="Samples to generate",
                                info="64 takes seconds on a CPU for the tiny model; papers use 10,000.")
        steps = gr.Slider(10, 250, value=50, step=10, label="DDIM sampling steps")
        weights = gr.Radio([("raw (averaged)", False), ("EMA", True)], value=False, label="Weights",
                           info="EMA lags behind the raw weights early in training.")
        fid = gr.Checkbox(False, label="Compute FID (needs the Inception weights file in the torch cache)")
        evaluate = gr.Button("Generate and measure", variant="primary", elem_id="evaluate")
    summary = gr.Markdown("Pick a run and press *Generate and measure*. Saved results open automatically.",
                          elem_id="memorization-summary")
    gr.Markdown("### The top copies\nEach generated sample (left) next to the training image nearest to it "
                "(right), the closest copies first. The ratio is the distance to the nearest training image over the "
                "distance to the second nearest: below a third, the sample is counted as a copy.")
    presentation = gr.HTML(elem_id="presentation-view")
    with gr.Row():
        histogram = gr.Plot(show_label=False, scale=1)
        with gr.Column(scale=1):
            mq = gr.Markdown()
    pairs = gr.Gallery(fit_columns=False, label="All pairs: each sample (left) next to its nearest training image "
                       "(right), most copied first; caption: distance ratio (text-to-image: the prompt and the similarity)", columns=6, height=520,
                       object_fit="contain", elem_id="pairs")
    gr.Markdown("### Most copied training images and their skip history\nHow often each training image is the "
                "nearest to a sample, next to how often AGC skipped it during training: are the images the model "
                "copies the ones AGC flagged as too easy?")
    with gr.Row():
        copied_gallery = gr.Gallery(fit_columns=False, label="Most copied (× times nearest to a sample)", columns=5,
                                    height=300, allow_preview=False, scale=1)
        copied = gr.Dataframe(pd.DataFrame(columns=COPIED_COLUMNS), label="Most copied training images",
                              interactive=False, max_height=300, scale=1)
    with gr.Row():
        export_table = gr.Button("Download the evaluation table (.csv)", scale=0, min_width=300)
        download = gr.File(label="Download", interactive=False, visible=False)

    shown = gr.State("")  # the evaluation on the page: a newer one (e.g. made when training ended) replaces it
    timer = gr.Timer(POLL_SECONDS)

    def load_saved(run_id):
        if not run_id:
            return [gr.skip()] * 8
        return [*saved_view(ctx, run_id), newest_eval(ctx, run_id)]

    def check_new(run_id, current):
        if not run_id or newest_eval(ctx, run_id) == current:
            return [gr.skip()] * 8
        return load_saved(run_id)

    outputs = [summary, presentation, histogram, mq, pairs, copied_gallery, copied]
    picker.change(load_saved, picker, [*outputs, shown], api_visibility="private")
    timer.tick(check_new, [picker, shown], [*outputs, shown], concurrency_limit=None, show_progress="hidden",
               api_visibility="private", trigger_mode="always_last")

    @common.user_errors
    def run_evaluation(run_id, count, sampling_steps, use_ema, with_fid, session, progress=gr.Progress()):
        if not run_id:
            raise gr.Error("Pick a run first.", print_exception=False)
        config = api.evaluation_config(ctx, run_id, count, sampling_steps)
        config.fid, config.use_ema = bool(with_fid), bool(use_ema)
        result = api.run_evaluation(ctx, run_id, config, common.ensure_owner(session)["owner"],
                                    progress=lambda stage, done, total: progress(done / max(total, 1), desc=stage))
        return [*result_view(ctx, run_id, result), result.path.name]

    evaluate.click(run_evaluation, [picker, num_samples, steps, weights, fid, session], [*outputs, shown],
                   concurrency_limit=ctx.evaluations.capacity, concurrency_id=api.EVAL_CONCURRENCY,
                   api_visibility="private")

    @common.user_errors
    def table_csv(run_id):
        if not run_id:
            raise gr.Error("Pick a run first.", print_exception=False)
        result = load_eval(ctx.jobs.run(run_id))
        target = common.download_dir(run_id) / f"{run_id}-{result.path.name}-table.csv"
        result.table.to_csv(target, index=False)
        return gr.update(value=str(target), visible=True)

    export_table.click(table_csv, picker, download, api_visibility="private", **common.DOWNLOADS)
    common.wire_run_picker(ctx, page, picker, refresh_list, session)

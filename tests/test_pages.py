"""The pages' view functions without a browser: real tiny runs in a real job manager, the
values each page would show."""
from __future__ import annotations

import base64
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from iet_core.config import EvalConfig, RunConfig
from iet_core.evaluate import evaluate_run
from iet_core.jobs import JobManager
from iet_core.runs import checkpoint_step
from pages import common, compare, memorization, monitor

ME = "owner-me-123456"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    context = common.AppContext.create(root, JobManager(root))
    yield context
    context.jobs.shutdown(timeout=60)


def short_schedule(config):
    """Few noise levels, so the memory bank has seen each one within a few steps (ratios exist)."""
    config.model.num_train_timesteps = 20
    return config


@pytest.fixture(scope="module")
def baseline(ctx):
    run_id = ctx.jobs.submit(short_schedule(tiny_config("ddpm")), ME)
    assert ctx.jobs.wait(run_id, 120) == "finished"
    return run_id


@pytest.fixture(scope="module")
def agc_run(ctx):
    run_id = ctx.jobs.submit(short_schedule(tiny_config("iet-agc", rounds=3)), ME)
    assert ctx.jobs.wait(run_id, 120) == "finished"
    return run_id


def test_a_finished_baseline_offers_only_delete_and_says_nothing_is_skipped(ctx, baseline):
    status_line, controls = monitor.status_view(ctx, baseline)
    assert "finished" in status_line
    assert controls == {"pause": False, "resume": False, "stop": False, "delete": True, "apply": False}
    view = monitor.histogram_view(ctx.jobs.history(baseline), ctx.jobs.run(baseline).config, 100, False, 0.4)
    assert "without AGC" in view.text and "0.40" in view.text
    names = [trace.name for trace in view.figure.data]
    assert "would be skipped with AGC (this run skips nothing)" in names and not any("skipped (ratio" in n for n in names)


def test_the_histogram_is_coloured_at_the_what_if_lambda(ctx, agc_run):
    history, config = ctx.jobs.history(agc_run), ctx.jobs.run(agc_run).config
    applied = monitor.current_lambda(history, config)
    in_force = monitor.histogram_view(history, config, 100, False, applied)
    higher = monitor.histogram_view(history, config, 100, False, 0.9)
    assert [t.name for t in in_force.figure.data][-1] == "skipped (ratio < λ)"
    assert [t.name for t in higher.figure.data][-1] == "would be skipped at the what-if λ"
    below = lambda figure: float(np.sum(figure.data[-1].y))  # the share drawn left of the what-if line
    assert below(higher.figure) >= below(in_force.figure)
    share = lambda text: float(re.search(r"([\d.]+)%</span>", text).group(1))
    assert share(higher.text) >= share(in_force.text)


def test_a_tick_redraws_only_what_changed(ctx, agc_run):
    first = monitor.tick(ctx, agc_run, 100, True, 0.5, {})
    assert {"status", "loss", "histogram", "what_if_text", "shards", "skipped"} <= set(first)
    again = monitor.tick(ctx, agc_run, 100, True, 0.5, first["view"])
    assert set(again) == {"status", "controls", "shorter", "view"}  # the same store: nothing is drawn again
    moved = monitor.tick(ctx, agc_run, 100, True, 0.6, first["view"])
    assert "histogram" in moved and "skipped" not in moved  # a gallery is resent only when it changes


def test_config_with_lambda_is_a_valid_config_at_that_lambda(ctx, agc_run):
    text = monitor.config_with_lambda(ctx.jobs.run(agc_run).config, 0.37)
    block = re.search(r"```json\n(.*?)\n```", text, re.S).group(1)
    config = RunConfig.from_json(block)
    assert config.method.agc.skip_lambda == pytest.approx(0.37)
    assert f"--config {config.name}.json" in text


def test_the_presentation_view_shows_whole_pairs_with_labels(ctx, agc_run):
    result = evaluate_run(ctx.jobs.run(agc_run), EvalConfig(num_samples=8, steps=5))
    html = memorization.presentation_html(result)
    sources = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(sources) == memorization.PRESENTED
    for source in sources:
        with Image.open(io.BytesIO(base64.b64decode(source))) as image:
            width, height = image.size
        assert width >= 2 * height  # generated | nearest, side by side
    assert html.count("nearest training image") == memorization.PRESENTED and "ratio " in html
    line = memorization.share_line(result.summary)
    assert re.search(r"\d+ of 8 samples \(95% interval \d+–\d+%\)", line)
    assert "step" in line and "weights" in line


def test_image_files_are_written_once_and_never_replaced(tmp_path):
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    path = common.image_file(image)
    stamp = (Image.open(path).size, os.stat(path).st_mtime_ns)
    assert common.image_file(image.copy()) == path
    assert (Image.open(path).size, os.stat(path).st_mtime_ns) == stamp
    assert common.image_file(image[::-1].copy()) != path


def test_an_upload_is_named_after_its_files_and_shown_without_server_paths(tmp_path):
    from iet_core.config import DataConfig
    from pages import data

    for i in range(10):
        Image.new("L", (12, 12), 20 * i).save(tmp_path / f"cat {i}.png")
    config, rejected = data.persist_upload([str(tmp_path / f"cat {i}.png") for i in range(10)], tmp_path / "runs", 16, 1)
    path = config.source
    assert not rejected and re.fullmatch(r"cat-0-and-9-more-16px-1ch-[0-9a-f]{8}\.npz", os.path.basename(path))
    assert config.caption_column is None and config.channels == 1
    label = data.source_label(DataConfig(source=path, resolution=16, channels=1))
    assert label == f"uploaded: {os.path.basename(path)}" and str(tmp_path) not in label


def test_compare_shows_each_share_with_its_evidence_and_flags_unlike_evaluations(ctx, baseline, agc_run):
    evaluate_run(ctx.jobs.run(baseline), EvalConfig(num_samples=8, steps=5, use_ema=True))
    evaluate_run(ctx.jobs.run(agc_run), EvalConfig(num_samples=16, steps=5, use_ema=False))
    table, notes, *_, memorized, _ = compare.compare_view(ctx, [baseline, agc_run])
    rows = table.to_dict("records")
    assert all(re.search(r" · step \d+, feature FD \d+\.\d\d$", trace.name) for trace in memorized.data)
    assert [r["samples"] for r in rows] == [8, 16] and [r["weights"] for r in rows] == ["EMA", "raw"]
    assert all(re.fullmatch(r"\d+–\d+%", r["95% interval"]) for r in rows)
    assert "different weights" in notes and "different sample counts" in notes and "training steps" in notes
    # A few steps of training make noise: no copy share reads as a result, and each has its quality.
    assert all(r["copies"].startswith("⚠ means nothing yet: ") for r in rows)
    assert "samples are still noise at step" in notes and "copies here means nothing yet" in notes
    assert all(r["quality"].startswith("feature FD ") and "500 held-out images" in r["quality"] for r in rows)
    evaluate_run(ctx.jobs.run(baseline), EvalConfig(num_samples=16, steps=5, use_ema=False))
    _, notes, *_ = compare.compare_view(ctx, [baseline, agc_run])
    assert "weights" not in notes and "sample counts" not in notes


def test_compare_at_equal_quality_evaluates_each_kept_checkpoint_once_and_matches_quality(ctx, baseline, agc_run):
    ids = [baseline, agc_run]
    configs = compare.alike_configs(ctx, ids, 8, False)
    for config in configs.values():
        config.steps = 5
    points = compare.quality_points(ctx, ids, configs, ME)
    for run_id in ids:
        kept = [checkpoint_step(c) for c in ctx.jobs.run(run_id).checkpoints()]
        assert set(kept) <= {s["checkpoint_step"] for s in points[run_id]}
        assert all(compare.made_with(s, configs[run_id]) for s in points[run_id])
    saved = [len(ctx.jobs.run(r).eval_names()) for r in ids]
    assert compare.quality_points(ctx, ids, configs, ME) == points  # saved evaluations are reused
    assert [len(ctx.jobs.run(r).eval_names()) for r in ids] == saved
    names = {r: compare.run_name(ctx, r) for r in ids}
    table, text = compare.equal_quality_view(names, points)
    target = max(min(s["quality"]["value"] for s in points[r]) for r in ids)
    assert text.startswith(f"**Target: feature FD {target:.2f}")
    for row, run_id in zip(table.to_dict("records"), ids):
        nearest = min(points[run_id], key=lambda s: abs(s["quality"]["value"] - target))
        assert row["eval step"] == nearest["checkpoint_step"] and row["samples"] == 8 and row["weights"] == "raw"
        assert row["quality"].startswith(f"{nearest['quality']['value']:.2f} (") and re.fullmatch(r"\d+–\d+%", row["95% interval"])
    # A run better at every step than the other ever gets: no matched quality, said plainly.
    better = [{**s, "quality": {**s["quality"], "value": target / 100, "low": target / 200, "high": target / 50}}
              for s in points[agc_run]]
    table, text = compare.equal_quality_view(names, {baseline: points[baseline], agc_run: better})
    assert f"No matched quality for {names[agc_run]}: it is better than {names[baseline]} at every evaluated checkpoint" in text
    assert table.set_index("run").loc[names[agc_run], "matched quality"] == "no: better"


def test_compare_warns_when_one_runs_quality_is_far_worse_than_anothers():
    def summary(value, low, high):
        return {"memorized_fraction": 0.0, "checkpoint_step": 500, "quality": {
            "measure": "feature FD", "reference": "500 held-out images", "value": value, "low": low, "high": high}}
    warnings = compare.run_warnings(["base", "agc", "close"], [summary(2.0, 1.5, 2.5), summary(9.0, 8.0, 10.0),
                                                               summary(3.0, 2.4, 3.6)])
    assert warnings == {"agc": ["its samples are far worse than base's (feature FD 9.00 against 2.00): its copy share "
                                "is not comparable with theirs"]}


def test_the_monitor_draws_the_proxies_drift_per_round(ctx, agc_run):
    drift = monitor.tick(ctx, agc_run, 100, True, 0.5, {})["drift"]
    rows = ctx.jobs.history(agc_run).drift()
    assert len(rows) == 3 * 2  # three rounds, two proxies
    moved = next(trace for trace in drift.data if trace.name == "from the other proxies")
    expected = 100 * rows.groupby("round").distance_to_others.mean() / rows.groupby("round").start_norm.mean()
    np.testing.assert_allclose(moved.y, expected.to_numpy())
    assert {"own shard", "other shards", "averaged model"} <= {trace.name for trace in drift.data}


def test_a_gpu_preset_warns_on_a_cpu_and_on_data_it_was_not_made_for():
    from iet_core.config import DataConfig
    from pages import train

    grey16 = DataConfig(source="digits", resolution=16, channels=1)
    note = train.preset_note("gpu-small", grey16, "cpu")
    assert "no GPU" in note and "32×32 colour" in note and "16×16 greyscale" in note
    assert train.preset_note("gpu-small", DataConfig(source="digits", resolution=32, channels=3), "cuda") == ""
    assert train.preset_note("classroom", grey16, "cpu") == ""

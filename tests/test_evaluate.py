import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import tiny_config
from iet_core import ConfigError, EvalConfig, ImageDataset, Run, train
from iet_core.cli import main
from iet_core.config import ModelConfig
from iet_core.metrics import proportion_interval
from iet_core.evaluate import evaluate_images, evaluate_run, evaluation_warnings, list_evals, load_eval, save_eval
from iet_core.runs import checkpoint_step
from iet_core.models import build_unet, training_scheduler
from iet_core.sample import generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real run: two rounds of the tiny model on 12 8x8 digits, trained with flips (a
    checkpoint after each round)."""
    return train(tiny_config("iet-agc", rounds=2, hflip=True), runs_root=tmp_path_factory.mktemp("runs"))


def small_dataset() -> ImageDataset:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (12, 1, 8, 8), dtype=np.uint8))
    return ImageDataset(images, None, torch.arange(12) * 10, "random")


def test_generation_is_seeded_per_batch_with_either_sampler():
    torch.manual_seed(0)
    unet, scheduler = build_unet(ModelConfig(), 8, 1), training_scheduler(ModelConfig())
    calls = []
    ddim = generate(unet, scheduler, 5, steps=3, seed=4, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert ddim.dtype == torch.uint8 and ddim.shape == (5, 1, 8, 8) and calls == [(2, 5), (4, 5), (5, 5)]
    # Batch b starts from seed + b: a different batch size gives the same first batch.
    np.testing.assert_array_equal(generate(unet, scheduler, 2, steps=3, seed=4, batch_size=2), ddim[:2])
    ddpm = generate(unet, scheduler, 2, sampler="ddpm", steps=4, seed=4)
    np.testing.assert_array_equal(ddpm, generate(unet, scheduler, 2, sampler="ddpm", steps=4, seed=4))
    assert not torch.equal(ddpm, ddim[:2])
    with pytest.raises(ConfigError, match="sampler"):
        generate(unet, scheduler, 1, sampler="euler")
    with pytest.raises(ConfigError, match="between 1 and 1000"):
        generate(unet, scheduler, 1, steps=2000)


def test_per_sample_table_pairs_and_most_copied():
    data = small_dataset()
    generated = torch.cat([data.images[[2, 2, 5]], data.images[[7]].flip(-1), torch.full((1, 1, 8, 8), 128, dtype=torch.uint8)])
    per_sample = pd.DataFrame({"sample_id": data.ids.numpy(), "visits": np.arange(12), "skips": np.arange(12) // 2,
                               "skip_rate": np.full(12, 0.5)})
    result = evaluate_images(generated, data, flip_aware=True, per_sample=per_sample)
    table = result.table
    assert list(table["nearest_id"][:4]) == [20, 20, 50, 70]
    assert list(table["memorized"]) == [True, True, True, True, False]
    assert table.loc[3, "nearest_flipped"] and not table.loc[:2, "nearest_flipped"].any()
    # The nearest image is shown as matched: a mirrored copy's pair is two equal images.
    np.testing.assert_array_equal(result.nearest[:4], result.generated[:4])
    top = result.most_copied.iloc[0]
    assert (top["training_id"], top["times_nearest"], top["times_memorized"], top["visits"]) == (20, 2, 2, 2)
    assert result.most_copied["times_nearest"].sum() == 5 and len(result.most_copied) == 12
    pairs = result.pairs(limit=3)
    assert len(pairs) == 3 and pairs[0][0].shape == (8, 17) and "memorized" in pairs[0][1]
    assert result.pairs()[-1][1].startswith("sample 4")  # the least memorized comes last


def test_saved_results_read_back(tmp_path):
    run = Run.create(tmp_path, tiny_config())
    result = evaluate_images(small_dataset().images[:4], small_dataset())
    folder = save_eval(run, result, "manual", gallery_pairs=4)
    assert {p.name for p in folder.iterdir()} == {"table.csv", "summary.json", "most_copied.csv", "images.npz", "gallery.png",
                                                  "gallery-distance.png", "gallery-mq.png"}
    loaded = load_eval(run)
    pd.testing.assert_frame_equal(loaded.table, result.table)
    assert loaded.summary == json.loads(json.dumps(result.summary))
    np.testing.assert_array_equal(loaded.nearest, result.nearest)
    assert list_evals(run) == ["manual"] and loaded.path == folder
    with pytest.raises(ConfigError, match="no evaluation 'other'"):
        load_eval(run, "other")
    with pytest.raises(ConfigError, match="plain name"):
        save_eval(run, result, "../escape")


def test_evaluate_run_samples_the_checkpoint_and_saves(trained_run):
    stages = set()
    result = evaluate_run(trained_run, EvalConfig(num_samples=6, steps=3, gallery_pairs=6),
                          progress=lambda stage, done, total: stages.add(stage))
    summary = result.summary
    assert summary["num_samples"] == 6 and summary["num_training"] == 12 and summary["steps"] == 3
    assert summary["flip_aware"] is True  # the run trained with flips
    assert summary["checkpoint_step"] == trained_run.status()["global_step"]
    assert stages == {"sampling", "neighbours"}
    quality = summary["quality"]  # a quality figure beside every copy share
    assert quality["measure"] == "feature FD" and quality["reference"] == "500 held-out images"
    assert quality["low"] <= quality["value"] <= quality["high"] and quality["num_samples"] == 6
    assert result.path.parent == trained_run.path / "eval" and (result.path / "gallery.png").exists()
    assert set(result.most_copied.columns) >= {"training_id", "times_nearest", "visits", "skips", "skip_rate"}
    # Same settings, same samples: generation is seeded.
    again = evaluate_run(trained_run, EvalConfig(num_samples=6, steps=3), save=False)
    np.testing.assert_array_equal(again.generated, result.generated)
    assert summary["weights"] == "model"  # the raw averaged weights by default, as the reference evaluated
    ema = evaluate_run(trained_run, EvalConfig(num_samples=6, steps=3, use_ema=True), save=False)
    assert ema.summary["weights"] == "ema" and not np.array_equal(ema.generated, result.generated)
    # 6 steps per proxy of an EMA with decay 0.995: almost all of it is still the random start.
    step = summary["checkpoint_step"]
    assert any(w.startswith(f"the EMA weights at step {step} have not caught up: 97% of them is still the random start")
               for w in evaluation_warnings(ema.summary))
    assert not any("EMA" in w for w in evaluation_warnings(summary))


def test_evaluate_cli_prints_the_summary(trained_run, tmp_path):
    """The installed console command, outside the repository, on an earlier kept checkpoint."""
    command = shutil.which("iet-core")
    assert command, "the package is not installed: pip install -r requirements-dev.txt -e ."
    first, latest = [checkpoint_step(p) for p in trained_run.checkpoints()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's code, wherever the package was installed from
    out = subprocess.run([command, "evaluate", str(trained_run.path), "--num-samples", "8", "--steps", "5", "--name",
                          "cli", "--step", str(first), "--threads", "1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "copies by ratio (L2 nearest / L2 second nearest < 0.333): " in out.stdout and "95% CI" in out.stdout
    assert "copies by distance" in out.stdout and "copies by mq" in out.stdout and "MQ share below" in out.stdout
    assert "quality: feature FD " in out.stdout and "8 samples vs 500 held-out images" in out.stdout
    summary = json.loads((trained_run.path / "eval" / "cli" / "summary.json").read_text())
    assert summary["num_samples"] == 8 and summary["steps"] == 5 and summary["checkpoint_step"] == first < latest
    missing = subprocess.run([command, "evaluate", str(trained_run.path), "--step", str(latest + 1)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and f"kept steps: {first}, {latest}" in missing.stderr


def test_evaluate_refuses_other_data_than_the_run_trained_on(trained_run):
    with pytest.raises(ConfigError, match="differs from the data this run was trained on"):
        evaluate_run(trained_run, EvalConfig(num_samples=2, steps=2), dataset=small_dataset())


def test_evaluate_needs_a_checkpoint_and_a_run_folder(tmp_path, capsys):
    run = Run.create(tmp_path / "runs", tiny_config())
    with pytest.raises(ConfigError, match="no checkpoint yet"):
        evaluate_run(run, EvalConfig(num_samples=2, steps=2))
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_three_named_copy_criteria_with_counts_intervals_and_galleries():
    """Flat grey 8x8 images: distances are known. delta is the 0.25 quantile of the training
    images' distances to their nearest other image; a sample halfway between two close training
    images is a copy by distance but not by ratio (nearest / second = 1)."""
    levels = [0, 4, 20, 40, 70, 100, 140, 190, 250]
    flat = lambda values: torch.tensor(values, dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 8, 8).contiguous()
    data = ImageDataset(flat(levels), None, torch.arange(len(levels)), "grey", resize_filter="box")
    generated = flat([250, 2, 121, 165])
    result = evaluate_images(generated, data, EvalConfig(distance_quantile=0.25, mq_threshold=0.15))
    gaps = np.array([4, 4, 16, 20, 30, 30, 40, 50, 60]) * 8 / 255  # each level's L2 to its nearest other level
    criteria = result.summary["criteria"]
    assert criteria["distance"]["delta"] == pytest.approx(np.quantile(gaps, 0.25))
    assert list(result.table["copy_distance"]) == [True, True, False, False]
    assert list(result.table["memorized"]) == [True, False, False, False]
    assert list(result.table["copy_mq"]) == list(result.table["mq_ratio"] < 0.15)
    for name, flags in (("ratio", [1, 0, 0, 0]), ("distance", [1, 1, 0, 0])):
        low, high = proportion_interval(sum(flags), 4)
        assert (criteria[name]["count"], criteria[name]["total"], criteria[name]["low"], criteria[name]["high"]) == (sum(flags), 4, low, high)
    assert result.summary["memorized_interval"] == [criteria["ratio"]["low"], criteria["ratio"]["high"]]
    assert result.summary["resize_filter"] == "box"
    # Each gallery is sorted by its own criterion's score.
    assert [caption.split()[1] for _, caption in result.pairs(criterion="distance")] == ["0", "1", "2", "3"]
    assert [caption.split()[1] for _, caption in result.pairs(criterion="ratio")] == ["0", "2", "1", "3"]
    with pytest.raises(ConfigError, match="criterion"):
        result.pairs(criterion="pixels")

import pandas as pd
import pytest

from helpers import tiny_config
from iet_core.config import ConfigError
from iet_core.experiments import Experiment, main, run_experiment
from iet_core.runs import list_runs


def test_runner_end_to_end_on_a_tiny_configuration(tmp_path):
    base = tiny_config("ddpm")
    base.data.subset = 16
    experiment = Experiment(base=base, seeds=(0,), num_shards=2, steps=8, rounds=2, eval_points=2,
                            num_samples=6, sample_steps=2, heldout=40, classifier_steps=20,
                            variants={"ddpm+agc": ("ddpm", ("method.agc.enabled=true",))})
    results = run_experiment(experiment, tmp_path, log=lambda *_: None)
    assert set(results["mode"]) == {"ddpm", "iet", "iet-agc", "iet-agc+", "ddpm+agc"}
    assert len(results) == 5 * 2  # two evaluation points per method
    # equal compute: every method ends after the same number of sample visits
    final = results.groupby("mode").visits.max()
    assert final.nunique() == 1 and final.iloc[0] == 8 * base.train.batch_size
    saved = pd.read_csv(tmp_path / "results.csv")
    assert list(saved.columns) == ["mode", "seed", "round", "step", "visits", "num_samples", "memorized_fraction",
                                   "memorized_low", "memorized_high", "distance_share", "distance_low", "distance_high",
                                   "mq_share", "mq_low", "mq_high", "copy_delta", "mq_below_1_3", "mean_l2_nearest",
                                   "feature_fd", "feature_fd_low", "feature_fd_high", "heldout_l2", "fid", "weights",
                                   "flip_aware", "resize_filter", "train_seconds"]
    # One evaluation setting for all: raw weights, and IET-AGC+'s TAA flips make every method flip-aware.
    assert set(saved["weights"]) == {"raw"} and saved["flip_aware"].all() and (saved["num_samples"] == 6).all()
    assert (saved["memorized_low"] <= saved["memorized_fraction"]).all() and (saved["memorized_fraction"] <= saved["memorized_high"]).all()
    assert ((saved["feature_fd_low"] <= saved["feature_fd"]) & (saved["feature_fd"] <= saved["feature_fd_high"])).all()
    assert (saved["feature_fd_low"] < saved["feature_fd_high"]).all()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {"memorized_fraction_mean", "memorized_fraction_std", "feature_fd_mean",
            "memorized_at_equal_quality", "equal_quality_step"} <= set(summary.columns)
    for name in ["memorization_bar.png", "ratio_histograms.png", "memorization_vs_quality.png",
                 "neighbours_ddpm.png", "neighbours_iet-agc+.png", "report.md"]:
        assert (tmp_path / name).stat().st_size > 0, name
    assert "| mode" in (tmp_path / "report.md").read_text()

    # Run again with a seed added: the first seed's runs are reused, not trained again.
    before = {p.name for p in (tmp_path / "runs").iterdir()}
    experiment.seeds = (0, 1)
    again = run_experiment(experiment, tmp_path, log=lambda *_: None)
    assert {p.name for p in (tmp_path / "runs").iterdir()} > before
    runs = list_runs(tmp_path / "runs")
    assert len(runs) == 10
    variant = next(run.config for run in runs if run.config.name == "ddpm+agc-seed1")
    assert variant.method.agc.enabled and variant.method.num_shards == 1
    first = again[again.seed == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(first.drop(columns="train_seconds"), results.drop(columns="train_seconds"))

    # Report only: evaluate what exists, train nothing (seed 2 has no runs and is left out).
    experiment.seeds, experiment.train, experiment.overlays = (0, 2), False, {"before": results}
    report = run_experiment(experiment, tmp_path, log=lambda *_: None)
    assert set(report.seed) == {0} and len(list_runs(tmp_path / "runs")) == 10


def test_runner_rejects_impossible_budgets(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--steps", "10", "--rounds", "30"]) == 2
    assert "no local step" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--variant", "lonely"]) == 2
    assert "LABEL=MODE" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--variant", "x=ddpm,method.agc.nonsense=1"]) == 2
    assert "unknown setting" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--overlay", str(tmp_path / "missing.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_comparison_refuses_mixed_weights_and_flips_and_aligns_taa_flips(tmp_path):
    base = tiny_config("ddpm")
    plain = Experiment(base=base, modes=("ddpm", "iet"), seeds=(0,), num_shards=2, steps=8, rounds=2, eval_points=1)
    assert plain.evaluation() == {"use_ema": False, "flip_aware": False}
    # IET-AGC+ trains on TAA-flipped images: every method is then checked against mirrored copies.
    with_taa = Experiment(base=base, modes=("ddpm", "iet-agc+"), seeds=(0,), num_shards=2, steps=8, rounds=2, eval_points=1)
    assert with_taa.evaluation() == {"use_ema": False, "flip_aware": True}
    for setting in ("eval.use_ema=true", "eval.flip_aware=false", "eval.memorization_threshold=0.2"):
        mixed = Experiment(base=base, modes=("ddpm",), seeds=(0,), num_shards=2, steps=8, rounds=2, eval_points=1,
                           variants={"odd": ("iet", (setting,))})
        with pytest.raises(ConfigError, match="same for every method"):
            mixed.validate()
    # Another experiment's results on other weights are refused as an overlay.
    ema = pd.DataFrame({"mode": ["ddpm"], "step": [8], "memorized_fraction": [0.5], "feature_fd": [3.0], "weights": ["ema"]})
    plain.overlays = {"ema-run": ema}
    with pytest.raises(ConfigError, match="same weights"):
        run_experiment(plain, tmp_path, log=lambda *_: None)
    assert main(["--out", str(tmp_path), "--modes", "ddpm", "--variant", "x=iet,eval.use_ema=true"]) == 2

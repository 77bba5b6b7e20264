import json
import os
import subprocess
import sys
from pathlib import Path

from diffusers import DDPMPipeline


REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "iet_core", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_train_resume_and_export_from_the_command_line(tmp_path):
    config = cli("config", "--mode", "iet-agc", "--resolution", "8", "--subset", "8", "--shards", "2",
                 "--rounds", "1", "--local-steps", "2", "--batch-size", "4", "--set", "train.preview_samples=0", cwd=tmp_path)
    assert config.returncode == 0, config.stderr
    (tmp_path / "cfg.json").write_text(config.stdout)
    assert json.loads(config.stdout)["method"]["agc"]["enabled"] is True
    done = cli("train", "--config", "cfg.json", "--runs-dir", "runs", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    again = cli("resume", str(run), "--quiet", cwd=tmp_path)  # a finished run resumes to finished at once
    assert again.returncode == 0, again.stderr
    exported = cli("export", str(run), "--out", "pipe", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert DDPMPipeline.from_pretrained(tmp_path / "pipe").unet.config.sample_size == 8


def test_bad_flags_fail_with_a_message_and_no_run(tmp_path, monkeypatch, capsys):
    from iet_core.cli import main

    monkeypatch.chdir(tmp_path)
    for args, message in ((("--shards", "100", "--subset", "10", "--mode", "iet"), "at most 10 shards"),
                          (("--skip-lambda", "2", "--mode", "iet-agc"), "skip_lambda"),
                          (("--preset", "giant"), "unknown"),
                          (("--data", str(tmp_path / "missing")), "neither a built-in dataset"),
                          (("--set", "train.rounds=two"), "whole number"),
                          (("--set", "train.nope=1"), "unknown setting"),
                          (("--config", "missing.json"), "python -m iet_core config")):
        assert main(["train", "--runs-dir", "runs", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "runs").exists()


def test_every_recipe_is_a_valid_config_for_every_mode(capsys):
    from iet_core.cli import main
    from iet_core.config import MODES, RECIPES, recipe_config

    for recipe in RECIPES:
        for mode in MODES:
            config = recipe_config(recipe, mode).validate()
            assert config.method.mode == mode, (recipe, mode)
    # The demo's K proxies share each round's 100 steps; the paper recipe keeps its own K.
    assert [recipe_config("demo", m).train.local_steps for m in ("ddpm", "iet-agc")] == [100, 25]
    assert recipe_config("paper", "iet-agc").method.num_shards == 10
    assert main(["config", "--recipe", "paper", "--mode", "iet-agc"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["preset"] == "ddpm-cifar10"

"""The GPU check (bench/gpu_check.py) end to end in its dry run: every part, tiny sizes, on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from gpu_check import DRY_RUN, Check, pilot_size  # noqa: E402


def test_dry_run_runs_every_part_and_writes_their_tables(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "images.npz"  # a stand-in for the CIFAR-10 subset: 64 labelled colour images
    np.savez(data, images=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8), labels=np.arange(64) % 4)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out), "--data", str(data),
                           "--wheels", str(tmp_path / "no-wheels")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr + (out / "log.txt").read_text()
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["tests", "bench", "demo", "pilot"]
    tests = parts["tests"]
    # The `cuda` tests ran on the CPU stand-in; the two that need CUDA itself say so and skip.
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (4, 0, 0, 2), tests
    assert not [row for row in parts["bench"]["table"] if row[1].startswith("failed")]
    demo = parts["demo"]
    assert demo["samples"] == 16 and 0 <= demo["memorized_fraction"] <= 1 and demo["steps"] > 0
    assert {row["mode"] for row in parts["pilot"]["results"]} == {"ddpm", "iet-agc"}
    assert all(row["samples"] == 16 and 0 <= row["interval"][0] <= row["interval"][1] <= 1
               for row in parts["pilot"]["results"])
    assert parts["pilot"]["local_steps_per_proxy"] == DRY_RUN.pilot_local_steps
    table = (out / "gpu_check.md").read_text()
    assert "| tests |" in table and "test_resume_on_cuda_gives_the_same_weights | PASSED" in table
    assert sorted(path.name for path in out.iterdir()) == [
        "bench.json", "gpu_check.json", "gpu_check.md", "log.txt", "pilot_ddpm_neighbours.png", "pilot_ddpm_report.md",
        "pilot_iet-agc_neighbours.png", "pilot_iet-agc_report.md"]  # the 8 files the GPU machine gives back


def test_a_part_past_its_budget_is_interrupted_and_keeps_what_it_saved(tmp_path):
    saved = tmp_path / "saved"
    check = Check(DRY_RUN, tmp_path, tmp_path, tmp_path, env=dict(os.environ))
    # Saves on SIGINT, as the trainer does (a checkpoint) and pytest does (its summary).
    done = check.child(["bash", "-c", f"trap 'echo saved > {saved}; exit 0' INT; while :; do sleep 0.1; done"], budget=2)
    assert done["stopped_at_budget"] and done["exit"] == 0
    assert saved.read_text() == "saved\n"


def test_the_pilot_fits_whole_rounds_of_long_local_training_into_its_time():
    assert pilot_size(steps_per_second=100, seconds=200) == (3, 750)  # 10,000 steps per mode
    assert pilot_size(steps_per_second=200, seconds=200) == (6, 750)
    # Fewer than three rounds of 750 fit: three shorter rounds, never one long one.
    assert pilot_size(steps_per_second=40, seconds=200) == (3, 300)
    assert pilot_size(steps_per_second=10, seconds=200) == (3, 50)
    assert pilot_size(steps_per_second=1, seconds=10) == (3, 50)

"""Shards over processes: two real CPU processes (torchrun, gloo) against one process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from iet_core.config import ConfigError
from iet_core.distributed import ProcessGroup
from iet_core.runs import list_runs

REPO = Path(__file__).resolve().parents[1]


def launch(*prefix: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *prefix, "-m", "iet_core", "train", "--config", "cfg.json", "--quiet",
                           "--runs-dir", "runs"], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def flat(run, group: str) -> torch.Tensor:
    return torch.cat([t.flatten() for t in run.load_checkpoint()[0][group].values()])


def test_two_processes_train_the_same_run_as_one(tmp_path):
    config = tiny_config("iet-agc+", rounds=3)
    config.method.num_shards = 4  # two proxies per process
    config.model.num_train_timesteps = 4  # banks fill within a few steps, so AGC skips and MSR moves
    config.method.agc.skip_lambda = 1.0
    config.method.msr.threshold = 0.0
    config.method.msr.min_visits = 1
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "cfg.json").write_text(config.to_json())
    one = launch(cwd=tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = launch("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", cwd=tmp_path / "two")
    assert two.returncode == 0, two.stderr
    (single,), (multi,) = list_runs(tmp_path / "one" / "runs"), list_runs(tmp_path / "two" / "runs")  # one folder each
    assert multi.status()["state"] == "finished" and multi.status()["global_step"] == 3 * 4 * 3

    # The same samples moved between the same shards, and every step of every proxy is logged once, in order.
    moves = single.msr_moves()
    assert len(moves) > 0
    assert multi.msr_moves().drop(columns="global_step").equals(moves.drop(columns="global_step"))
    a, b = single.metrics(), multi.metrics()
    assert a.global_step.tolist() == b.global_step.tolist() == list(range(36))
    assert (a.proxy == b.proxy).all()
    torch.testing.assert_close(torch.tensor(b.loss.to_numpy()), torch.tensor(a.loss.to_numpy()), rtol=1e-4, atol=1e-6)
    assert single.per_sample()[["sample_id", "shard", "visits", "skips"]].equals(
        multi.per_sample()[["sample_id", "shard", "visits", "skips"]])

    # Weights, EMA, banks and Adam moments agree to float rounding (the average is summed in another order).
    for group in ("model", "ema"):
        x, y = flat(single, group), flat(multi, group)
        assert ((x - y).norm() / x.norm()).item() < 1e-4
    state_a, state_b = single.load_checkpoint()[0]["state"], multi.load_checkpoint()[0]["state"]
    assert torch.equal(state_a["shard_of"], state_b["shard_of"])
    for name in ("banks", "adam.exp_avg_sq", "visits", "skips", "round_visits"):
        torch.testing.assert_close(state_b[name], state_a[name], rtol=1e-4, atol=1e-9)


def test_each_process_gets_a_contiguous_block_of_proxies():
    blocks = [ProcessGroup(rank, 3).block(8) for rank in range(3)]
    assert [list(b) for b in blocks] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    with pytest.raises(ConfigError, match="at most 2 processes"):
        ProcessGroup(0, 3).block(2)


def test_two_processes_match_the_plain_reference_round(tmp_path):
    from test_train import reference_config, reference_error

    from iet_core.data import load_dataset
    from iet_core.shards import split_shards

    config = reference_config()
    (tmp_path / "cfg.json").write_text(config.to_json())
    two = launch("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    (run,) = list_runs(tmp_path / "runs")
    dataset = load_dataset(config.data)
    shard_of = split_shards(len(dataset), 4, config.method.shard_split, dataset.labels.numpy(), config.train.seed)
    error, banks, skips = reference_error(config, run, shard_of, dataset.to_model_space())
    assert error < 1e-2, error
    state = run.load_checkpoint()[0]["state"]
    torch.testing.assert_close(state["banks"], banks, rtol=1e-4, atol=1e-6)
    assert torch.equal(state["skips"].sum(0), skips)

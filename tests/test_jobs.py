"""The app's job manager with real (tiny) training runs: queue, pause / resume / stop, owner
tokens, lambda changes, live telemetry versus the run folder, and listing after a restart."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from helpers import tiny_config, wait_until
from iet_core.config import ConfigError
from iet_core.history import RunHistory, bin_ratios
from iet_core.data import SourcePolicy
from iet_core.jobs import JobError, JobManager
from iet_core.owners import owner_digest
from iet_core.runs import Run
from iet_core.telemetry import SampleEvent, StepEvent

ME, OTHER = "owner-me-123456", "owner-other-654321"


def test_one_job_at_a_time_with_queue_positions(tmp_path):
    jobs = JobManager(tmp_path)
    first = jobs.submit(tiny_config("iet-agc"), ME)
    jobs.pause(first, ME)
    second = jobs.submit(tiny_config("ddpm"), ME)
    third = jobs.submit(tiny_config("iet"), OTHER)
    assert [jobs.status(r)["state"] for r in (first, second, third)] == ["paused", "queued", "queued"]
    assert (jobs.queue_position(second), jobs.queue_position(third)) == (1, 2)
    assert jobs.running_count() == 1
    wait_until(lambda: jobs.status(first)["state"] == "paused", what="the trainer to pause")

    with pytest.raises(JobError, match="queued"):
        jobs.pause(second, ME)
    jobs.stop(second, ME)  # a queued job leaves the queue and never starts
    assert jobs.queue_position(third) == 1
    assert jobs.status(second)["state"] == "created"

    jobs.resume(first, ME)
    assert jobs.wait(first, 120) == "finished"
    assert jobs.wait(third, 120) == "finished"
    assert [r["run_id"] for r in jobs.list_runs()] == [third, second, first]


def test_only_the_owner_steers_a_run(tmp_path):
    jobs = JobManager(tmp_path)
    run_id = jobs.submit(tiny_config("iet-agc"), ME)
    jobs.pause(run_id, ME)
    for action in (jobs.pause, jobs.resume, jobs.stop):
        for stranger in (OTHER, "", "ünïcode-tøken"):
            with pytest.raises(JobError, match="another browser session"):
                action(run_id, stranger)
    with pytest.raises(JobError, match="another browser session"):
        jobs.set_skip_lambda(run_id, 0.3, OTHER)
    assert jobs.is_owner(run_id, ME) and not jobs.is_owner(run_id, OTHER)
    jobs.resume(run_id, ME)
    assert jobs.wait(run_id, 120) == "finished"
    with pytest.raises(JobError, match="not running"):
        jobs.pause(run_id, ME)


def test_stop_then_resume_continues_from_the_checkpoint_with_one_history(tmp_path):
    config = tiny_config("iet-agc", rounds=4, local_steps=10)
    jobs = JobManager(tmp_path)
    run_id = jobs.submit(config, ME)
    jobs.pause(run_id, ME)
    wait_until(lambda: jobs.status(run_id)["state"] == "paused", what="the trainer to pause")
    jobs.set_skip_lambda(run_id, 0.35, ME)
    jobs.resume(run_id, ME)
    wait_until(lambda: len(jobs.history(run_id).rounds()) >= 1, what="the first round")
    jobs.stop(run_id, ME)
    assert jobs.wait(run_id, 120) == "stopped"
    run = Run.open(tmp_path / run_id)
    stopped_at = run.status()["global_step"]
    total = 4 * 2 * 10
    assert 0 < stopped_at < total and run.latest_checkpoint() is not None
    # Read back from the folder (a restarted app), the progress bars show the round it stopped in.
    plan = JobManager(tmp_path).history(run_id).round_plan()
    assert plan == {"round": run.status()["round"], "steps_per_proxy": [10, 10]} and plan["round"] >= 1

    jobs.resume(run_id, ME)  # a stopped run continues from its checkpoint
    assert jobs.wait(run_id, 180) == "finished"
    steps = jobs.history(run_id).steps()
    assert steps["global_step"].tolist() == list(range(total))  # every step once, across the restart
    assert (steps["skip_lambda"] == np.float32(0.35)).all()  # set before the first step, kept by the checkpoint
    settings = jobs.history(run_id).settings()
    assert [(s["name"], s["global_step"]) for s in settings] == [("skip_lambda", 0)]
    with pytest.raises(JobError, match="finished"):
        jobs.resume(run_id, ME)


@pytest.mark.parametrize("execution", ["sequential", "batched"])  # batched proxies interleave global steps
def test_live_history_matches_the_run_folder_after_a_restart(tmp_path, execution):
    jobs = JobManager(tmp_path)
    run_id = jobs.submit(tiny_config("iet-agc+", rounds=3, execution=execution), ME)
    assert jobs.wait(run_id, 120) == "finished"
    live = jobs.history(run_id)

    restarted = JobManager(tmp_path)  # a new app process: only the folder is left
    assert [(r["run_id"], r["state"], r["mode"]) for r in restarted.list_runs()] == [(run_id, "finished", "iet-agc+")]
    stored = restarted.history(run_id)
    assert stored is restarted.history(run_id)  # cached until the folder changes
    columns = ["global_step", "round", "proxy", "local_step", "loss", "kept_fraction"]
    assert np.allclose(live.steps()[columns].to_numpy(float), stored.steps()[columns].to_numpy(float))
    assert len(live.snapshots()) == len(stored.snapshots()) > 0
    for a, b in zip(live.snapshots(), stored.snapshots()):
        assert (a.round, a.proxy, a.first_step, a.last_step, a.unseen, a.skipped) == \
            (b.round, b.proxy, b.first_step, b.last_step, b.unseen, b.skipped)
        assert (a.counts == b.counts).all()
    live_stats, stored_stats = live.per_sample(), stored.per_sample()
    assert live_stats[["sample_id", "visits", "skips"]].equals(stored_stats[["sample_id", "visits", "skips"]])
    run_stats = Run.open(tmp_path / run_id).per_sample().sort_values("sample_id", ignore_index=True)
    assert run_stats["visits"].tolist() == live_stats["visits"].tolist()
    assert [r["shard_sizes"] for r in live.rounds()] == [r["shard_sizes"] for r in stored.rounds()]
    assert live.round_plan() == stored.round_plan() == {"round": 2, "steps_per_proxy": [3, 3]}
    assert restarted.status(run_id)["live"] is False


def test_a_run_left_running_by_a_dead_app_shows_as_interrupted_and_resumes(tmp_path):
    run = Run.create(tmp_path, tiny_config("ddpm"))
    run.write_owner(owner_digest(ME))
    run.write_status("running", round=0, global_step=0)  # what a killed app leaves behind
    jobs = JobManager(tmp_path)
    status = jobs.status(run.id)
    assert status["state"] == "interrupted" and "Resume" in status["message"]
    jobs.resume(run.id, ME)
    assert jobs.wait(run.id, 120) == "finished"
    assert jobs.is_owner(run.id, ME)


def test_a_job_whose_data_is_gone_fails_with_the_reason(tmp_path):
    source = tmp_path / "images.npz"
    np.savez(source, images=np.random.default_rng(0).integers(0, 255, (12, 8, 8), dtype=np.uint8))
    config = tiny_config("ddpm")
    config.data.source = str(source)
    jobs = JobManager(tmp_path / "runs", sources=SourcePolicy.allowing(tmp_path))  # an admin's data folder
    blocker = jobs.submit(tiny_config("ddpm"), ME)
    jobs.pause(blocker, ME)
    run_id = jobs.submit(config, ME)
    source.unlink()  # gone before the queued job starts
    jobs.resume(blocker, ME)
    assert jobs.wait(run_id, 120) == "failed"
    status = jobs.status(run_id)
    assert "images.npz" in status["error"] and status["state"] == "failed"


def test_lambda_cannot_be_set_on_runs_without_agc_or_out_of_range(tmp_path):
    jobs = JobManager(tmp_path)
    run_id = jobs.submit(tiny_config("iet"), ME)
    jobs.pause(run_id, ME)
    with pytest.raises(JobError, match="without AGC"):
        jobs.set_skip_lambda(run_id, 0.3, ME)
    jobs.stop(run_id, ME)
    assert jobs.wait(run_id, 120) == "stopped"
    agc = jobs.submit(tiny_config("iet-agc"), ME)
    jobs.pause(agc, ME)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        jobs.set_skip_lambda(agc, 1.5, ME)
    jobs.shutdown()
    assert jobs.status(agc)["state"] == "stopped"
    with pytest.raises(JobError, match="no run"):
        jobs.status("missing-run")


def _events(step0: int, n: int, ratios: np.ndarray):
    steps = np.arange(step0, step0 + n)
    step = StepEvent(0, 0, steps, steps - step0, np.full(n, 0.5, np.float32), np.ones(n, np.float32),
                     np.full(n, 1e-3, np.float32), np.full(n, 0.5, np.float32))
    ids = np.arange(len(ratios)) % 7
    sample = SampleEvent(0, 0, np.repeat(steps, len(ratios) // n), ids, ids % 2, ids, ratios.astype(np.float32),
                         ratios.astype(np.float32), ratios < 0.5, np.zeros(len(ratios), np.float32))
    return step, sample


def test_history_store_stays_bounded_and_keeps_exact_counts():
    store = RunHistory(max_steps=100, max_snapshots=8, recent_visits=50)
    rng = np.random.default_rng(0)
    total_visits = 0
    for flush in range(40):
        ratios = np.concatenate([rng.uniform(0, 4, 19), [np.inf]])
        total_visits += len(ratios)
        for event in _events(flush * 5, 5, ratios):
            store(event)
    steps = store.steps()
    assert len(steps) <= 100 and steps["global_step"].is_monotonic_increasing
    assert steps["global_step"].iloc[0] == 0
    snapshots = store.snapshots()
    assert len(snapshots) <= 8
    assert sum(s.visits for s in snapshots) == total_visits  # merging keeps every visit
    assert sum(s.unseen for s in snapshots) == 40
    assert snapshots[0].first_step == 0 and snapshots[-1].last_step == 199
    assert 50 <= len(store.recent_visits_frame()) < 70
    assert store.per_sample()["visits"].sum() == total_visits


def test_thinning_keeps_every_proxy_of_side_by_side_training():
    store = RunHistory(max_steps=40)
    for local in range(0, 100, 5):  # 4 proxies step together: global step = 4 x local step + proxy
        for proxy in range(4):
            steps = np.arange(local, local + 5)
            store(StepEvent(0, proxy, 4 * steps + proxy, steps, np.ones(5, np.float32), np.ones(5, np.float32),
                            np.ones(5, np.float32), np.full(5, 0.5, np.float32)))
    steps = store.steps()
    assert len(steps) <= 40 and steps["global_step"].is_monotonic_increasing
    assert steps.groupby("proxy").size().to_dict() == {0: 7, 1: 7, 2: 7, 3: 7}  # local steps 0, 16, ..., 96
    assert store.last()["global_step"] == 399 and store.proxies()[3]["local_step"] == 99


def test_ratio_bins_put_large_and_unseen_ratios_where_they_belong():
    counts, unseen = bin_ratios(np.array([0.004, 0.499, 0.5, 2.999, 3.0, 50.0, np.inf, np.nan]))
    assert unseen == 2
    assert counts[0] == 1 and counts[49] == 1 and counts[50] == 1 and counts[-1] == 3
    assert counts.sum() == 6


def test_ownership_survives_a_restart_for_resume_and_delete(tmp_path):
    jobs = JobManager(tmp_path)
    mine = jobs.submit(tiny_config("ddpm", rounds=1), ME)
    assert jobs.wait(mine, 120) == "finished"
    assert ME not in (tmp_path / mine / "owner.json").read_text()  # only a digest is kept
    restarted = JobManager(tmp_path)
    with pytest.raises(JobError, match="only its owner can delete"):
        restarted.delete(mine, OTHER)
    with pytest.raises(JobError, match="only its owner can resume"):
        restarted.resume(mine, OTHER)
    restarted.delete(mine, ME)
    assert not (tmp_path / mine).exists() and restarted.list_runs() == []
    assert list((tmp_path / ".deleted").iterdir()) == []  # set aside, then removed


def test_a_run_cannot_be_deleted_while_it_trains_or_from_outside_the_app(tmp_path):
    from iet_core.train import train

    jobs = JobManager(tmp_path)
    live = jobs.submit(tiny_config("ddpm", rounds=1), ME)
    jobs.pause(live, ME)
    with pytest.raises(JobError, match="stop it before deleting"):
        jobs.delete(live, ME)
    jobs.stop(live, ME)
    assert jobs.wait(live, 120) == "stopped"
    cli_run = train(tiny_config("ddpm", rounds=1), runs_root=tmp_path)  # no owner: made outside the app
    with pytest.raises(JobError, match="outside the app"):
        jobs.delete(cli_run.id, ME)
    jobs.delete(live, ME)
    assert [r["run_id"] for r in jobs.list_runs()] == [cli_run.id]


def test_per_user_caps_on_runs_and_disk(tmp_path):
    jobs = JobManager(tmp_path, max_runs_per_owner=1)
    first = jobs.submit(tiny_config("ddpm", rounds=1), ME)
    with pytest.raises(JobError, match="limit per user is 1"):
        jobs.submit(tiny_config("ddpm", rounds=1), ME)
    other = jobs.submit(tiny_config("ddpm", rounds=1), OTHER)  # someone else is not affected
    assert jobs.wait(first, 120) == jobs.wait(other, 120) == "finished"
    jobs.delete(first, ME)
    jobs.submit(tiny_config("ddpm", rounds=1), ME)  # room again

    tight = JobManager(tmp_path / "disk", max_bytes_per_owner=10_000)
    done = tight.submit(tiny_config("ddpm", rounds=1), ME)
    assert tight.wait(done, 120) == "finished"  # a checkpoint is far above 10 kB
    with pytest.raises(JobError, match="MiB and the limit per user"):
        tight.submit(tiny_config("ddpm", rounds=1), ME)


def test_admin_cleanup_removes_old_runs_only(tmp_path):
    import json
    import os

    jobs = JobManager(tmp_path)
    old, new = (jobs.submit(tiny_config("ddpm", rounds=1), ME) for _ in range(2))
    assert jobs.wait(old, 120) == jobs.wait(new, 120) == "finished"
    status = tmp_path / old / "status.json"
    data = json.loads(status.read_text())
    data["updated"] -= 10 * 86400
    status.write_text(json.dumps(data))
    leftover = tmp_path / ".deleted" / "run-set-aside-when-the-app-died"  # never listed, removed by the cleanup
    leftover.mkdir(parents=True)
    (leftover / "metrics.csv").write_text("global_step\n0\n")
    assert jobs.cleanup(older_than_days=7) == [old]
    assert not leftover.exists()
    assert [r["run_id"] for r in jobs.list_runs()] == [new]
    assert os.path.isdir(tmp_path / new)


def test_two_jobs_at_once_share_the_cpu_and_end_bit_identical_to_solo_runs(tmp_path):
    """Each trainer draws from its own generator: two runs training side by side in one process
    (their initialisations and steps interleaved) end with exactly the weights of solo runs.
    While both train, each has half of torch's CPU threads."""
    from iet_core.jobs import CPU_THREADS
    from iet_core.train import train

    configs = [tiny_config("iet-agc", rounds=2, seed=1), tiny_config("iet-agc+", rounds=2, seed=2, hflip=True)]
    jobs = JobManager(tmp_path / "together", max_running=2)
    together = [jobs.submit(config, ME) for config in configs]
    assert jobs.running_count() == 2 and jobs.cpu_threads_per_job() == max(1, CPU_THREADS // 2)
    assert [jobs.wait(run_id, 180) for run_id in together] == ["finished", "finished"]
    assert jobs.cpu_threads_per_job() == CPU_THREADS
    for config, run_id in zip(configs, together):
        solo = train(config, runs_root=tmp_path / "solo").load_checkpoint()[0]
        shared = Run.open(tmp_path / "together" / run_id).load_checkpoint()[0]
        for group in ("model", "ema", "state"):
            for name, tensor in solo[group].items():  # exactly equal (NaN: images not seen yet)
                torch.testing.assert_close(shared[group][name], tensor, rtol=0, atol=0, equal_nan=True,
                                           msg=f"{run_id} {group}.{name}")


def test_history_queries_say_what_agc_skips_at_a_lambda():
    ratios = np.array([0.1, 0.2, 0.45, 0.55, 0.9, 1.5, np.inf, 0.3], np.float32)
    ids = np.array([0, 0, 1, 2, 3, 4, 5, 6])
    store = RunHistory()
    store(SampleEvent(0, 0, np.arange(8) // 4, ids, ids % 2, ids, ratios, ratios, ratios < 0.5, np.zeros(8, np.float32)))
    window = store.window()
    assert window.share_below(0.5) == 4 / 8 and window.share_below(0.25) == 2 / 8  # unseen timesteps count as kept
    assert window.share_below(1.0) == 6 / 8
    below = store.visits_below(0.5)
    assert below.to_dict("list") == {"sample_id": [0, 1, 6], "below": [2, 1, 1], "visits": [2, 1, 1]}
    skipped, top = store.most_skipped(limit=2)
    assert skipped and top["sample_id"].tolist() == [0, 1]
    summary = store.summary()
    assert (summary["visits"], summary["skips"], summary["skipped_share"], summary["images"]) == (8, 4, 0.5, 7)
    low, high = summary["skipped_interval"]
    assert low < 0.5 < high
    assert store.skip_lambda(0.5) == 0.5  # no step logged yet: the configured lambda


def test_a_running_job_reports_its_round_and_the_time_left(tmp_path):
    jobs = JobManager(tmp_path)
    run_id = jobs.submit(tiny_config("iet-agc", rounds=200, local_steps=3), ME)
    wait_until(lambda: jobs.status(run_id)["round"] >= 2 and jobs.status(run_id)["seconds_left"] is not None,
               what="a measured pace in round 3")
    status = jobs.status(run_id)
    assert status["rounds"] == 200 and 0 < status["seconds_left"] < 24 * 3600
    jobs.pause(run_id, ME)
    # the trainer's own word that it holds (the job says "paused" as soon as it is asked)
    wait_until(lambda: jobs.history(run_id).status()["state"] == "paused", what="the trainer to hold")
    status = jobs.status(run_id)
    assert status["seconds_left"] is None  # no pace while paused
    assert status["round"] == jobs.history(run_id).round_plan()["round"] >= 2  # one round everywhere
    jobs.stop(run_id, ME)
    assert jobs.wait(run_id, 120) == "stopped"


def test_a_run_can_be_evaluated_as_soon_as_it_finishes(tmp_path):
    from iet_core.evaluate import load_eval

    config = tiny_config("ddpm", rounds=1)
    config.eval.after_training, config.eval.num_samples, config.eval.steps = True, 4, 2
    jobs = JobManager(tmp_path)
    run_id = jobs.submit(config, ME)
    assert jobs.wait(run_id, 120) == "finished"
    summary = load_eval(jobs.run(run_id)).summary
    assert summary["num_samples"] == 4 and summary["checkpoint_step"] == jobs.status(run_id)["global_step"]
    other = jobs.submit(tiny_config("ddpm", rounds=1), ME)  # off by default
    assert jobs.wait(other, 120) == "finished" and not (jobs.run(other).path / "eval").exists()


def test_a_slow_machine_is_offered_a_shorter_schedule_and_the_run_stops_there(tmp_path):
    from iet_core.evaluate import load_eval

    config = tiny_config("iet-agc", rounds=200, local_steps=10)
    config.train.time_budget_minutes = 0.001  # less than any round takes: the timed rounds show it
    config.eval.after_training, config.eval.num_samples, config.eval.steps = True, 4, 2
    jobs = JobManager(tmp_path)
    run_id = jobs.submit(config, ME)
    wait_until(lambda: jobs.status(run_id)["shorter"] is not None, what="the offer after three timed rounds")
    offer = jobs.status(run_id)["shorter"]
    assert offer["rounds"] >= 3 and offer["minutes"] > 0  # nothing fits the budget: the rounds done
    with pytest.raises(JobError, match="between 1 and 199"):
        jobs.shorten(run_id, 200, ME)
    jobs.pause(run_id, ME)  # held mid-round, so the round it stops after is known however loaded the machine
    # the trainer's own word that it holds (the job says "paused" as soon as it is asked)
    wait_until(lambda: jobs.history(run_id).status()["state"] == "paused", what="the trainer to hold")
    stop_after = jobs.status(run_id)["round"] + 1  # the round in progress, counted from 1
    with pytest.raises(JobError, match="another browser session"):
        jobs.shorten(run_id, stop_after, OTHER)
    jobs.shorten(run_id, stop_after, ME)
    jobs.resume(run_id, ME)
    assert jobs.wait(run_id, 120) == "stopped"
    assert jobs.status(run_id)["round"] == stop_after  # those rounds done, none begun after them
    assert load_eval(jobs.run(run_id)).summary["checkpoint_step"] == jobs.status(run_id)["global_step"]

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline

from helpers import tiny_config
from iet_core import ConfigError, Run, TrainControl, Trainer, train
from iet_core.history import RunHistory
from iet_core.models import build_unet, training_scheduler
from iet_core.telemetry import DriftEvent, RoundEvent, RoundStartEvent, SampleEvent, StepEvent
from iet_core.train import create_run, data_order, derive_seed, prepare_trainer


def make_trainer(tmp_path, config, **kwargs):
    run, dataset = create_run(config, tmp_path / "runs")
    return Trainer(run, dataset, **kwargs)


def test_k1_without_agc_is_the_plain_ddpm_step(tmp_path):
    config = tiny_config("ddpm", rounds=1, local_steps=3, warmup_steps=0, hflip=False, optimizer="adam", lr=1e-3)
    trainer = make_trainer(tmp_path, config)
    # The plain DDPM step, written out with torch.optim.Adam on a copy of the initial model.
    model = build_unet(config.model, 8, 1)
    model.load_state_dict(trainer.unet.state_dict())
    initial = torch.cat([p.detach().clone().reshape(-1) for p in model.parameters()])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    alphas = training_scheduler(config.model).alphas_cumprod.float()
    images = trainer.dataset.to_model_space()
    order = data_order(config.train.seed, 0, 0, len(images), 3 * 4)
    trainer.fit()
    losses = []
    for step in range(3):
        generator = torch.Generator().manual_seed(derive_seed(config.train.seed, 0, 0, step))
        x0 = images[order[step * 4:(step + 1) * 4]]
        t = torch.randint(0, 1000, (4,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = alphas[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - alphas[t]).sqrt().view(-1, 1, 1, 1) * noise
        loss = F.mse_loss(model(x_t, t).sample, noise)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    np.testing.assert_allclose(trainer.run.metrics()["loss"], losses, rtol=1e-5)
    # Adam turns 1e-7 gradient rounding (mean vs sum / kept) into visible changes where a
    # gradient is near zero, so compare the whole update: a wrong t, noise or scale is O(1) off.
    ours = torch.cat([p.reshape(-1) for p in trainer.run.load_unet(ema=False).parameters()])
    theirs = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    update_error = (ours - theirs).norm() / (theirs - initial).norm()
    assert update_error < 1e-2, update_error


def test_all_skipped_batch_leaves_weights_unchanged(tmp_path):
    trainer = make_trainer(tmp_path, tiny_config("iet-agc"))
    trainer._start_round()
    trainer.flat.bind(trainer.weights[0], trainer.grads[0])
    trainer.banks[0].fill_(1e9)  # every loss is far below lambda * bank: all skipped
    state = lambda: [trainer.weights[0], trainer.ema[0], trainer.adam.exp_avg[0], trainer.adam.step[0]]
    before = [x.clone() for x in state()]
    trainer._step([0], torch.arange(4)[None])
    assert all(torch.equal(a, b) for a, b in zip(before, state()))
    assert trainer.banks[0].min() < 1e9  # the bank still learns from skipped samples
    assert trainer.skips[0, :4].sum() == 4
    trainer.banks[0].zero_()  # an empty bank keeps everything: now it steps
    trainer._step([0], torch.arange(4)[None])
    assert not torch.equal(trainer.weights[0], before[0])


def test_round_average_is_shard_size_weighted(tmp_path):
    config = tiny_config("iet", rounds=1)
    config.data.subset = 5  # shards of 3 and 2 images
    trainer = make_trainer(tmp_path, config)
    trainer._start_round()
    assert sorted(trainer.round_sizes) == [2, 3]
    assert trainer._run_sequential()
    finals = trainer.weights.clone()
    trainer._end_round()
    w0, w1 = trainer.round_sizes[0] / 5, trainer.round_sizes[1] / 5
    torch.testing.assert_close(trainer.global_weights, w0 * finals[0] + w1 * finals[1])
    assert not torch.allclose(finals[0], finals[1])


def test_msr_moves_are_applied_and_logged(tmp_path):
    config = tiny_config("iet-agc+", rounds=3, local_steps=None, local_epochs=1.0)  # steps follow shard sizes
    config.method.num_shards = 3
    config.method.shard_split = "random"  # the split this scenario of moves was written for
    config.method.agc.skip_lambda = 1.0
    config.method.msr.threshold = 0.0  # every sample skipped at least once in a round moves
    config.method.msr.min_visits = 1
    events = []
    trainer = make_trainer(tmp_path, config, sinks=[events.append])
    trainer.banks.fill_(10.0)  # most losses fall below lambda * bank: many skips
    assert trainer.fit() == "finished"
    rounds = [e for e in events if isinstance(e, RoundEvent)]
    moves = [m for e in rounds for m in e.moves]
    assert moves, "expected MSR moves"
    # Each round announces the steps its proxies will take, from the shard sizes after the moves.
    plans = [e.steps_per_proxy for e in events if isinstance(e, RoundStartEvent)]
    assert plans == [[config.train.steps_for_shard(n) for n in e.shard_sizes] for e in rounds]
    assert len({tuple(plan) for plan in plans}) > 1, "expected MSR to change the shard sizes"
    logged = trainer.run.msr_moves()
    assert list(map(tuple, logged[["sample_id", "from_shard", "to_shard"]].to_numpy())) == moves
    per_sample = trainer.run.per_sample().set_index("sample_id")
    last = {}
    for sample_id, _, to in moves:
        last[sample_id] = to
    for sample_id, shard in last.items():
        assert per_sample.loc[sample_id, "shard"] == shard


def test_stop_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    config = tiny_config("iet-agc+", rounds=2, local_steps=3, log_every=1)
    config.method.agc.skip_lambda = 0.9  # skips, MSR moves and TAA all take part
    config.method.msr.threshold = 0.2
    config.method.msr.min_visits = 1
    straight = train(config, runs_root=tmp_path / "a")

    control = TrainControl()

    def stop_mid_proxy(event):
        if isinstance(event, StepEvent) and event.global_step[-1] >= 7:  # round 1, second proxy
            control.stop()

    run, dataset = create_run(config, tmp_path / "b")
    trainer = Trainer(run, dataset, sinks=[stop_mid_proxy], control=control)
    assert trainer.fit() == "stopped"
    assert run.status()["state"] == "stopped"
    assert 7 <= run.status()["global_step"] < 12
    events = []
    train(run=run, resume=True, sinks=[events.append])
    assert run.status()["state"] == "finished"
    # Resumed mid-round, it announces the round it is in: where it started, and the same total.
    announced = next(e for e in events if isinstance(e, RoundStartEvent))
    assert (announced.round, announced.global_step, announced.total_steps) == (1, 6, 12)
    for stem in ("model", "ema"):
        a, _ = straight.load_checkpoint()
        b, _ = run.load_checkpoint()
        for name in a[stem]:
            assert torch.equal(a[stem][name], b[stem][name]), (stem, name)
    a_state, b_state = straight.load_checkpoint()[0]["state"], run.load_checkpoint()[0]["state"]
    for name in ("banks", "adam.exp_avg", "adam.step", "shard_of", "skips", "running_ratio"):
        assert torch.equal(a_state[name], b_state[name]) or torch.allclose(a_state[name], b_state[name], equal_nan=True, rtol=0, atol=0), name
    # the resumed run's logs hold every step once
    steps = run.metrics()["global_step"].tolist()
    assert steps == list(range(12)) == straight.metrics()["global_step"].tolist()
    np.testing.assert_allclose(run.metrics()["loss"], straight.metrics()["loss"], rtol=1e-6)


def test_batched_proxies_match_sequential_proxies(tmp_path, stop_at=5):
    """K proxies as one vmapped computation = one after another (within float tolerance),
    including a stop and resume in the middle of a batched round."""
    config = tiny_config("iet-agc+", rounds=2, local_steps=3, log_every=1, execution="sequential")
    config.method.num_shards = 3
    config.method.agc.skip_lambda = 0.9
    config.method.msr.threshold = 0.2
    config.method.msr.min_visits = 1
    sequential = train(config, runs_root=tmp_path / "seq")
    config.train.execution = "batched"
    control = TrainControl()
    stopper = [lambda e: isinstance(e, StepEvent) and e.global_step[-1] >= stop_at and control.stop()] if stop_at else []
    run, dataset = create_run(config, tmp_path / "batched")
    trainer = Trainer(run, dataset, sinks=stopper, control=control)
    assert trainer.fit() == ("stopped" if stop_at else "finished")
    if stop_at:
        train(run=run, resume=True)
    a, b = sequential.load_checkpoint()[0], run.load_checkpoint()[0]
    fresh = Trainer(*create_run(config, tmp_path / "init"))  # same seed: the common starting point
    vector = lambda state: torch.cat([state[name].reshape(-1) for name in sorted(state)])
    init = vector(fresh._state_dict(fresh.global_weights))
    update_error = (vector(a["model"]) - vector(b["model"])).norm() / (vector(a["model"]) - init).norm()
    assert update_error < 1e-2, update_error  # rounding only (vmap sums conv gradients in another order)
    torch.testing.assert_close(a["state"]["banks"], b["state"]["banks"], rtol=1e-3, atol=1e-5)
    assert torch.equal(a["state"]["shard_of"], b["state"]["shard_of"])
    assert sorted(run.metrics().global_step) == list(range(18))


def test_channels_last_and_compile_train_the_same_model(tmp_path):
    """Channels-last weights and inputs, with torch.compile (one proxy at a time) or under vmap
    (side by side), give the default run's weights within rounding; checkpoints keep the usual
    layout and load back exactly."""
    config = tiny_config("iet-agc", rounds=2, local_steps=3, execution="sequential")
    default = train(config, runs_root=tmp_path / "default")
    fresh = Trainer(*create_run(config, tmp_path / "init"))
    vector = lambda state: torch.cat([state[name].reshape(-1) for name in sorted(state)])
    init = vector(fresh._state_dict(fresh.global_weights))
    expected = vector(default.load_checkpoint()[0]["model"])
    for variant in ({"compile": True}, {"execution": "batched"}):
        changed = tiny_config("iet-agc", rounds=2, local_steps=3, channels_last=True, **{"execution": "sequential", **variant})
        run = train(changed, runs_root=tmp_path / str(variant))
        saved = run.load_checkpoint()[0]["model"]
        assert (vector(saved) - expected).norm() / (expected - init).norm() < 1e-2, variant
        trainer = Trainer(run)
        trainer.load_checkpoint()
        assert trainer.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        restored = trainer._state_dict(trainer.global_weights)
        assert all(torch.equal(restored[name], saved[name]) for name in saved)


def test_pause_and_lambda_change_from_another_thread(tmp_path):
    import threading

    config = tiny_config("iet-agc", rounds=1, local_steps=6, log_every=1)
    control = TrainControl()
    seen = []

    def on_event(event):
        if isinstance(event, StepEvent):
            seen.append(int(event.global_step[-1]))
            if seen[-1] == 2:
                control.pause()
                control.set_skip_lambda(0.25)
                threading.Timer(0.5, control.resume).start()

    run = train(config, runs_root=tmp_path, sinks=[on_event], control=control)
    metrics = run.metrics()
    assert set(metrics[metrics.global_step <= 2].skip_lambda) == {0.5}
    assert set(metrics[metrics.global_step > 2].skip_lambda) == {0.25}
    history = run.settings_history()
    assert history[["name", "value"]].values.tolist() == [["skip_lambda", 0.25]]
    assert run.status()["state"] == "finished"


def test_end_to_end_train_checkpoint_export_sample(tmp_path):
    config = tiny_config("iet-agc", rounds=2, preview_samples=4, preview_steps=2)
    events = []
    run = train(config, runs_root=tmp_path / "runs", sinks=[events.append])
    samples = [e for e in events if isinstance(e, SampleEvent)]
    assert sum(len(e.sample_id) for e in samples) == 2 * 2 * 3 * 4  # rounds x proxies x steps x batch
    records = run.sample_records()
    assert set(records.columns) >= {"sample_id", "shard", "timestep", "loss", "ratio", "skipped"}
    assert set(records.sample_id) <= set(run.dataset().ids.tolist())
    assert len(run.metrics()) == 12 and len(run.rounds()) == 2
    assert [number for number, _ in run.previews()] == [1, 2]
    assert [p.name for p in run.checkpoints()] == ["ckpt-000000006", "ckpt-000000012"]
    folder = run.export(tmp_path / "pipeline")
    pipeline = DDPMPipeline.from_pretrained(folder)
    images = pipeline(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_divergence_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    from iet_core import TrainingDiverged
    from iet_core.telemetry import CheckpointEvent

    trainer = make_trainer(tmp_path, tiny_config("ddpm", rounds=3))

    def poison_after_first_checkpoint(event):
        if isinstance(event, CheckpointEvent):
            trainer.images.fill_(float("nan"))

    trainer.sinks.append(poison_after_first_checkpoint)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3"):
        trainer.fit()
    status = trainer.run.status()
    assert status["state"] == "failed" and "loss became nan" in status["message"]
    assert trainer.run.latest_checkpoint().name == "ckpt-000000003"  # the good one, from round 1
    assert torch.isfinite(trainer.run.load_unet().conv_in.weight).all()


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.method, "num_shards", 50), "larger than the dataset"),
    (lambda c: setattr(c.method.agc, "skip_lambda", 1.5), "skip_lambda"),
    (lambda c: setattr(c.model, "preset", "giant"), "unknown"),
    (lambda c: setattr(c.data, "resolution", 10), "multiple of 4"),
    (lambda c: setattr(c.train, "local_epochs", 2.0), "exactly one of local_steps and local_epochs"),
    (lambda c: setattr(c.method.msr, "enabled", True) or setattr(c.method, "num_shards", 1), "at least 2 shards"),
])
def test_bad_settings_fail_before_a_run_exists(tmp_path, change, message):
    config = tiny_config("iet-agc")
    change(config)
    with pytest.raises(ConfigError, match=message):
        train(config, runs_root=tmp_path)
    assert not (tmp_path).exists() or not any(tmp_path.iterdir())


def test_proxies_that_cannot_fit_in_memory_are_refused_before_allocation(tmp_path):
    config = tiny_config("iet", rounds=1)
    config.model.preset, config.data.resolution, config.data.subset = "ddpm-cifar10", 32, None
    config.method.num_shards = 256  # the most allowed: 256 proxies x 35.7M parameters x 5 copies, 180 GB
    with pytest.raises(ConfigError, match="lower method.num_shards or choose a smaller model preset"):
        train(config, runs_root=tmp_path)
    assert Run.open(next(tmp_path.iterdir())).status()["state"] == "failed"


def test_resume_refuses_changed_data(tmp_path):
    run = train(tiny_config("ddpm", rounds=1), runs_root=tmp_path)
    config = run.config
    config.data.subset_seed = 99
    (run.path / "config.json").write_text(config.to_json())
    with pytest.raises(ConfigError, match="data differs"):
        train(run=Run.open(run.path), resume=True)
    status = run.status()  # readers see why, not a stale "finished"
    assert status["state"] == "failed" and "data differs" in status["message"]


def test_fine_tune_from_a_local_diffusers_unet(tmp_path):
    base = train(tiny_config("ddpm", rounds=1), runs_root=tmp_path / "base")
    folder = base.export(tmp_path / "pipeline")  # a DDPMPipeline folder: the UNet sits in unet/
    config = tiny_config("iet-agc", rounds=1)
    config.model.pretrained = str(folder)
    run = train(config, runs_root=tmp_path / "tuned")
    start = base.load_unet(ema=True).state_dict()
    tuned = run.load_unet(ema=False).state_dict()
    assert set(start) == set(tuned)
    moved = sum((tuned[k] - start[k]).abs().sum() for k in start)
    assert 0 < moved < sum(start[k].abs().sum() for k in start) * 0.1  # started there, then trained a little
    for setting, value, refusal in (("channels", 3, "set data.channels=1"), ("resolution", 16, "set data.resolution=8")):
        wrong = copy.deepcopy(config)
        setattr(wrong.data, setting, value)
        with pytest.raises(ConfigError, match=refusal):  # read from the UNet's config.json, before a run folder
            train(wrong, runs_root=tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()
    config.data.channels, config.model.pretrained = 1, "no-such-user/no-such-unet"  # tests run offline
    with pytest.raises(ConfigError, match="cannot fetch model.pretrained='no-such-user/no-such-unet' from the Hugging Face Hub"):
        train(config, runs_root=tmp_path / "hub")


def test_drift_telemetry_measures_the_proxies_real_weights(tmp_path):
    """A 2-round run with K = 2: per round, each proxy's drift from the round's start and their
    distance apart agree with the saved averages (|avg - start|^2 = a d0^2 + b d1^2 - ab D01^2);
    the probe losses are reproducible from the run's seed; the run folder keeps them."""
    config = tiny_config("iet", rounds=2, local_steps=4, keep_checkpoints=3)
    events = []
    run = train(config, runs_root=tmp_path / "runs", sinks=[events.append])
    drift = [e for e in events if isinstance(e, DriftEvent)]
    weights = [e.weights for e in events if isinstance(e, RoundEvent)]
    assert [e.round for e in drift] == [0, 1]
    assert run.status()["shard_split"] == "class"  # digits have labels: the reference's class-balanced shards

    torch.manual_seed(config.train.seed)  # the trainer's initial weights
    flat = lambda unet: torch.cat([p.detach().reshape(-1) for p in unet.parameters()]).double()
    starts = [flat(build_unet(config.model, 8, 1))] + [flat(run.load_unet(ema=False, checkpoint=c)) for c in run.checkpoints()]
    for event, (a, b), start, end in zip(drift, weights, starts, starts[1:]):
        d0, d1 = event.drift
        distance = event.distances[0][1]
        assert event.distances[1][0] == distance and event.distances[0][0] == 0 and distance > 0
        assert abs(d0 - d1) <= distance <= d0 + d1  # triangle through the round's start
        expected = (a * d0**2 + b * d1**2 - a * b * distance**2) ** 0.5
        assert abs((end - start).norm().item() - expected) < 1e-4 * expected
        assert event.start_norm == pytest.approx(start.norm().item(), rel=1e-6)

    trainer = prepare_trainer(run, resume=True)  # a fresh trainer draws the same probe batches
    np.testing.assert_allclose(trainer._probe_losses(trainer.global_weights[None])[0].numpy(), drift[-1].average_loss, rtol=1e-5)
    trainer.writer_lock.release()
    logged = run.drift()
    assert len(logged) == 4 and np.allclose(logged["loss_on_1"], [row[1] for e in drift for row in e.probe_loss])
    assert np.allclose(logged["distance_to_others"], [e.distances[0][1] for e in drift for _ in range(2)])
    # The run's history reads them back as the events that wrote them.
    assert [e for e in run.read_events() if isinstance(e, DriftEvent)] == drift
    pd.testing.assert_frame_equal(RunHistory.from_run(run).drift(), logged)


def test_each_proxy_warms_up_from_lr_zero_over_a_share_of_its_first_round(tmp_path):
    config = tiny_config("iet", rounds=2, local_steps=5, warmup_steps=None, warmup_share=0.4, lr=1e-3)
    run = train(config, runs_root=tmp_path / "runs")
    metrics = run.metrics()
    for (round_, proxy), part in metrics.groupby(["round", "proxy"]):
        expected = [0.0, 0.5e-3, 1e-3, 1e-3, 1e-3] if round_ == 0 else [1e-3] * 5  # 40% of 5 local steps
        np.testing.assert_allclose(part.sort_values("local_step")["lr"], expected, rtol=1e-6)


def test_a_run_reports_to_tensorboard_when_asked(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config("iet-agc", rounds=2, trackers=["tensorboard"])
    run = train(config, runs_root=tmp_path / "runs")
    folders = {p.parent for p in (run.path / "tensorboard").rglob("events.out.tfevents.*")}
    logged = {}
    for folder in folders:
        events = EventAccumulator(str(folder))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            logged[tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    steps = run.metrics()
    assert [s for s, _ in logged["train/loss"]] == steps["global_step"].tolist()
    assert np.allclose([v for _, v in logged["train/loss"]], steps["loss"], rtol=1e-5)
    assert len(logged["round/skip_rate"]) == 2


def test_no_tracker_by_default_and_unknown_ones_are_refused(tmp_path):
    run = train(tiny_config("ddpm", rounds=1), runs_root=tmp_path / "runs")
    assert not (run.path / "tensorboard").exists()
    with pytest.raises(ConfigError, match="train.trackers"):
        tiny_config("ddpm", trackers=["neptune"]).validate()


def reference_error(config, run, shard_of, images):
    """The relative distance of a run's one-round weights from the plain reference round's,
    and the reference's banks and skip counts."""
    from iet_core.reference import reference_round

    initial = run.build_unet(seed=config.train.seed)
    start = torch.cat([p.detach().reshape(-1) for p in initial.state_dict().values()])
    expected, banks, skips = reference_round(initial, images, shard_of, config)
    ours = run.load_checkpoint()[0]["model"]
    theirs = torch.cat([expected[name].reshape(-1) for name in initial.state_dict()])
    error = (torch.cat([ours[name].reshape(-1) for name in initial.state_dict()]) - theirs).norm() / (theirs - start).norm()
    return error.item(), banks, skips


def reference_config(**train):
    config = tiny_config("iet-agc", rounds=1, local_steps=3, hflip=True, **train)
    config.method.num_shards = 4
    config.model.num_train_timesteps = 4  # banks fill within a few steps, so AGC skips
    config.method.agc.skip_lambda = 1.0
    config.method.agc.bank_decay = 0.0  # the bank is the last loss at t: about half the visits are skipped
    return config


@pytest.mark.parametrize("execution", ["sequential", "batched"])
def test_a_round_matches_the_plain_reference_round(tmp_path, execution):
    config = reference_config(execution=execution)
    run, dataset = create_run(config, tmp_path / "runs")
    trainer = Trainer(run, dataset)
    shard_of = trainer.shard_of.copy()
    assert trainer.fit() == "finished"
    error, banks, skips = reference_error(config, run, shard_of, dataset.to_model_space())
    assert error < 1e-2, error  # rounding only (Adam magnifies it where a gradient is near zero)
    state = run.load_checkpoint()[0]["state"]
    torch.testing.assert_close(state["banks"], banks, rtol=1e-4, atol=1e-6)
    assert skips.sum() > 0 and torch.equal(state["skips"].sum(0), skips)


def test_checkpoints_carry_the_model_config_and_older_ones_still_load(tmp_path, monkeypatch):
    from iet_core.config import MODEL_PRESETS

    run = train(tiny_config("ddpm", rounds=1), runs_root=tmp_path)
    checkpoint = run.latest_checkpoint()
    expected = run.load_unet(ema=False).state_dict()
    # A preset changed since: the checkpoint's own config still rebuilds the trained model.
    monkeypatch.setitem(MODEL_PRESETS, "tiny", {**MODEL_PRESETS["tiny"], "layers_per_block": 2})
    assert all(torch.equal(expected[k], v) for k, v in run.load_unet(ema=False).state_dict().items())
    monkeypatch.undo()
    # A checkpoint written before checkpoints carried the config: rebuilt from the run's preset.
    (checkpoint / "unet_config.json").unlink()
    assert run.unet_config() is None
    assert all(torch.equal(expected[k], v) for k, v in run.load_unet(ema=False).state_dict().items())
    train(run=run, resume=True)  # and a run with one resumes

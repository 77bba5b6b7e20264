"""Crashes, full disks, hostile files and random settings: nothing saved is lost, and every
failure is a clear error of the intended type."""
import io
import json
import os
import resource
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import random_images, tiny_config, wait_until
from iet_core import ConfigError, RunConfig, Run, Trainer, train
from iet_core.config import DataConfig
from iet_core.data import DataError, load_dataset
from iet_core.runs import CheckpointWriteError
from iet_core.telemetry import CheckpointEvent
from iet_core.train import create_run

REPO = Path(__file__).resolve().parents[1]

# Runs the real trainer on an existing run folder; with "slow-checkpoint" the second checkpoint
# pauses half-written (after its first file) and announces it, so the test can kill it there.
TRAIN_SCRIPT = """
import signal, sys
from pathlib import Path
import iet_core.runs as runs
from iet_core import Run, train

run_dir, mode, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
if mode == "slow-checkpoint":
    save_file, calls = runs.save_file, []
    def save_then_stall(tensors, path):
        save_file(tensors, path)
        calls.append(path)
        if "ckpt-000000008" in path:
            marker.write_text(path)
            signal.pause()  # stall half-written until the test kills this process
    runs.save_file = save_then_stall
train(run=Run.open(run_dir), resume=True)
"""


def crash_config():
    config = tiny_config("iet-agc+", rounds=3, local_steps=2, log_every=1)  # checkpoints at steps 4, 8, 12
    config.method.msr.threshold = 0.2
    config.method.msr.min_visits = 1
    config.method.agc.skip_lambda = 0.9
    return config


def assert_same_final_weights(a: Run, b: Run):
    (ga, ma), (gb, mb) = a.load_checkpoint(), b.load_checkpoint()
    assert ma["global_step"] == mb["global_step"] == 12
    for stem in ("model", "ema", "state"):
        for name in ga[stem]:
            assert torch.equal(ga[stem][name].nan_to_num(), gb[stem][name].nan_to_num()), (stem, name)


@pytest.mark.parametrize("where", ["mid-step", "mid-checkpoint"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, where):
    config = crash_config()
    straight = train(config, runs_root=tmp_path / "straight")
    run, _ = create_run(config, tmp_path / "killed")
    marker = tmp_path / "marker"
    script = tmp_path / "train_script.py"
    script.write_text(TRAIN_SCRIPT)
    # Same thread count as this process: float sums are only bit-identical with the same split.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    mode = "slow-checkpoint" if where == "mid-checkpoint" else "plain"
    process = subprocess.Popen([sys.executable, str(script), str(run.path), mode, str(marker)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    def reached() -> bool:
        if where == "mid-checkpoint":
            return marker.exists()
        return len(run.metrics()) >= 6 and run.latest_checkpoint() is not None  # inside round 2, after round 1's checkpoint

    try:
        wait_until(lambda: process.poll() is not None or reached(), timeout=300, what=f"the trainer to reach {where}")
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert run.latest_checkpoint().name == "ckpt-000000004"
    if where == "mid-checkpoint":
        assert list(run.checkpoint_root.glob(".tmp-ckpt-000000008-*")), "expected a half-written checkpoint"
    train(run=Run.open(run.path), resume=True)
    assert run.status()["state"] == "finished"
    assert not list(run.checkpoint_root.glob(".tmp-*"))
    assert_same_final_weights(straight, run)
    assert run.metrics()["global_step"].tolist() == list(range(12))


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    run, dataset = create_run(tiny_config("ddpm", rounds=3), tmp_path)
    trainer = Trainer(run, dataset)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit_file_size(event):  # after the first checkpoint, no file may grow past 200 kB
        if isinstance(event, CheckpointEvent):
            resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))

    trainer.sinks.append(limit_file_size)
    try:
        with pytest.raises(CheckpointWriteError, match="could not write checkpoint ckpt-000000006.*ckpt-000000003 is intact"):
            trainer.fit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert run.status()["state"] == "failed"
    assert run.latest_checkpoint().name == "ckpt-000000003"
    assert not list(run.checkpoint_root.glob(".tmp-*"))
    train(run=Run.open(run.path), resume=True)  # with space again, it carries on
    assert run.status()["state"] == "finished"


def _png(array, **save):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def test_hostile_images_are_rejected_with_reasons_and_good_ones_kept(tmp_path):
    good = random_images(3, size=8)
    folder = tmp_path / "upload"
    folder.mkdir()
    for i, array in enumerate(good):
        (folder / f"good{i}.png").write_bytes(_png(array))
    (folder / "truncated.png").write_bytes(_png(random_images(1, size=64)[0])[:200])
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")  # 144 Mpixel in a few kB
    (folder / "bomb.png").write_bytes(bomb.getvalue())
    (folder / "script.png").write_bytes(b"#!/bin/sh\nrm -rf /\n")
    (folder / "wide.png").write_bytes(_png(random_images(1, size=40)[0][:10]))  # 10x40: centre-cropped
    (folder / "tiny.png").write_bytes(_png(random_images(1, size=3)[0]))  # 3x3: upsampled
    dataset = load_dataset(DataConfig(source=str(folder), resolution=8, channels=1, subset=None))
    assert len(dataset) == 5 and dataset.images.shape[1:] == (1, 8, 8)
    reasons = dict(dataset.rejected)
    assert "pixel limit" in reasons["bomb.png"]
    assert "not a readable image" in reasons["truncated.png"] and "not a readable image" in reasons["script.png"]


def test_zip_bomb_is_refused_before_extraction(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for i in range(3):
            archive.writestr(f"{i}.png", b"\0" * 1000)
        for info in archive.infolist():  # the directory says 800 MiB each, as a real bomb's would
            info.file_size = 800 * 2**20
    # Refused by what the directory says (2.3 GiB): a loader that inflated first would find 3 kB.
    with pytest.raises(DataError, match="unpacks to 2.3 GiB, over the 2 GiB limit"):
        load_dataset(DataConfig(source=str(path)))


def test_too_few_images_for_the_shards(tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for i, array in enumerate(random_images(3, size=8)):
        (folder / f"{i}.png").write_bytes(_png(array))
    config = tiny_config("iet-agc")
    config.data.source, config.data.subset, config.method.num_shards = str(folder), None, 4
    with pytest.raises(ConfigError, match="num_shards=4 is larger than the dataset \\(3 images\\)"):
        train(config, runs_root=tmp_path / "runs")


def test_pretrained_folder_is_checked_before_loading(tmp_path):
    from iet_core.models import load_pretrained_unet

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 1}))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"pickled")
    with pytest.raises(ConfigError, match="pickled .bin weights are not loaded"):
        load_pretrained_unet(str(folder), 8, 1)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a UNet2DModel"):
        load_pretrained_unet(str(folder), 8, 1)


def _valid_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, array in enumerate(random_images(2, size=8)):
            archive.writestr(f"d/{i}.png", _png(array))
    return buffer.getvalue()


VALID_ZIP = _valid_zip()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=2000),
                      st.tuples(st.integers(0, len(VALID_ZIP) - 1), st.binary(min_size=1, max_size=16)).map(
                          lambda cut: VALID_ZIP[:cut[0]] + cut[1] + VALID_ZIP[cut[0] + len(cut[1]):])))
def test_fuzzed_archives_load_or_fail_with_a_data_error(tmp_path, data):
    path = tmp_path / "fuzz.zip"
    path.write_bytes(data)
    try:
        dataset = load_dataset(DataConfig(source=str(path), resolution=8, channels=1, subset=None))
    except DataError:
        return
    assert dataset.images.dtype == torch.uint8 and len(dataset) >= 1


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=2))
SECTION_KEYS = {section: list(value) for section, value in RunConfig().to_dict().items() if isinstance(value, dict)}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(SECTION_KEYS) + ["name", "bogus"]),
                       st.one_of(SCALARS, st.dictionaries(st.sampled_from(sum(SECTION_KEYS.values(), []) + ["agc", "msr", "taa", "x"]),
                                                          st.one_of(SCALARS, st.dictionaries(st.text(max_size=10), SCALARS, max_size=3)),
                                                          max_size=6)),
                       max_size=5))
def test_fuzzed_configs_validate_or_fail_with_a_config_error(tree):
    try:
        config = RunConfig.from_dict(tree).validate(num_images=64)
    except ConfigError:
        return
    assert RunConfig.from_json(config.to_json()) == config  # what validates, round-trips

"""Round two of the attacker's findings (issue 15): one test per finding, each failing before
its fix. Servers read only allowed data, bound every number and never reveal their paths; a
run folder has one writer."""
import io
import os
import resource
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import random_images, tiny_config, wait_until
from iet_core import ConfigError, Run, RunConfig, train
from iet_core.config import DataConfig
from iet_core.data import DataError, SourcePolicy, load_dataset
from iet_core.runs import RunBusy
from iet_core.train import create_run

REPO = Path(__file__).resolve().parents[1]


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_folder(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i, array in enumerate(random_images(count, size=8)):
        (folder / f"{i}.png").write_bytes(_png(array))
    return folder


@pytest.mark.parametrize("setting, value", [
    ("train.rounds", 1e300), ("train.rounds", 10**9), ("data.subset", 1e30), ("method.num_shards", 10**6),
    ("train.seed", 2**70), ("train.local_steps", 10**12), ("model.beta_schedule", "bogus"),
    ("train.device", "gpu7"), ("eval.num_samples", 10**6), ("eval.steps", 10**4), ("train.lr", "nan"),
    ("model.num_train_timesteps", 10**8), ("train.warmup_steps", 10**300),
])
def test_every_number_is_bounded_and_every_name_checked_before_a_run_exists(tmp_path, setting, value):
    tree = tiny_config("iet").to_dict()
    section, leaf = setting.split(".")
    tree[section][leaf] = value
    with pytest.raises(ConfigError, match=leaf):
        create_run(RunConfig.from_dict(tree), tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_a_missing_gpu_is_refused_before_a_run_exists(tmp_path):
    config = tiny_config("ddpm", device="cuda:99")
    with pytest.raises(ConfigError, match="cuda:99"):
        create_run(config, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_a_server_reads_only_builtins_hub_ids_and_its_admins_folders(tmp_path):
    allowed = _image_folder(tmp_path / "data" / "faces")
    secret = _image_folder(tmp_path / "private")
    (allowed / "escape.png").symlink_to(secret / "0.png")
    (tmp_path / "data" / "out").symlink_to(secret)
    policy = SourcePolicy.allowing(tmp_path / "data")
    assert len(load_dataset(DataConfig(source=str(allowed), resolution=8, subset=None), policy)) == 3
    refusals = set()
    for source in (str(secret), str(tmp_path / "missing"), f"hf:{secret}", f"hf:{tmp_path / 'missing'}", "hf:../../etc",
                   "hf:/etc", "hf:~/x", "hf:owner/name/extra", "hf:owner/..", "/etc/passwd", str(tmp_path / "data" / "out"),
                   str(tmp_path / "data" / ".." / "private")):
        with pytest.raises(DataError) as refused:
            load_dataset(DataConfig(source=source), policy)
        refusals.add(str(refused.value).replace(repr(source), "SOURCE"))
    assert len(refusals) == 1, refusals  # existing and missing paths read the same
    policy.check("hf:uoft-cs/cifar10")
    policy.check("digits")


def test_a_folder_link_to_a_file_outside_the_folder_is_rejected(tmp_path):
    folder = _image_folder(tmp_path / "images")
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(random_images(1, size=8)[0]))
    (folder / "link.png").symlink_to(outside)
    dataset = load_dataset(DataConfig(source=str(folder), resolution=8, subset=None))
    assert len(dataset) == 3 and dict(dataset.rejected)["link.png"] == "a link to a file outside the folder"


def test_errors_name_no_server_path_object_repr_or_csv_header(tmp_path):
    folder = tmp_path / "deep" / "server" / "tables"
    folder.mkdir(parents=True)
    (folder / "users.csv").write_text("user,password\nalice,hunter2\n")
    with pytest.raises(DataError) as loaded:
        load_dataset(DataConfig(source=f"hf:{folder}"))
    assert "password" not in str(loaded.value)
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("good.png", _png(random_images(1, size=8)[0]))
        handle.writestr("junk.png", b"not an image at all")
    dataset = load_dataset(DataConfig(source=str(archive), resolution=8, subset=None))
    assert dict(dataset.rejected)["junk.png"] == "not a readable image (unknown format or a damaged file)"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as no_images:
        load_dataset(DataConfig(source=str(empty)))
    assert str(tmp_path) not in str(no_images.value).replace(repr(str(empty)), "")


def test_npz_values_out_of_range_and_empty_arrays_are_refused(tmp_path):
    negative = tmp_path / "negative.npz"
    np.savez(negative, images=np.full((4, 8, 8), -5, np.int16))
    with pytest.raises(DataError, match="values run from -5"):
        load_dataset(DataConfig(source=str(negative), resolution=8, subset=None))
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(DataError, match="empty"):
        load_dataset(DataConfig(source=str(empty), resolution=8, subset=None))
    deep = tmp_path / "deep.npz"
    np.savez(deep, images=np.full((2, 8, 8), 65535, np.uint16))  # 16-bit images scale, as PIL's do
    assert load_dataset(DataConfig(source=str(deep), resolution=8, subset=None)).images.max() == 255


def test_many_large_images_in_a_small_archive_hit_the_dataset_pixel_budget(tmp_path):
    big = io.BytesIO()
    Image.new("L", (6000, 6000)).save(big, format="PNG")  # 36 Mpixel, under the per-image limit
    archive = tmp_path / "heavy.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for i in range(8):
            handle.writestr(f"{i}.png", big.getvalue())
    dataset = load_dataset(DataConfig(source=str(archive), resolution=8, subset=None))
    refused = [reason for _, reason in dataset.rejected if "limit per dataset" in reason]
    assert len(dataset) == 6 and len(refused) == 2


HOLD_LOCK = """
import signal, sys
from iet_core.runs import Run
Run.open(sys.argv[1]).writer_lock("the command line").acquire()
print("locked", flush=True)
signal.pause()  # hold the lock until the test kills this process
"""


def test_one_writer_per_run_and_a_killed_holder_leaves_no_lock(tmp_path):
    run = train(tiny_config("ddpm", rounds=1), runs_root=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run.path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run.describe_writer().startswith(f"the command line (pid {holder.pid} on ")
        with pytest.raises(RunBusy, match=f"being trained by the command line \\(pid {holder.pid}"):
            train(run=Run.open(run.path), resume=True)
        assert run.status()["state"] == "finished"  # the refused trainer touched nothing
        refused = subprocess.run([sys.executable, "-m", "iet_core", "resume", str(run.path), "--quiet"], env=env,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "being trained by the command line" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run.describe_writer() is None  # the killed holder's record is recognised as stale
    train(run=Run.open(run.path), resume=True)
    assert run.describe_writer() is None  # released when training ended


def test_a_resumed_writer_removes_what_a_killed_writer_left_half_written(tmp_path):
    run = train(tiny_config("ddpm", rounds=1), runs_root=tmp_path)
    stale = [run.checkpoint_root / ".LATEST.k1ll3d.tmp", run.path / ".status.json.k1ll3d.tmp"]
    for path in stale:
        path.write_text("half")
    train(run=Run.open(run.path), resume=True)
    assert not any(path.exists() for path in stale)


def _ignore_file_size_signal():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))


def test_a_full_disk_gives_the_command_line_a_clear_message(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "iet_core", "train", "--runs-dir", "runs", "--quiet"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, preexec_fn=_ignore_file_size_signal)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "error: the disk is full (or a size limit was reached)" in done.stderr
    assert not any((tmp_path / "runs").iterdir())  # no half-made run folder is left


def test_the_evaluation_gate_runs_one_keeps_a_short_line_and_one_place_per_owner():
    import threading

    from iet_core.evaluate import EvaluationBusy, EvaluationGate
    from iet_core.sample import Cancelled

    gate = EvaluationGate(running=1, waiting=1)
    release, entered, left = threading.Event(), threading.Event(), threading.Event()

    def first():
        with gate.slot("owner-a"):
            entered.set()
            release.wait(60)

    def second():
        try:
            with gate.slot("owner-b", cancelled=left.is_set):
                pass
        except Cancelled:
            pass

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert entered.wait(60)
    threads[1].start()
    wait_until(lambda: gate.queued == 1, timeout=60, what="owner b to wait in line")
    with pytest.raises(EvaluationBusy, match="already have an evaluation"):
        with gate.slot("owner-a"):
            pass
    with pytest.raises(EvaluationBusy, match="the server is busy"):
        with gate.slot("owner-c"):
            pass
    left.set()  # owner b's client goes away: it gives up its place
    threads[1].join(60)
    assert gate.queued == 0 and gate.active == 1
    release.set()
    threads[0].join(60)
    assert gate.active == 0
    gate.close()  # the server stops: an evaluation arriving after that does not start
    with pytest.raises(Cancelled, match="the server is stopping"):
        with gate.slot("owner-d"):
            pass

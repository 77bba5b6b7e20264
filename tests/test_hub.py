"""Hub ids (owner/name) are only ever fetched from the Hub, never read from a local folder of
that name: every loader answers alike whether such a folder exists, and loads the Hub's
snapshot when it has one. Tests run offline, so "the Hub" is its cache, filled here."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from iet_core.config import ConfigError, DataConfig
from iet_core.data import DataError, SourcePolicy, load_dataset
from iet_core.features import load_clip_scorer, load_feature_extractor
from iet_core.hub import MODEL_FILES
from iet_core.models import load_pretrained_unet
from iet_core.text2image.model import load_components
from iet_core.text2image.tiny import build_tiny_clip, build_tiny_pipeline

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache for this test, and a server's working directory in which visitors'
    ids may name local folders."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir((tmp_path / "cwd").mkdir() or tmp_path / "cwd")
    return tmp_path / "hub-cache"


def cached_snapshot(cache: Path, repo_id: str, repo_type: str = "model") -> Path:
    """The folder a Hub download of repo_id would fill, registered as its main revision."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


def tiny_dataset(folder: Path, count: int):
    images = np.random.default_rng(count).integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
    return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images],
                                       "text": [f"image {i}" for i in range(count)]})


LOADERS = {  # each visitor-supplied model or data source, and what loads it
    "model.pretrained (text-to-image)": (build_tiny_pipeline, load_components),
    "model.pretrained (UNet)": (build_tiny_pipeline, lambda id: load_pretrained_unet(id, 16, 4)),
    "text2image.feature_extractor": (build_tiny_clip, lambda id: load_feature_extractor(id, "cpu")),
    "text2image.clip_model": (build_tiny_clip, lambda id: load_clip_scorer(id, "cpu")),
    "data.source": (lambda folder: tiny_dataset(folder, 3).save_to_disk(str(folder)),
                    lambda id: load_dataset(DataConfig(source=f"hf:{id}", resolution=8, channels=3, subset=None))),
}


@pytest.mark.parametrize("setting", LOADERS)
def test_a_hub_id_reads_alike_whether_a_local_folder_of_that_name_exists(hub_cache, setting):
    build, load = LOADERS[setting]
    build(Path("owner/name"))  # a real model or dataset, in the server's working directory
    with pytest.raises(ConfigError) as with_folder:
        load("owner/name")
    shutil.rmtree("owner")
    with pytest.raises(ConfigError) as without:
        load("owner/name")
    assert str(with_folder.value) == str(without.value)
    assert "from the Hugging Face Hub" in str(without.value) and str(hub_cache.parent) not in str(without.value)


def test_a_hub_id_loads_the_hubs_snapshot_not_the_local_folder_of_that_name(hub_cache):
    build_tiny_pipeline(Path("owner/sd"), seed=1)
    hub = build_tiny_pipeline(cached_snapshot(hub_cache, "owner/sd"), seed=0)
    weights = load_components("owner/sd").unet.state_dict()
    local = load_components("./owner/sd").unet.state_dict()  # written as a path, the local folder
    assert all(torch.equal(weights[k], v) for k, v in load_components(str(hub)).unet.state_dict().items())
    assert not all(torch.equal(weights[k], v) for k, v in local.items())
    tiny_dataset(Path("owner/set"), 2).save_to_disk("owner/set")
    snapshot = cached_snapshot(hub_cache, "owner/set", "dataset")
    (snapshot / "data").mkdir(parents=True)
    tiny_dataset(snapshot, 5).to_parquet(str(snapshot / "data" / "train-00000-of-00001.parquet"))
    config = DataConfig(source="hf:owner/set", resolution=8, channels=3, subset=None, caption_column="text")
    assert load_dataset(config).captions == [f"image {i}" for i in range(5)]


def test_only_configs_tokenizers_and_safetensors_weights_are_fetched():
    """A Stable Diffusion repository as the Hub lists it: what a Hub id's snapshot downloads."""
    files = ["model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
             "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
             "scheduler/scheduler_config.json", "pipeline.py", "big/model-00001-of-00002.safetensors"]
    assert sorted(filter_repo_objects(files, allow_patterns=list(MODEL_FILES))) == sorted([
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json", "big/model-00001-of-00002.safetensors"])


def test_a_server_allows_hub_ids_whatever_its_folders_hold_unless_its_admin_turns_the_hub_off(hub_cache, tmp_path):
    build_tiny_pipeline(Path("owner/name"))
    allowing, closed = SourcePolicy.allowing(tmp_path / "data"), SourcePolicy.allowing(tmp_path / "data", hub=False)
    refusals = set()
    for exists in (True, False):
        allowing.check_model("owner/name")
        allowing.check_feature_extractor("owner/name")
        allowing.check("hf:owner/name")
        for check, source in ((closed.check_model, "owner/name"), (closed.check_feature_extractor, "owner/name"),
                              (closed.check, "hf:owner/name")):
            with pytest.raises(DataError) as refused:
                check(source)
            refusals.add(str(refused.value).split(": ", 1)[1])
        shutil.rmtree("owner", ignore_errors=True)
    assert refusals == {"this server does not download from the Hugging Face Hub (its admin turned it off): use a "
                        "built-in dataset, upload images, or choose one of the models this server offers."}
    closed.check("digits")


def test_an_admin_turns_hub_downloads_off_for_visitors_and_the_cli_is_unaffected(tmp_path, monkeypatch):
    import app
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from helpers import tiny_config
    from iet_core.train import create_run

    for environment, default in (({}, True), ({"SPACE_ID": "someone/space"}, False),
                                 ({"SPACE_ID": "someone/space", "IET_HUB": "1"}, True), ({"IET_HUB": "off"}, False)):
        for name in ("SPACE_ID", "IET_HUB"):
            monkeypatch.delenv(name, raising=False)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        assert app.default_hub() is default, environment
    demo, ctx = app.build_app(tmp_path / "runs", hub=False)
    _, url, _ = app.launch(demo, ctx, prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    try:
        client = Client(url, verbose=False)
        for section, setting, value in (("data", "source", "hf:owner/name"), ("model", "pretrained", "owner/name")):
            tree = tiny_config("ddpm").to_dict()
            tree[section][setting] = value
            with pytest.raises(AppError, match=f"^{section}.{setting}='{value}': this server does not download from "
                                               "the Hugging Face Hub"):
                client.predict(json.dumps(tree), "owner-token-1234567", api_name="/start_run")
        assert not [p for p in ctx.runs_root.iterdir() if p.is_dir() and p.name != "datasets"]  # no run folder
        sources = [c for c in demo.config["components"] if c.get("props", {}).get("label") == "Source"]
        assert sources and all("Hugging Face" not in str(c["props"]["choices"]) for c in sources)
    finally:
        ctx.jobs.shutdown(timeout=60)
        demo.close()
    config = tiny_config("ddpm")
    config.data.source = "hf:owner/name"  # a local user's run fetches from the Hub (offline here: says so)
    with pytest.raises(DataError, match="cannot fetch data.source='owner/name' from the Hugging Face Hub"):
        create_run(config, tmp_path / "cli-runs")


def test_with_the_hub_off_a_run_naming_hub_ids_is_not_resumed_or_measured_but_its_owner_may_delete_it(tmp_path):
    from helpers import tiny_config
    from iet_core.jobs import JobManager
    from iet_core.owners import JobError, owner_digest
    from iet_core.runs import Run

    config = tiny_config("ddpm")
    config.data.source = "hf:owner/name"  # made while the server allowed the Hub
    run = Run.create(tmp_path / "runs", config)
    run.write_owner(owner_digest("owner-token-1234567"))
    jobs = JobManager(tmp_path / "runs", sources=SourcePolicy.allowing(hub=False))
    with pytest.raises(DataError, match="^data.source='owner/name': this server does not download from the Hugging Face Hub"):
        jobs.resume(run.id, "owner-token-1234567")
    with pytest.raises(DataError, match="this server does not download from the Hugging Face Hub"):
        jobs.check_owner(run.id, "owner-token-1234567", "evaluate")
    with pytest.raises(JobError, match="only its owner can evaluate it"):  # ownership first: a stranger learns nothing more
        jobs.check_owner(run.id, "someone-else-7654321", "evaluate")
    jobs.delete(run.id, "owner-token-1234567")
    assert not run.path.exists()

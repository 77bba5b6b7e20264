"""Text-to-image fine-tuning through the app: captioned uploads kept with their captions, base
models and feature extractors only from the admin's model folders (or Hub ids), a LoRA IET-AGC
run started the Train page's way on a tiny Stable Diffusion pipeline built from configs."""
from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from iet_core.config import ConfigError, DataConfig
from iet_core.data import DataError, SourcePolicy, load_dataset
from iet_core.evaluate import load_eval
from iet_core.features import PIXEL_MEASURE
from iet_core.text2image.tiny import build_tiny_clip, build_tiny_pipeline
from pages import common, data, memorization, monitor, train
from test_text2image import png


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An admin's model folder holding one tiny pipeline (few timesteps: AGC's bank fills fast)."""
    folder = tmp_path_factory.mktemp("models")
    build_tiny_pipeline(folder / "tiny-sd", num_train_timesteps=10)
    build_tiny_clip(folder / "tiny-clip")
    return folder


def test_an_npz_keeps_captions_in_a_named_array(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=images, text=np.array(["a red cube", "two balls", "a tree"]))
    config = DataConfig(source=str(tmp_path / "set.npz"), resolution=8, channels=3, subset=None, caption_column="text")
    assert load_dataset(config).captions == ["a red cube", "two balls", "a tree"]
    config.caption_column = "prompt"
    with pytest.raises(DataError, match="no 'prompt' array of captions"):
        load_dataset(config)
    np.savez(tmp_path / "set.npz", images=images, text=np.array(["a red cube", " ", "a tree"]))
    with pytest.raises(DataError, match="no caption"):
        load_dataset(DataConfig(source=str(tmp_path / "set.npz"), resolution=8, channels=3, caption_column="text"))


def test_models_come_from_the_admins_model_folders_only(tmp_path, model_dir):
    data = tmp_path / "data"
    (data / "pipeline").mkdir(parents=True)
    policy = SourcePolicy.allowing(data, models=(model_dir,))
    assert policy.offered_models() == {name: (model_dir / name).resolve() for name in ("tiny-clip", "tiny-sd")}
    policy.check_model(str(model_dir / "tiny-sd"))
    policy.check_model("owner/name")
    policy.check_feature_extractor(None)
    policy.check_feature_extractor(str(model_dir / "tiny-clip"), "text2image.clip_model")
    refusals = set()
    for path in (str(data / "pipeline"), str(tmp_path / "missing"), str(model_dir / ".." / "elsewhere"), "/etc"):
        with pytest.raises(DataError) as refused:
            policy.check_model(path)  # a data folder is not a model folder
        refusals.add(str(refused.value).replace(repr(path), "PATH"))
    assert len(refusals) == 1 and "not available on this server" in refusals.pop()
    with pytest.raises(DataError, match="feature_extractor='/etc/passwd' is not available"):
        policy.check_feature_extractor("/etc/passwd")


OWNER = "owner-token-for-fine-tunes"


def captioned_zip(path, count: int = 4):
    """imagefolder layout (metadata.jsonl) and one .txt caption, plus one image whose file is broken."""
    lines = [json.dumps({"file_name": f"{i}.png", "text": f"a photo of thing {i}"}) for i in range(count - 1)]
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"set/{i}.png", png(i))
        archive.writestr(f"set/{count - 1}.txt", f"a photo of thing {count - 1}")
        archive.writestr("set/broken.png", b"not an image")
        archive.writestr("set/broken.txt", "a caption for a broken file")
        archive.writestr("set/metadata.jsonl", "\n".join(lines))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    """The app with the admin's model folder, launched in-process: (url, context)."""
    import app

    demo, ctx = app.build_app(tmp_path_factory.mktemp("runs"), model_dirs=(model_dir,))
    _, url, _ = app.launch(demo, ctx, prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    try:
        yield url, ctx
    finally:
        ctx.evaluations.close()
        ctx.jobs.shutdown(timeout=60)
        demo.close()


def test_a_captioned_zip_upload_keeps_its_captions_and_lists_the_bad_entry(tmp_path):
    config, rejected = data.persist_upload([str(captioned_zip(tmp_path / "set.zip"))], tmp_path / "runs", 16, 1)
    assert config.caption_column == data.CAPTIONS and config.channels == 3  # captions go with colour images
    assert dict(rejected) == {"set/broken.png": "not a readable image (unknown format or a damaged file)"}
    dataset = load_dataset(config)
    assert dataset.captions == [f"a photo of thing {i}" for i in range(4)] and dataset.images.shape == (4, 3, 16, 16)
    assert "4 images" in data.data_summary(dataset, config) and "captioned" in data.data_summary(dataset, config)
    assert [caption for _, caption in data.captioned_gallery(dataset)["value"]] == dataset.captions
    assert str(tmp_path) not in data.source_label(config)
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as archive:  # a README is not a caption
        archive.writestr("a.png", png(0))
        archive.writestr("README.txt", "unlabelled images")
    plain, rejected = data.persist_upload([str(tmp_path / "plain.zip")], tmp_path / "runs", 16, 1)
    assert plain.caption_column is None and plain.channels == 1 and dict(rejected)["README.txt"].startswith("not an image")


def fine_tune_form(**changes) -> dict:
    """The Train page's values for a tiny LoRA IET-AGC fine-tune of the offered tiny pipeline."""
    values = dict(name="", mode="iet-agc", preset=common.DEMO_PRESET, model=train.TEXT_TO_IMAGE, shards=2, rounds=1,
                  unit="steps", amount=2, batch_size=2, lr=1e-2, seed=0, skip_lambda=0.9, bank_decay=0.0,
                  msr_threshold=0.5, msr_policy="least-skipped", taa_band=0.5, taa_strength=1.0, preview=0,
                  evaluate_after=False, base_model="tiny-sd", hub_model="", lora_rank=4, resolution=16,
                  guidance_scale=1.0, extractor=train.PIXEL_STAND_IN, clip=train.NO_CLIP_SCORE)
    values.update(changes)
    return values


def test_a_lora_fine_tune_started_from_the_train_page_trains_monitors_and_shows_prompts(server, tmp_path):
    url, ctx = server
    client = Client(url, verbose=False)
    upload, _ = data.persist_upload([str(captioned_zip(tmp_path / "set.zip"))], ctx.runs_root, 16, 3)
    session = {"owner": OWNER, "data": dataclasses.asdict(dataclasses.replace(upload, subset=None))}
    message, session, run_id = train.start_run(ctx, session, fine_tune_form(clip="tiny-clip"))
    assert "text-to-image fine-tune" in message
    config = ctx.jobs.run(run_id).config
    assert config.text2image.enabled and config.text2image.lora_rank == 4 and not config.method.taa.enabled
    assert ctx.jobs.wait(run_id, 180) == "finished"
    status = client.predict(run_id, api_name="/run_status")
    assert status["state"] == "finished" and status["mode"] == "iet-agc"
    view = monitor.tick(ctx, run_id, 0.0, False, config.method.agc.skip_lambda, {})  # the Monitor, unchanged
    assert "finished" in view["status"] and len(ctx.jobs.history(run_id).steps()) == 4  # 2 proxies x 2 steps
    assert view["histogram"] is not None
    result = client.predict(run_id, 4, 2, OWNER, api_name="/evaluate_run")
    captions = {f"a photo of thing {i}" for i in range(4)}
    assert len(result["table"]) == 4 and {row["caption"] for row in result["table"]} <= captions
    assert result["summary"]["measure"] == PIXEL_MEASURE and result["summary"]["clip_score"] is not None
    summary, presentation, _, _, gallery, _, _ = memorization.result_view(ctx, run_id, load_eval(ctx.jobs.run(run_id)))
    assert "Similarity above 0.5" in summary and "CLIP score" in summary and "95% interval" in summary and "pixel correlation" in summary
    assert {caption.split(" · ")[0] for _, caption in gallery} <= captions and "a photo of thing" in presentation


def test_a_base_model_path_outside_the_model_folder_is_refused_alike_whether_it_exists_or_not(server, tmp_path, model_dir):
    url, ctx = server
    client = Client(url, verbose=False)
    outside = tmp_path / "outside-sd"
    shutil.copytree(model_dir / "tiny-sd", outside)  # a real pipeline, but not where the admin allows
    before = sorted(p.name for p in ctx.runs_root.iterdir())
    upload, _ = data.persist_upload([str(captioned_zip(tmp_path / "set.zip"))], ctx.runs_root, 16, 3)
    session = {"owner": OWNER, "data": dataclasses.asdict(upload)}
    messages = set()
    for path in (str(outside), str(tmp_path / "missing"), str(model_dir / ".." / "elsewhere"), "/etc"):
        with pytest.raises(DataError) as refused:  # typed on the Train page
            train.start_run(ctx, session, fine_tune_form(hub_model=path))
        messages.add(str(refused.value).replace(repr(path), "PATH"))
        config = train.build_config(upload, pretrained=path, **{k: v for k, v in fine_tune_form().items()
                                                                if k not in ("base_model", "hub_model", "extractor", "clip")})
        with pytest.raises(AppError) as refused:  # a config sent to the API
            client.predict(config.to_json(), OWNER, api_name="/start_run")
        messages.add(str(refused.value).replace(repr(path), "PATH"))
    assert len(messages) == 1 and "not available on this server" in messages.pop()
    with pytest.raises(DataError, match="choose a base model this server offers"):
        train.start_run(ctx, session, fine_tune_form(base_model="../outside-sd"))
    for setting in ("extractor", "clip"):
        with pytest.raises(DataError, match="models this server offers for evaluation"):
            train.start_run(ctx, session, fine_tune_form(**{setting: "/etc/passwd"}))
    tree = json.loads(config.to_json())
    tree["model"]["pretrained"], tree["text2image"]["clip_model"] = str(model_dir / "tiny-sd"), "/etc/passwd"
    with pytest.raises(AppError, match="clip_model='/etc/passwd' is not available on this server"):
        client.predict(json.dumps(tree), OWNER, api_name="/start_run")
    assert sorted(p.name for p in ctx.runs_root.iterdir() if p.name != "datasets") == \
        [name for name in before if name != "datasets"]  # no run folder made


def test_a_hub_id_is_refused_alike_whether_a_same_named_server_folder_exists_and_a_misfit_makes_no_run(
        server, tmp_path, model_dir, monkeypatch):
    from huggingface_hub import constants

    url, ctx = server
    client = Client(url, verbose=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # empty, and offline
    monkeypatch.chdir(tmp_path)  # the server's working directory, where a folder is named like a Hub id
    upload, _ = data.persist_upload([str(captioned_zip(tmp_path / "set.zip"))], ctx.runs_root, 16, 3)
    session = {"owner": OWNER, "data": dataclasses.asdict(upload)}
    runs = lambda: sorted(p.name for p in ctx.runs_root.iterdir() if p.name != "datasets")
    before, messages = runs(), set()
    for exists in (True, False):
        if exists:
            shutil.copytree(model_dir / "tiny-sd", tmp_path / "owner" / "sd")
        with pytest.raises(ConfigError) as refused:  # typed on the Train page
            train.start_run(ctx, session, fine_tune_form(hub_model="owner/sd"))
        messages.add(str(refused.value))
        config = train.build_config(upload, pretrained="owner/sd", **{k: v for k, v in fine_tune_form().items()
                                                                     if k not in ("base_model", "hub_model", "extractor", "clip")})
        with pytest.raises(AppError) as refused:  # a config sent to the API
            client.predict(config.to_json(), OWNER, api_name="/start_run")
        messages.add(str(refused.value))
        shutil.rmtree(tmp_path / "owner", ignore_errors=True)
    assert messages == {"cannot fetch model.pretrained='owner/sd' from the Hugging Face Hub (LocalEntryNotFoundError): "
                        "check the id and the network. A local folder is written as a path, e.g. ./owner/sd."}
    # The offered pipeline is 16 pixels wide: a larger resolution gets its reason, and no run folder
    with pytest.raises(ConfigError, match=r"^data.resolution=32 does not fit this pipeline: use a multiple of 4 pixels up to 16"):
        train.start_run(ctx, session, fine_tune_form(resolution=32))
    assert runs() == before

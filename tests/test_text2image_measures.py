"""Text-to-image evaluation beyond copies (CLIP score, FID), the cached latents and text
embeddings, and the text-to-image experiment runner, on the tiny random pipeline."""
import numpy as np
import pytest
import torch
from test_fid import stand_in_weights  # noqa: F401 (a fixture)
from test_text2image import CAPTIONS, captioned_folder, t2i_config

from iet_core import train
from iet_core.train import create_run, prepare_trainer
from iet_core.config import ConfigError
from iet_core.evaluate import evaluate_run, format_summary
from iet_core.features import load_clip_scorer
from iet_core.text2image.tiny import build_tiny_clip, build_tiny_pipeline


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipeline", num_train_timesteps=10)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_clip_score_is_the_clipped_cosine_of_clip_model_embeddings(clip_folder):
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    scores = load_clip_scorer(str(clip_folder), "cpu")(images, CAPTIONS)
    # by hand, through transformers' own processor and model: 100 * max(cos, 0) per pair
    model, processor = CLIPModel.from_pretrained(str(clip_folder)), CLIPProcessor.from_pretrained(str(clip_folder))
    inputs = processor(text=CAPTIONS, images=[image.permute(1, 2, 0).numpy() for image in images], return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        cosine = model(**inputs).logits_per_image.diagonal() / model.logit_scale.exp()
    expected = 100 * cosine.clamp(min=0).double().numpy()
    assert (cosine > 0).any() and (cosine < 0).any()  # both sides of the clip are exercised
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    with pytest.raises(ConfigError, match="pairs images with prompts"):
        load_clip_scorer(str(clip_folder), "cpu")(images, CAPTIONS[:2])


def test_clip_score_needs_a_clip_model_folder_with_its_tokenizer(tmp_path, clip_folder):
    with pytest.raises(ConfigError, match="no config.json"):
        load_clip_scorer(str(tmp_path))
    (tmp_path / "config.json").write_text((clip_folder / "config.json").read_text())
    with pytest.raises(ConfigError, match="no .safetensors"):
        load_clip_scorer(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes((clip_folder / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="tokenizer"):
        load_clip_scorer(str(tmp_path))


def test_evaluation_reports_clip_score_and_fid_or_says_not_measured(tmp_path, pipeline_folder, clip_folder,
                                                                     stand_in_weights):  # noqa: F811
    data = captioned_folder(tmp_path / "data", count=4)
    run = train(t2i_config(pipeline_folder, data, rounds=1, local_steps=1), runs_root=tmp_path / "runs")
    plain = evaluate_run(run, save=False)
    assert plain.summary["clip_score"] is None and plain.summary["fid"] is None
    text = format_summary(plain.summary)
    assert "CLIP score: not measured: no CLIP model given" in text and "FID: not measured" in text
    plain.table = plain.table.drop(columns="clip_score")  # as evaluations saved before CLIP scores read back
    assert len(plain.per_caption()) == 4

    config = run.config.eval
    config.fid, config.fid_weights, config.fid_dims, config.fid_cache = True, str(stand_in_weights), 64, str(tmp_path / "fid")
    settings = run.config.text2image
    settings.clip_model = str(clip_folder)
    result = evaluate_run(run, config, text2image=settings)
    summary, table = result.summary, result.table
    scorer = load_clip_scorer(str(clip_folder), "cpu")
    np.testing.assert_allclose(table["clip_score"], scorer(result.generated, table["caption"].tolist()), atol=1e-6)
    assert summary["clip_score"] == pytest.approx(table["clip_score"].mean())
    assert summary["clip_score_count"] == 4
    assert summary["clip_score_low"] <= summary["clip_score"] <= summary["clip_score_high"]
    assert summary["clip_score_training"] >= 0 and summary["fid"] >= 0 and summary["fid_dims"] == 64
    text = format_summary(summary)
    assert "CLIP score (CLIP score, clip): " in text and "over 4 generations" in text
    assert "FID (64-d Inception features): " in text and "from 4 generations against 4 training images" in text
    assert "clip_score" in result.per_caption().columns


def test_latents_and_text_embeddings_are_computed_once_and_read_back(tmp_path, pipeline_folder, monkeypatch):
    from diffusers import AutoencoderKL

    encoded = []  # the real VAE encoder, counted
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, *a, **k: encoded.append(len(a[0])) or encode(self, *a, **k))
    data = captioned_folder(tmp_path / "data", count=4)
    config = t2i_config(pipeline_folder, data, rounds=1, local_steps=1)
    config.text2image.input_cache = str(tmp_path / "cache")
    first_run, _ = create_run(config, tmp_path / "runs")
    first = prepare_trainer(first_run)
    assert first.input_sources == {"text_embeddings": "computed", "latents": "computed"} and encoded == [4]
    files = {path.name.split("-")[0]: path for path in (tmp_path / "cache").iterdir()}
    assert set(files) == {"text", "latents"}
    written = {kind: path.stat().st_mtime_ns for kind, path in files.items()}
    assert first.fit() == "finished"

    encoded.clear()
    second = prepare_trainer(create_run(config, tmp_path / "runs")[0])  # a second run on the same data
    resumed = prepare_trainer(first_run, resume=True)
    for trainer in (second, resumed):
        assert trainer.input_sources == {"text_embeddings": "read", "latents": "read"}
        assert torch.equal(trainer.images, first.images) and torch.equal(trainer.text_embeddings, first.text_embeddings)
    assert encoded == [] and {kind: path.stat().st_mtime_ns for kind, path in files.items()} == written
    resumed.writer_lock.release()

    files["latents"].write_bytes(files["latents"].read_bytes()[:100])  # truncated
    damaged = prepare_trainer(create_run(config, tmp_path / "runs")[0])
    assert damaged.input_sources == {"text_embeddings": "read", "latents": "recomputed"} and encoded == [4]
    assert torch.equal(damaged.images, first.images)
    files["latents"].write_bytes(files["text"].read_bytes())  # whole, but another key's file
    assert prepare_trainer(create_run(config, tmp_path / "runs")[0]).input_sources["latents"] == "recomputed"

    config.data.resolution = 8  # other latents, the same captions
    smaller = prepare_trainer(create_run(config, tmp_path / "runs")[0])
    assert smaller.input_sources == {"text_embeddings": "read", "latents": "computed"}
    assert smaller.images.shape[-1] == first.images.shape[-1] // 2
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_experiment_runner_compares_fine_tunes_at_equal_steps(tmp_path, pipeline_folder, clip_folder):
    import pandas as pd

    from iet_core.experiments import main

    data, out = captioned_folder(tmp_path / "data", count=4), tmp_path / "out"
    assert main(["--recipe", "sd-lora", "--pretrained", str(pipeline_folder), "--data", str(data), "--resolution", "16",
                 "--modes", "ddpm", "iet-agc", "--seeds", "0", "--shards", "2", "--rounds", "2", "--steps", "4",
                 "--eval-points", "1", "--num-samples", "2", "--sample-steps", "2", "--batch-size", "2",
                 "--device", "cpu", "--clip-model", str(clip_folder), "--set", "train.preview_samples=0",
                 "--out", str(out)]) == 0
    results = pd.read_csv(out / "results.csv")
    assert results["mode"].tolist() == ["ddpm", "iet-agc"]
    assert results["step"].tolist() == [4, 4]  # equal steps: 1 proxy x 2 local steps, 2 proxies x 1
    assert (results["num_samples"] == 2).all() and results["clip_score"].notna().all() and results["fid"].isna().all()
    assert ((results["copy_low"] <= results["copy_fraction"]) & (results["copy_fraction"] <= results["copy_high"])).all()
    summary = pd.read_csv(out / "summary.csv")
    assert summary["samples"].tolist() == [2, 2] and {"copies_low", "copies_high", "clip_score_mean"} <= set(summary)
    report = (out / "report.md").read_text()
    assert "CLIP score: 100 x max(cos, 0) with clip" in report and "FID: not measured (FID not requested" in report
    assert "LoRA rank 4" in report
    for image in ("copies_bar.png", "similarity_histograms.png", "neighbours_ddpm.png", "neighbours_iet-agc.png"):
        assert (out / image).exists()


def test_a_server_takes_a_clip_model_from_its_model_folders_only(tmp_path, pipeline_folder, clip_folder):
    from iet_core.data import DataError, SourcePolicy
    from iet_core.jobs import JobError, JobManager

    data = captioned_folder(tmp_path / "data", count=4)
    jobs = JobManager(tmp_path / "runs", sources=SourcePolicy.allowing(data, models=(pipeline_folder, clip_folder.parent)))
    try:
        config = t2i_config(pipeline_folder, data)
        config.text2image.clip_model = str(tmp_path / "elsewhere")
        with pytest.raises(DataError, match="text2image.clip_model='.*' is not available on this server"):
            jobs.submit(config, "owner-me-123456")
        config.text2image.clip_model, config.text2image.input_cache = str(clip_folder), str(tmp_path / "cache")
        with pytest.raises(JobError, match="text2image.input_cache name files on the server"):  # only that is left
            jobs.submit(config, "owner-me-123456")
        assert not list((tmp_path / "runs").glob("*/config.json"))  # refused before any run folder exists
    finally:
        jobs.shutdown(timeout=60)

"""Text-to-image fine-tuning on a tiny random Stable Diffusion pipeline built from configs."""
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from iet_core import Run, TrainControl, train
from iet_core.config import ConfigError, DataConfig, recipe_config
from iet_core.data import load_dataset
from iet_core.evaluate import evaluate_run, load_eval
from iet_core.features import PIXEL_MEASURE, load_feature_extractor
from iet_core.optim import weighted_average
from iet_core.telemetry import StepEvent
from iet_core.text2image.evaluate import detect_copies
from iet_core.text2image.tiny import build_tiny_pipeline
from iet_core.train import create_run, prepare_trainer

CAPTIONS = ["a red cube", "two blue balls", "a green tree", "one yellow star", "a black cat", "a white dog"]


def png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def captioned_folder(root, count: int = 6):
    """imagefolder layout: images plus metadata.jsonl, half the captions in .txt files instead."""
    root.mkdir(parents=True)
    lines = []
    for i in range(count):
        (root / f"{i}.png").write_bytes(png(i))
        if i % 2:
            (root / f"{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)] + f" {i}")
        else:
            lines.append(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i % len(CAPTIONS)] + f" {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return root


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    # few timesteps, so that AGC's per-timestep bank fills within a few steps and skips
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipeline", num_train_timesteps=10)


def t2i_config(pipeline_folder, data, lora_rank=4, **train):
    config = recipe_config("sd-lora" if lora_rank else "sd-full", "iet-agc")
    config.model.pretrained, config.data.source, config.data.resolution = str(pipeline_folder), str(data), 16
    config.method.num_shards = 2
    config.method.agc.skip_lambda, config.method.agc.bank_decay = 0.9, 0.0  # skips take part within a few steps
    settings = dict(rounds=2, local_steps=3, batch_size=2, lr=1e-2, log_every=1, preview_samples=0,
                    execution="sequential", device="cpu")
    settings.update(train)
    for key, value in settings.items():
        setattr(config.train, key, value)
    config.eval.num_samples, config.eval.steps, config.eval.batch_size = 4, 2, 4
    return config


def test_captioned_zip_with_bad_entries_loads_the_rest_with_reasons(tmp_path):
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("imgs/a.png", png(0))
        z.writestr("imgs/b.png", png(1))
        z.writestr("imgs/b.txt", "a caption from a text file")
        z.writestr("imgs/c.png", b"not a png")
        z.writestr("imgs/d.png", png(3))  # no caption anywhere
        z.writestr("../evil.png", png(4))
        z.writestr("imgs/metadata.jsonl", "\n".join([
            json.dumps({"file_name": "a.png", "text": "a caption from metadata"}),
            "{not json",
            json.dumps({"file_name": "missing.png", "text": "x"}),
            json.dumps({"file_name": "c.png", "text": "a broken image"}),
        ]))
    dataset = load_dataset(DataConfig(source=str(archive), resolution=16, channels=3, subset=None, caption_column="text"))
    assert dataset.captions == ["a caption from metadata", "a caption from a text file"]
    assert dataset.images.shape == (2, 3, 16, 16)
    reasons = dict(dataset.rejected)
    assert "not a readable image" in reasons["imgs/c.png"]
    assert "no caption" in reasons["imgs/d.png"]
    assert "unsafe path" in reasons["../evil.png"]
    assert reasons["imgs/metadata.jsonl line 2"] == "not valid JSON"
    assert "not in the set" in reasons["imgs/metadata.jsonl line 3"]
    assert "imgs/b.txt" not in reasons and "imgs/metadata.jsonl" not in reasons  # caption files are not "bad images"
    with pytest.raises(ConfigError, match="has no captions"):
        load_dataset(DataConfig(source="digits", caption_column="text"))


def test_lora_rounds_average_adapters_by_shard_size_and_resume_bit_identically(tmp_path, pipeline_folder):
    data = captioned_folder(tmp_path / "data", count=5)  # shards of 3 and 2: unequal weights
    config = t2i_config(pipeline_folder, data)
    run, dataset = create_run(config, tmp_path / "a")
    trainer = prepare_trainer(run, dataset)
    assert trainer.fit() == "finished"
    # only the adapter trains: a few thousand LoRA weights over the frozen base
    assert all(".lora_" in name for name in trainer.flat.names) and trainer.flat.numel < 5000
    sizes = trainer.round_sizes
    assert sizes in ([3, 2], [2, 3])
    assert not torch.equal(trainer.weights[0], trainer.weights[1])  # the proxies' adapters differ ...
    expected = sum(trainer.weights[k].double() * sizes[k] / sum(sizes) for k in range(2))
    torch.testing.assert_close(trainer.global_weights.double(), expected)  # ... and average by shard size
    assert torch.equal(trainer.global_weights, weighted_average(trainer.weights, sizes))
    assert run.metrics()["kept_fraction"].min() < 1  # AGC skipped some samples

    control = TrainControl()
    stop = lambda e: isinstance(e, StepEvent) and e.global_step[-1] >= 4 and control.stop()  # round 0, proxy 1
    resumed, _ = create_run(config, tmp_path / "b")
    assert prepare_trainer(resumed, sinks=[stop], control=control).fit() == "stopped"
    train(run=resumed, resume=True)
    a, b = run.load_checkpoint()[0], resumed.load_checkpoint()[0]
    for stem in ("model", "ema"):
        assert a[stem].keys() == b[stem].keys()
        for name in a[stem]:
            assert torch.equal(a[stem][name], b[stem][name]), (stem, name)
    assert torch.equal(a["state"]["banks"], b["state"]["banks"])
    assert resumed.metrics()["global_step"].tolist() == list(range(12))


def test_batched_lora_proxies_match_sequential(tmp_path, pipeline_folder):
    data = captioned_folder(tmp_path / "data", count=4)
    config = t2i_config(pipeline_folder, data, rounds=1)
    sequential = train(config, runs_root=tmp_path / "seq")
    config.train.execution = "batched"
    batched = train(config, runs_root=tmp_path / "batched")
    a, b = sequential.load_checkpoint()[0]["model"], batched.load_checkpoint()[0]["model"]
    vector = lambda state: torch.cat([state[name].reshape(-1) for name in sorted(state)])
    lora_b = {n: v for n, v in a.items() if "lora_B" in n}  # B starts at zero: its norm is the update's
    update_error = (vector(a) - vector(b)).norm() / vector(lora_b).norm()
    assert update_error < 1e-3, update_error  # rounding only (vmap sums in another order)


def test_exported_lora_loads_into_the_pipeline_and_changes_its_output(tmp_path, pipeline_folder):
    from diffusers import StableDiffusionPipeline

    data = captioned_folder(tmp_path / "data", count=4)
    run = train(t2i_config(pipeline_folder, data, rounds=1), runs_root=tmp_path / "runs")
    folder = Run.open(run.path).export(tmp_path / "lora", ema=False)
    assert (folder / "pytorch_lora_weights.safetensors").exists()

    def draw(pipeline):
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return pipeline("a red cube 0", height=16, width=16, num_inference_steps=2, generator=generator,
                        output_type="np").images

    base = draw(StableDiffusionPipeline.from_pretrained(str(pipeline_folder), use_safetensors=True))
    pipeline = StableDiffusionPipeline.from_pretrained(str(pipeline_folder), use_safetensors=True)
    pipeline.load_lora_weights(str(folder))
    tuned = draw(pipeline)
    assert np.abs(tuned - base).max() > 1e-3
    # the same as the trained adapter in the engine's own pipeline
    from iet_core.text2image.export import trained_components

    np.testing.assert_allclose(draw(trained_components(Run.open(run.path), use_ema=False).pipeline()), tuned, atol=1e-5)


def test_full_fine_tune_exports_a_pipeline_folder(tmp_path, pipeline_folder):
    from diffusers import StableDiffusionPipeline

    data = captioned_folder(tmp_path / "data", count=4)
    config = t2i_config(pipeline_folder, data, lora_rank=None, rounds=1, local_steps=1, lr=1e-3)
    run = train(config, runs_root=tmp_path / "runs")
    folder = run.export(tmp_path / "full", ema=False)
    tuned = StableDiffusionPipeline.from_pretrained(str(folder), use_safetensors=True).unet
    base = StableDiffusionPipeline.from_pretrained(str(pipeline_folder), use_safetensors=True).unet
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) > 10


def test_evaluation_generates_from_captions_and_saves_prompt_generation_nearest(tmp_path, pipeline_folder):
    data = captioned_folder(tmp_path / "data", count=4)
    run = train(t2i_config(pipeline_folder, data, rounds=1, local_steps=1), runs_root=tmp_path / "runs")
    result = evaluate_run(run)
    assert result.summary["measure"] == PIXEL_MEASURE  # no extractor given: says so
    assert result.summary["num_samples"] == 4 and len(result.per_caption()) == 4
    loaded = load_eval(run)
    assert loaded.summary["copy_count"] == result.summary["copy_count"]
    image, label = loaded.pairs(1)[0]
    assert image.shape == (16, 33, 3) and label.split("'")[1] in loaded.table["caption"].tolist()
    assert (loaded.path / "gallery.png").exists()


def _torchscript_extractor(path):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=4),
                                  torch.nn.Flatten(), torch.nn.LazyLinear(32))
    network(torch.zeros(1, 3, 288, 288))
    torch.jit.script(network).save(str(path))
    return str(path)


def _clip_extractor(folder):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=32, patch_size=8,
        projection_dim=8)).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def _dinov2_extractor(folder):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                             image_size=32, patch_size=8)).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


@pytest.mark.parametrize("make", [None, _torchscript_extractor, _clip_extractor, _dinov2_extractor])
def test_copy_detection_finds_planted_copies(tmp_path, make):
    dataset = load_dataset(DataConfig(source=str(captioned_folder(tmp_path / "data", count=6)), resolution=16,
                                      channels=3, subset=None, caption_column="text"))
    extractor = load_feature_extractor(make(tmp_path / "extractor") if make else None, "cpu")
    fresh = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(png(100 + i))))
                                       for i in range(3)])).permute(0, 3, 1, 2).contiguous()
    planted = [4, 1]  # training images fed back as generations, for the captions of images 0 and 5
    generated = torch.cat([dataset.images[planted], fresh])
    threshold = 0.5 if make is None else 0.9999  # random networks map unrelated images close together
    result = detect_copies(generated, np.array([0, 5, 1, 2, 3]), dataset, extractor, copy_threshold=threshold)
    table = result.table
    assert table["copy"].tolist() == [True, True, False, False, False]
    assert table["nearest_id"][:2].tolist() == planted
    assert table["memorized"][:2].all() and not table["own_image"][:2].any()
    assert result.summary["copy_count"] == 2 and result.summary["copy_interval"][0] < 0.4 < result.summary["copy_interval"][1]
    assert result.summary["measure"] == (PIXEL_MEASURE if make is None else extractor.name)


def test_text_to_image_settings_are_checked_before_a_run_exists(tmp_path, pipeline_folder, capsys):
    from iet_core.cli import main

    data = captioned_folder(tmp_path / "data", count=4)
    config = t2i_config(pipeline_folder, data)
    config.train.hflip = True
    with pytest.raises(ConfigError, match="hflip"):
        create_run(config, tmp_path / "runs")
    # The tiny pipeline downsamples by 2 (VAE) x 2 (UNet) and is 8 latent pixels = 16 pixels wide:
    # read from its configs, before any weight is loaded or folder made, by the engine and the CLI
    for resolution, fits in ((10, 8), (32, 16)):
        config = t2i_config(pipeline_folder, data)
        config.data.resolution = resolution
        refusal = f"data.resolution={resolution} does not fit this pipeline: use a multiple of 4 pixels up to 16 (e.g. {fits})."
        with pytest.raises(ConfigError) as refused:
            train(config, runs_root=tmp_path / "runs")
        assert str(refused.value) == refusal
        (tmp_path / "config.json").write_text(config.to_json())
        assert main(["train", "--config", str(tmp_path / "config.json"), "--runs-dir", str(tmp_path / "runs")]) == 2
        assert refusal in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cli_fine_tunes_evaluates_and_exports(tmp_path, pipeline_folder, capsys):
    from iet_core.cli import main

    data = captioned_folder(tmp_path / "data", count=4)
    assert main(["train", "--recipe", "sd-lora", "--mode", "iet-agc", "--pretrained", str(pipeline_folder), "--data", str(data),
                 "--resolution", "16", "--rounds", "1", "--local-steps", "2", "--batch-size", "2", "--device", "cpu",
                 "--set", "train.preview_samples=0", "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    run = next((tmp_path / "runs").iterdir())
    assert Run.open(run).status()["state"] == "finished"
    assert main(["evaluate", str(run), "--num-samples", "4", "--steps", "2", "--images-per-caption", "2",
                 "--guidance-scale", "1"]) == 0
    assert "measure: pixel correlation" in capsys.readouterr().out
    assert load_eval(run).summary["num_captions"] == 2
    assert main(["export", str(run), "--out", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_the_app_trains_a_fine_tune_and_its_memorization_page_shows_prompt_generation_nearest(tmp_path, pipeline_folder):
    from iet_core.data import SourcePolicy
    from iet_core.jobs import JobManager
    from pages import common, memorization

    root = tmp_path / "runs"
    ctx = common.AppContext.create(root, JobManager(root, sources=SourcePolicy.allowing(tmp_path / "data", models=(pipeline_folder,))))
    try:
        data = captioned_folder(tmp_path / "data", count=4)
        run_id = ctx.jobs.submit(t2i_config(pipeline_folder, data, rounds=1, local_steps=1), "owner-me-123456")
        assert ctx.jobs.wait(run_id, 120) == "finished"
        run = ctx.jobs.run(run_id)
        assert len(run.metrics()) == 2  # the Monitor's history, as for any run
        evaluate_run(run)
        summary, _, histogram, _, gallery, _, most = memorization.result_view(ctx, run_id, load_eval(run))
        assert "Similarity above 0.5" in summary and "pixel correlation" in summary
        prompts = [caption.split(" · ")[0] for _, caption in gallery]
        assert len(gallery) == 4 and set(prompts) == set(load_dataset(run.config.data).captions)
        assert set(most.columns) >= {"training_id", "times_nearest", "times_memorized"}
    finally:
        ctx.jobs.shutdown(timeout=60)


def test_a_cancelled_evaluation_of_a_fine_tune_stops_and_saves_nothing(tmp_path, pipeline_folder):
    from iet_core.sample import Cancelled

    data = captioned_folder(tmp_path / "data", count=4)
    config = t2i_config(pipeline_folder, data, rounds=1, local_steps=1)
    config.eval.batch_size = 2  # two batches: cancelled after the first
    run = train(config, runs_root=tmp_path / "runs")
    stages = []
    with pytest.raises(Cancelled):
        evaluate_run(run, progress=lambda *report: stages.append(report), cancelled=lambda: len(stages) >= 1)
    assert stages == [("sampling", 2, 4)] and not (run.path / "eval").exists()

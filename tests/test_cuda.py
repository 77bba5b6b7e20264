"""CUDA-only paths: vmapped proxies in bf16, exact resume, the out-of-memory message,
evaluation on the GPU, a fine-tune's cached inputs and CLIP score, and the compiled step
(last: compiling takes longest). Deselected where no CUDA GPU is available (conftest.py);
`python bench/gpu_check.py` runs them on one, and its dry run on the CPU as a stand-in."""
import numpy as np
import pytest
import torch

from helpers import tiny_config
from iet_core import TrainControl, Trainer, train
from iet_core.config import EvalConfig
from iet_core.data import ImageDataset
from iet_core.evaluate import evaluate_images
from iet_core.telemetry import StepEvent
from iet_core.train import TrainingOutOfMemory, create_run

pytestmark = pytest.mark.cuda


def on(device: torch.device, mode: str = "iet-agc", **train_settings):
    return tiny_config(mode, device=str(device), **train_settings)


def model_vector(run) -> torch.Tensor:
    state = run.load_checkpoint()[0]["model"]
    return torch.cat([state[name].reshape(-1).float() for name in sorted(state)])


def update_error(run, reference, start) -> float:
    """How far a run's final weights are from a reference run's, relative to the reference's
    own change from the common starting point."""
    initial = Trainer(*create_run(start, reference.path.parent / "init"))
    init = torch.cat([v.reshape(-1).float().cpu() for _, v in sorted(initial._state_dict(initial.global_weights).items())])
    expected = model_vector(reference)
    return float((model_vector(run) - expected).norm() / (expected - init).norm())


def test_batched_bf16_proxies_match_sequential_proxies(cuda_device, tmp_path):
    """K proxies as one vmapped computation under bf16 autocast = one after another, within
    bf16 rounding."""
    config = on(cuda_device, rounds=2, local_steps=3, precision="bf16", execution="sequential")
    config.method.num_shards = 3
    sequential = train(config, runs_root=tmp_path / "sequential")
    config.train.execution = "batched"
    batched = train(config, runs_root=tmp_path / "batched")
    step = ["round", "proxy", "local_step"]
    losses = [run.metrics().sort_values(step)["loss"].to_numpy() for run in (sequential, batched)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=0.02)  # bf16 vs fp32 differ by ~0.006 here
    # Adam's first steps follow the gradients' signs, which bf16 rounding flips where a gradient
    # is near zero: bf16 against fp32 is ~0.15 apart here; a wrong input or scale is ~1.
    assert update_error(batched, sequential, config) < 0.5
    a, b = sequential.load_checkpoint()[0]["state"], batched.load_checkpoint()[0]["state"]
    torch.testing.assert_close(a["banks"], b["banks"], rtol=0.05, atol=1e-3)


def test_resume_on_cuda_gives_the_same_weights(cuda_device, tmp_path):
    """The default execution on the device (batched proxies on a GPU), stopped mid-round and
    resumed, ends bit-identical to an uninterrupted run."""
    config = on(cuda_device, "iet-agc+", rounds=2, local_steps=3, log_every=1)
    config.method.agc.skip_lambda = 0.9  # skips, MSR moves and TAA all take part
    config.method.msr.threshold, config.method.msr.min_visits = 0.2, 1
    straight = train(config, runs_root=tmp_path / "a")
    again = train(config, runs_root=tmp_path / "b")
    difference = float((model_vector(straight) - model_vector(again)).abs().max())
    assert difference == 0, (f"two identical runs differ by up to {difference:.2e}: training on {cuda_device} is "
                             "not deterministic (cuDNN's convolution backward and index_add_ add with atomics), so "
                             "no resume can be exact without torch.use_deterministic_algorithms")
    control = TrainControl()
    run, dataset = create_run(config, tmp_path / "c")
    stop = lambda event: isinstance(event, StepEvent) and event.global_step[-1] >= 7 and control.stop()
    assert Trainer(run, dataset, sinks=[stop], control=control).fit() == "stopped"
    train(run=run, resume=True)
    assert torch.equal(model_vector(run), model_vector(straight))
    a, b = straight.load_checkpoint()[0]["state"], run.load_checkpoint()[0]["state"]
    for name in ("banks", "adam.exp_avg", "shard_of", "skips"):
        assert torch.equal(a[name], b[name]), name


def test_out_of_memory_stops_with_what_to_lower(cuda_device, tmp_path):
    if cuda_device.type != "cuda":
        pytest.skip("the out-of-memory path needs CUDA's allocator")
    # The process may use 1 GiB more than it holds now, so the oversized batch fails at once.
    total = torch.cuda.get_device_properties(cuda_device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved(cuda_device) + 2**30) / total),
                                               cuda_device)
    try:
        config = on(cuda_device, "ddpm", rounds=1, local_steps=1, batch_size=65536)
        run, dataset = create_run(config, tmp_path)
        with pytest.raises(TrainingOutOfMemory, match=r"lower train\.batch_size \(try 32768\)"):
            Trainer(run, dataset).fit()
        assert run.status()["state"] == "failed"
        assert "train.batch_size" in run.status()["message"]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, cuda_device)
        torch.cuda.empty_cache()


def test_evaluation_on_cuda_finds_the_cpu_neighbours(cuda_device, tmp_path):
    """Samples drawn on the device, then measured there and on the CPU: the same nearest
    training images (the search ends in exact integer distances) and the same ratios."""
    run = train(on(cuda_device, "ddpm", rounds=1, local_steps=2), runs_root=tmp_path)
    from iet_core.sample import generate_from_run

    samples = generate_from_run(run, 24, steps=5, device=cuda_device)
    rng = np.random.default_rng(0)
    dataset = ImageDataset(torch.from_numpy(rng.integers(0, 256, (300, 1, 8, 8), dtype=np.uint8)), None, torch.arange(300))
    copies = dataset.images[:8].flip(-1)  # mirrored copies: the flip-aware search must find them
    generated = torch.cat([samples, copies])
    config = EvalConfig(mq_neighbours=10)
    gpu = evaluate_images(generated, dataset, config, flip_aware=True, device=cuda_device).table
    cpu = evaluate_images(generated, dataset, config, flip_aware=True, device="cpu").table
    assert gpu[["nearest_id", "second_id", "nearest_flipped", "memorized"]].equals(
        cpu[["nearest_id", "second_id", "nearest_flipped", "memorized"]])
    np.testing.assert_allclose(gpu["memorization_ratio"], cpu["memorization_ratio"], rtol=1e-12)
    assert gpu["memorized"].tail(8).all()


def test_fine_tune_inputs_are_cached_and_clip_scores_match_the_cpu_on_cuda(cuda_device, tmp_path):
    """Latents and text embeddings computed on the GPU are read back bit-identical (what a
    resumed run trains on) and close to the CPU's; the CLIP score on the GPU is the CPU's."""
    from test_text2image import CAPTIONS, captioned_folder, t2i_config

    from iet_core.features import load_clip_scorer
    from iet_core.text2image.tiny import build_tiny_clip, build_tiny_pipeline
    from iet_core.train import prepare_trainer

    pipeline = build_tiny_pipeline(tmp_path / "pipeline", num_train_timesteps=10)
    config = t2i_config(pipeline, captioned_folder(tmp_path / "data", count=4), device=str(cuda_device))
    config.text2image.input_cache = str(tmp_path / "cache")
    computed = prepare_trainer(create_run(config, tmp_path / "runs")[0])
    read = prepare_trainer(create_run(config, tmp_path / "runs")[0])
    assert computed.input_sources == {"text_embeddings": "computed", "latents": "computed"}
    assert read.input_sources == {"text_embeddings": "read", "latents": "read"}
    assert torch.equal(read.images, computed.images) and torch.equal(read.text_embeddings, computed.text_embeddings)
    config.train.device, config.text2image.input_cache = "cpu", str(tmp_path / "cpu-cache")
    on_cpu = prepare_trainer(create_run(config, tmp_path / "runs")[0])
    torch.testing.assert_close(computed.images.cpu(), on_cpu.images, atol=1e-4, rtol=1e-4)

    clip = str(build_tiny_clip(tmp_path / "clip"))
    images = torch.randint(0, 256, (len(CAPTIONS), 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(load_clip_scorer(clip, cuda_device)(images, CAPTIONS),
                               load_clip_scorer(clip, "cpu")(images, CAPTIONS), atol=1e-3)


def test_compiled_step_on_cuda_trains_the_same_model(cuda_device, tmp_path):
    if cuda_device.type != "cuda":
        pytest.skip("compiling for the CPU is tested in test_train.py; this is the CUDA (Triton) path")
    config = on(cuda_device, rounds=2, local_steps=3, execution="sequential")
    eager = train(config, runs_root=tmp_path / "eager")
    config.train.compile = True
    compiled = train(config, runs_root=tmp_path / "compiled")
    assert update_error(compiled, eager, config) < 1e-2

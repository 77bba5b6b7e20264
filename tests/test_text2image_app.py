"""Text-to-image fine-tuning through the app: captioned uploads kept with their captions, base
models and feature extractors only from the admin's model folders (or Hub ids), a LoRA IET-AGC
run started the Train page's way on a tiny Stable Diffusion pipeline built from configs."""
from __future__ import annotations

import numpy as np
import pytest

from iet_core.config import DataConfig
from iet_core.data import DataError, SourcePolicy, load_dataset
from iet_core.text2image.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An admin's model folder holding one tiny pipeline (few timesteps: AGC's bank fills fast)."""
    folder = tmp_path_factory.mktemp("models")
    build_tiny_pipeline(folder / "tiny-sd", num_train_timesteps=10)
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
    assert policy.offered_models() == {"tiny-sd": (model_dir / "tiny-sd").resolve()}
    policy.check_model(str(model_dir / "tiny-sd"))
    policy.check_model("owner/name")
    policy.check_feature_extractor(None)
    refusals = set()
    for path in (str(data / "pipeline"), str(tmp_path / "missing"), str(model_dir / ".." / "elsewhere"), "/etc"):
        with pytest.raises(DataError) as refused:
            policy.check_model(path)  # a data folder is not a model folder
        refusals.add(str(refused.value).replace(repr(path), "PATH"))
    assert len(refusals) == 1 and "not available on this server" in refusals.pop()
    with pytest.raises(DataError, match="feature_extractor='/etc/passwd' is not available"):
        policy.check_feature_extractor("/etc/passwd")

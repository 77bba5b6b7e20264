import os
import sys
from pathlib import Path

import pytest
import torch

# Tests never reach the network: hub clients fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The test models are tiny: one thread per op is as fast on an idle machine and several times
# faster when other processes share the cores (intra-op threads then oversubscribe them).
torch.set_num_threads(1)
# The device `cuda` tests run on: a CUDA GPU, or the stand-in this names (the GPU check's dry run
# sets "cpu" so that those tests keep running, on CPU, wherever the check is tested).
CUDA_STAND_IN = os.environ.get("IET_CUDA_TESTS_DEVICE")


def pytest_collection_modifyitems(config, items):
    """Deselect `cuda` tests where no CUDA GPU is available (and no stand-in is named)."""
    if torch.cuda.is_available() or CUDA_STAND_IN:
        return
    deselected = [item for item in items if item.get_closest_marker("cuda")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """Caches with a default in the user's cache (FID statistics, latents) go to this session's
    folder, never the user's own."""
    os.environ["IET_CACHE_DIR"] = str(tmp_path_factory.mktemp("user-cache"))


@pytest.fixture
def cuda_device() -> torch.device:
    return torch.device(CUDA_STAND_IN or "cuda")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """The web app launched in-process on a fresh runs folder: yields (url, context)."""
    import app

    demo, ctx = app.build_app(tmp_path_factory.mktemp("runs"))
    _, url, _ = app.launch(demo, ctx, prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    try:
        yield url, ctx
    finally:
        ctx.jobs.shutdown(timeout=60)
        demo.close()

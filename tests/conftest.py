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


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """The web app launched in-process on a fresh runs folder: yields (url, context)."""
    import app

    demo, ctx = app.build_app(tmp_path_factory.mktemp("runs"))
    _, url, _ = app.launch(demo, prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    try:
        yield url, ctx
    finally:
        ctx.jobs.shutdown(timeout=60)
        demo.close()

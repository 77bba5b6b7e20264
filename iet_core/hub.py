"""Hugging Face Hub ids, and the one way what they name is fetched.

`owner/name` is always a Hub id, never a local folder. diffusers, transformers and datasets
load a folder of that relative name from the working directory when one exists, so on a
server a visitor's id would read outside the admin's allow-list and the answer would tell
what exists there. Here a Hub id is only fetched from the Hub (or the Hub cache) with
snapshot_download, only the files a loader needs (configs, tokenizers, safetensors weights:
nothing unpickled, no code), and loaded from that snapshot folder. A local folder is written
as a path: ./folder, an absolute path or ~/folder.
"""
from __future__ import annotations

import re
from pathlib import Path

from .config import ConfigError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
# Configs and tokenizers of diffusers pipelines and transformers models (merges.txt, vocab.json)
CONFIG_FILES = ("*.json", "*.txt")
# ... and their weights in safetensors, whole or sharded, at the top or in a component's folder;
# not the single-file checkpoints or fp16 / EMA variants a pipeline repo also holds.
MODEL_FILES = (*CONFIG_FILES, "model.safetensors", "*/model.safetensors", "diffusion_pytorch_model.safetensors",
               "*/diffusion_pytorch_model.safetensors", "*model-?????-of-?????.safetensors")
# A dataset's data files and card (its README's metadata names configs and splits); no loading scripts.
DATASET_FILES = ("*.parquet", "*.arrow", "*.json", "*.jsonl", "*.csv", "*.txt", "README.md",
                 "*.png", "*.jpg", "*.jpeg", "*.webp", "*.bmp", "*.gif", "*.tif", "*.tiff")


def is_hub_id(spec: str) -> bool:
    return HUB_ID.fullmatch(spec) is not None and ".." not in spec


def fetch(hub_id: str, setting: str, files: tuple[str, ...] = MODEL_FILES, repo_type: str = "model") -> Path:
    """The snapshot folder of a Hub repository with only `files` (glob patterns) downloaded, or
    ConfigError. The message names the id only: it reads the same whatever the server holds."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, repo_type=repo_type, allow_patterns=list(files)))
    except Exception as err:  # the hub client raises many types; all mean "cannot fetch this"
        raise ConfigError(f"cannot fetch {setting}={hub_id!r} from the Hugging Face Hub ({type(err).__name__}): check "
                          f"the id and the network. A local folder is written as a path, e.g. ./{hub_id}.") from None


def local_folder(source: str, setting: str, files: tuple[str, ...] = MODEL_FILES) -> Path:
    """Where a model source's files are: a Hub id's snapshot (fetched), else the local path."""
    return fetch(source, setting, files) if is_hub_id(source) else Path(source).expanduser()

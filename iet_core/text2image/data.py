"""Captioned image sets, in the layouts people already have:

- Hugging Face `imagefolder`: images plus `metadata.jsonl` lines {"file_name": ..., "text": ...}
  (a metadata.jsonl describes the files under its own folder, named relative to it);
- images with same-name `.txt` captions (cat.png + cat.txt);
- a .zip of either, read in memory with the limits and checks of iet_core.data.
(`hf:<id>` with an image and a text column goes through iet_core.data.load_hf.)
"""
from __future__ import annotations

import json
import posixpath
from pathlib import Path

from ..data import MAX_FILE_BYTES, DataError, _decode_many, check_caption, image_entries, source_files, source_name

METADATA = "metadata.jsonl"


def _read_text(read, name: str) -> str:
    data = read()
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"file is larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text") from None


def _metadata_captions(files: dict, caption_column: str) -> tuple[dict[str, str], list[tuple[str, str]], set[str]]:
    """Captions from every metadata.jsonl: {image name: caption}, rejected lines, files read."""
    captions, rejected, used = {}, [], set()
    for meta in (n for n in files if posixpath.basename(n) == METADATA):
        used.add(meta)
        try:
            lines = _read_text(files[meta], meta).splitlines()
        except DataError as err:
            rejected.append((meta, str(err)))
            continue
        folder = posixpath.dirname(meta)
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{meta} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                rejected.append((where, "not valid JSON"))
                continue
            name = record.get("file_name") if isinstance(record, dict) else None
            if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or ".." in Path(name).parts:
                rejected.append((where, "needs a relative \"file_name\" inside the set"))
                continue
            name = posixpath.normpath(posixpath.join(folder, name))
            if name not in files:
                rejected.append((where, f"file {name} is not in the set"))
                continue
            try:
                captions[name] = check_caption(record.get(caption_column))
            except DataError as err:
                rejected.append((where, f"{err} in field {caption_column!r}"))
    return captions, rejected, used


def load_captioned_files(path: Path, caption_column: str, resolution: int, channels: int, resize_filter: str = "auto"):
    """Images of a folder or a .zip and their captions; images without one are rejected with
    the reason. Returns images, captions and rejected (name, reason)."""
    where = source_name(path)
    with source_files(path) as (files, rejected):
        entries, others = image_entries(files, where)
        captions, bad_lines, used = _metadata_captions(files, caption_column)
        rejected += bad_lines
        captioned = []
        for name, read in entries:
            text_file = posixpath.splitext(name)[0] + ".txt"
            if text_file in files:
                used.add(text_file)
            if name not in captions and text_file in files:
                try:
                    captions[name] = check_caption(_read_text(files[text_file], text_file))
                except DataError as err:
                    rejected.append((text_file, str(err)))
            if name in captions:
                captioned.append((name, read))
            else:
                rejected.append((name, f"no caption: add a {METADATA} line with \"file_name\" and {caption_column!r}, "
                                       "or a same-name .txt file"))
        rejected += [(name, reason) for name, reason in others if name not in used]
        images, names, bad = _decode_many(captioned, resolution, channels, where, resize_filter)
    return images, [captions[n] for n in names], rejected + bad

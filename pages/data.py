"""1 · Data: choose the training images (built-in, uploaded, or a Hugging Face dataset),
preview them, and see what was rejected. The choice is kept in the browser session for Train."""
from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from iet_core.config import MAX_IMAGES, DataConfig, RunConfig
from iet_core.data import MAX_ARCHIVE_BYTES, MAX_FILE_BYTES, MAX_FILES, METADATA, DataError, has_captions, load_dataset
from iet_core.runs import is_upload, save_upload
from pages import common

TITLE, PATH = "1 · Data", "data"
BUILTIN = "Built-in: handwritten digits (works offline)"
UPLOAD = "Upload images or a .zip / .npz"
HUB = "Hugging Face dataset"
RESOLUTIONS = [8, 16, 32, 64, 128, 256, 512]
PREVIEW_COUNT = 64
CAPTIONED_SHOWN = 12  # images shown with their captions
# The metadata.jsonl field an upload's captions are read from (the imagefolder convention), and
# the .npz array they are kept in.
CAPTIONS = "text"


def persist_upload(files: list[str], runs_root: Path, resolution: int, channels: int) -> tuple[DataConfig, list]:
    """Uploaded files as one .npz under <runs>/datasets/, so runs trained on them can resume
    after a restart; named after the first file, with a hash of the content and the size that
    tells different uploads apart. A captioned set (a metadata.jsonl or .txt captions among the
    files or in the .zip) keeps its captions in the .npz's CAPTIONS array and is loaded in
    colour, as text-to-image models take it. Returns the data config and the rejected files."""
    if not files:
        raise DataError("no files uploaded: drop image files, or one .zip or .npz archive.")
    paths = [Path(f) for f in files]
    archives = [p for p in paths if p.suffix.lower() in (".zip", ".npz")]
    if archives and len(paths) > 1:
        raise DataError("upload either one .zip or .npz archive, or image and caption files, not both.")
    if len(paths) > MAX_FILES:
        raise DataError(f"{len(paths):,} files: upload at most {MAX_IMAGES:,} images and their captions (or one archive).")
    # Sizes are checked before anything is read: a huge file never reaches memory.
    sizes = [path.stat().st_size for path in paths]
    limit = MAX_ARCHIVE_BYTES if archives else MAX_FILE_BYTES
    if max(sizes) > limit or sum(sizes) > MAX_ARCHIVE_BYTES:
        raise DataError(f"the upload is too large: at most {MAX_FILE_BYTES // 2**20} MiB per image and "
                        f"{MAX_ARCHIVE_BYTES // 2**30} GiB in all.")
    with tempfile.TemporaryDirectory() as tmp:
        if archives:
            source = archives[0]
        else:  # loose files: gather them in a folder (names kept: they may carry class folders or captions)
            source = Path(tmp) / "images"
            source.mkdir()
            for path in paths:
                shutil.copy2(path, source / path.name)
        captioned = source.suffix.lower() != ".npz" and has_captions(source)
        channels = 3 if captioned else channels
        digest = hashlib.sha256(f"{resolution}x{channels}".encode())
        for path in sorted(paths, key=lambda p: p.name):
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                hashlib.file_digest(handle, lambda: digest)
        dataset = load_dataset(DataConfig(source=str(source), resolution=resolution, channels=channels, subset=None,
                                          caption_column=CAPTIONS if captioned else None))
    arrays = {"images": dataset.images.numpy()}
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels.numpy()
    if captioned:
        arrays[CAPTIONS] = np.array(dataset.captions)
    first = min(paths, key=lambda p: p.name)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", first.stem).strip("-")[:32] or "upload"
    more = f"-and-{len(paths) - 1}-more" if len(paths) > 1 else ""
    name = f"{stem}{more}-{resolution}px-{channels}ch-{digest.hexdigest()[:8]}"
    config = DataConfig(source=str(save_upload(runs_root, name, arrays)), resolution=resolution, channels=channels,
                        caption_column=CAPTIONS if captioned else None)
    return config, dataset.rejected


def source_label(config: DataConfig) -> str:
    """Where the images come from, in words (an upload by its file name: never a server path)."""
    if config.source.startswith("hf:"):
        return f"Hugging Face dataset {config.source[3:]} ({config.hf_split})"
    if is_upload(config.source):
        return f"uploaded: {Path(config.source).name}"
    return "built-in handwritten digits" if config.source == "digits" else Path(config.source).name


def data_summary(dataset, config: DataConfig) -> str:
    classes = "" if dataset.labels is None else f", {len(np.unique(dataset.labels.numpy()))} classes"
    captioned = " · captioned" if dataset.captions is not None else ""
    rejected = f" · **{len(dataset.rejected)} rejected** (see below)" if dataset.rejected else ""
    use = ("Each image keeps its caption: choose the **text-to-image fine-tune** model on the **Train** page to "
           "fine-tune a Stable Diffusion model on them." if dataset.captions is not None else
           "Few images at low resolution memorize fastest: tens to a few hundred images show it within minutes.")
    return (f"### {len(dataset)} images · {config.resolution}×{config.resolution} · "
            f"{'greyscale' if config.channels == 1 else 'colour'}{classes}{captioned}{rejected}\n"
            f"Source: {source_label(config)}. Training on the **Train** page uses this data. {use}")


def captioned_gallery(dataset, limit: int = CAPTIONED_SHOWN) -> dict:
    """The first images with their captions (hidden for sets without captions)."""
    if dataset.captions is None:
        return gr.update(value=[], visible=False)
    items = [(common.image_file(common.display_image(image, 128)), caption)
             for image, caption in zip(dataset.images[:limit].numpy(), dataset.captions)]
    return gr.update(value=items, visible=True)


def build(ctx: common.AppContext, page: gr.Blocks) -> None:
    session = common.session_state(ctx)
    common.page_header("Choose the training data", "Diffusion models copy training images when the training set "
                       "is small. Pick a small set to see it happen quickly; the preview shows what the model will "
                       "learn from.")
    with gr.Row():
        with gr.Column(scale=2):
            # a server whose admin turned the Hub off offers no Hub choice (and refuses an hf: source)
            source = gr.Radio([BUILTIN, UPLOAD, *([HUB] if ctx.jobs.sources.hub else [])], value=BUILTIN, label="Source")
            upload = gr.File(file_count="multiple", file_types=["image", ".zip", ".npz", ".txt", ".jsonl"], visible=False,
                             label="Images (PNG, JPEG, ...), or one .zip of images (class folders become labels), "
                                   "or an .npz with an `images` array. Captioned, for text-to-image: add a "
                                   f"{METADATA} (lines with `file_name` and `{CAPTIONS}`) or a same-name .txt caption "
                                   "per image, as files or in the .zip")
            with gr.Row(visible=False) as hub_row:
                hub_id = gr.Textbox(label="Dataset id (owner/name)", placeholder="e.g. uoft-cs/cifar10",
                                    scale=3)
                hub_split = gr.Textbox("train", label="Split", scale=1)
                hub_captions = gr.Textbox(label="Caption column", placeholder="(none)", scale=1,
                                          info="For text-to-image, e.g. text")
            resolution = gr.Dropdown(RESOLUTIONS, value=common.chosen_data(None).resolution, label="Resolution (pixels)",
                                     info="8 is the built-in digits' own size (the demo's); 16 trains fast on a CPU; 32 "
                                          "suits a GPU; 256 or 512 for Stable Diffusion fine-tunes.")
            channels = gr.Radio([("Greyscale", 1), ("Colour (RGB)", 3)], value=1, label="Channels",
                                info="Captioned sets load in colour.")
            subset = gr.Number(64, precision=0, minimum=0, label="Number of images (0 = all)",
                               info="A seeded random subset. 64 memorizes within minutes on a CPU.")
            load = gr.Button("Load and preview", variant="primary")
        with gr.Column(scale=3):
            summary = gr.Markdown("Loading the built-in digits…")
            preview = gr.Image(label="Preview (first 64 images)", show_label=False, interactive=False,
                               buttons=["fullscreen"], elem_id="data-preview")
            captions = gr.Gallery(label="Images and their captions", visible=False, columns=4, height=420,
                                  object_fit="contain", allow_preview=False, elem_id="data-captions")
            rejected = gr.Dataframe(pd.DataFrame(columns=["file", "reason"]), label="Rejected files and why",
                                    visible=False, interactive=False, wrap=True)

    def show_source(choice):
        return gr.update(visible=choice == UPLOAD), gr.update(visible=choice == HUB)

    source.change(show_source, source, [upload, hub_row], api_visibility="private")

    @common.user_errors
    def load_data(choice, files, hub, split, hub_caption, res, ch, count, session):
        session = common.ensure_owner(session)
        # Every value is checked as a config is: events reach the server from any client.
        chosen = RunConfig.from_dict({"data": {"resolution": res, "channels": ch, "subset": count or None}}).data
        res, ch = chosen.resolution, chosen.channels
        rejected_before: list = []
        if choice == UPLOAD:
            config, rejected_before = persist_upload(files or [], ctx.runs_root, res, ch)
        elif choice == HUB:
            if not (hub or "").strip():
                raise DataError("give a Hugging Face dataset id as owner/name (e.g. uoft-cs/cifar10).")
            config = DataConfig(source=f"hf:{hub.strip()}", resolution=res, channels=ch, hf_split=(split or "train").strip(),
                                caption_column=(hub_caption or "").strip() or None)
        else:
            config = DataConfig(source="digits", resolution=res, channels=ch)
        config.subset = chosen.subset
        dataset = load_dataset(config, ctx.jobs.sources)
        if config.subset and len(dataset) < config.subset:  # fewer images than asked for: all of them
            config.subset = None
        dataset.rejected = rejected_before + dataset.rejected
        session["data"] = dataclasses.asdict(config)
        table = pd.DataFrame(dataset.rejected, columns=["file", "reason"])
        grid = common.image_grid(dataset.images[:PREVIEW_COUNT].numpy(), columns=16, min_tile=48)
        return (data_summary(dataset, config), grid, captioned_gallery(dataset),
                gr.update(value=table, visible=bool(len(table))), config.channels, session)

    inputs = [source, upload, hub_id, hub_split, hub_captions, resolution, channels, subset, session]
    outputs = [summary, preview, captions, rejected, channels, session]
    load.click(load_data, inputs, outputs, api_visibility="private")

    def restore(session):
        """Show the session's data choice (or the default digits) when the page opens."""
        chosen = common.chosen_data(session)
        choice = UPLOAD if is_upload(chosen.source) else HUB if chosen.source.startswith("hf:") else BUILTIN
        try:
            dataset = load_dataset(chosen, ctx.jobs.sources)
        except DataError as err:
            return [gr.skip()] * 8 + [f"The data chosen earlier cannot be loaded: {err}", None, gr.skip()]
        hub = chosen.source[3:] if choice == HUB else ""
        hub_caption = (chosen.caption_column or "") if choice == HUB else ""
        grid = common.image_grid(dataset.images[:PREVIEW_COUNT].numpy(), columns=16, min_tile=48)
        return (choice, gr.update(visible=choice == UPLOAD), gr.update(visible=choice == HUB), hub, hub_caption,
                chosen.resolution, chosen.channels, chosen.subset or 0, data_summary(dataset, chosen), grid,
                captioned_gallery(dataset))

    page.load(restore, session, [source, upload, hub_row, hub_id, hub_captions, resolution, channels, subset, summary,
                                 preview, captions], api_visibility="private")

"""Images in memory: one dataset type and its loaders.

Every loader returns an `ImageDataset`: uint8 images (N, C, H, W) at the requested resolution
and channel count, optional integer labels, and a stable global id per image (its position in
the source before any subset is taken), plus the files that were rejected and why.
"""
from __future__ import annotations

import io
import json
import posixpath
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import MAX_IMAGES, RESIZE_FILTERS, ConfigError, DataConfig
from .hub import DATASET_FILES, fetch, is_hub_id

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
BUILTIN = ("digits",)

# Limits on what a user may hand us (uploads reach the app from anyone).
MAX_FILES = 2 * MAX_IMAGES  # an image and its caption file each
MAX_FILE_BYTES = 50 * 2**20
MAX_CAPTION_CHARS = 4_000
MAX_ARCHIVE_BYTES = 2 * 2**30  # total uncompressed size of an archive's entries (and of an upload)
MAX_PIXELS = 40_000_000  # one decoded image; larger is treated as a decompression bomb
MAX_DATASET_PIXELS = 250_000_000  # all decoded images of one folder or archive together (seconds of CPU, not minutes)
# What zipfile raises for damaged, encrypted or exotic archives and entries (found by fuzzing;
# UnicodeDecodeError from garbled names is a ValueError).
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError, ValueError)


class DataError(ConfigError):
    """The data cannot be used; the message says what to do."""


@dataclass(frozen=True)
class SourcePolicy:
    """What a server may read: data from built-in datasets, Hub ids (`hf:owner/name`), and
    files or `save_to_disk` folders inside the data folders its admin named (uploads are kept
    in one); models (a pipeline to fine-tune, a copy-detection feature extractor) from Hub ids
    or inside the model folders its admin named. A Hub id is only ever fetched from the Hub
    (iet_core.hub), and with `hub` off not at all. Every refusal reads the same, so no answer
    tells whether a server path exists."""

    folders: tuple[Path, ...] = ()
    model_folders: tuple[Path, ...] = ()
    hub: bool = True  # visitors may name Hub datasets and models (the server downloads them)

    @classmethod
    def allowing(cls, *folders: str | Path, models: tuple[str | Path, ...] = (), hub: bool = True) -> "SourcePolicy":
        resolve = lambda paths: tuple(Path(f).expanduser().resolve() for f in paths)
        return cls(resolve(folders), resolve(models), hub)

    def _check_hub(self, setting: str, spec: str) -> None:
        if not self.hub:
            raise DataError(f"{setting}={spec[:200]!r}: this server does not download from the Hugging Face Hub (its "
                            "admin turned it off): use a built-in dataset, upload images, or choose one of the models "
                            "this server offers.")

    def check(self, source: str) -> None:
        """A run's data.source."""
        if source in BUILTIN:
            return
        if source.startswith("hf:") and is_hub_id(source[3:]):
            return self._check_hub("data.source", source)
        if not _inside(source[3:] if source.startswith("hf:") else source, self.folders):
            raise DataError(f"data source {source[:200]!r} is not available on this server: use a built-in dataset "
                            f"({', '.join(BUILTIN)}), upload images, or give a Hugging Face dataset id as hf:owner/name.")

    def check_model(self, pretrained: str | None, setting: str = "model.pretrained") -> None:
        """A run's model.pretrained: a Hub id, or a path inside the admin's model folders."""
        self._check_model_source(pretrained, setting, "give a Hugging Face model id as owner/name, or choose one of "
                                                      "the models this server offers")

    def check_feature_extractor(self, source: str | None, setting: str = "text2image.feature_extractor") -> None:
        """A run's text2image.feature_extractor (or clip_model): none (the pixel stand-in; no
        CLIP score), a Hub id of a transformers model, or a file or folder inside the admin's
        model folders."""
        self._check_model_source(source, setting, "leave it empty, or choose one of the models this server offers")

    def check_run(self, config) -> None:
        """Every source a RunConfig names: data, base model, feature extractor, CLIP model."""
        self.check(config.data.source)
        self.check_model(config.model.pretrained)
        self.check_feature_extractor(config.text2image.feature_extractor)
        self.check_feature_extractor(config.text2image.clip_model, "text2image.clip_model")

    def check_hub_use(self, config) -> None:
        """With the Hub off, a run that names Hub ids (made before the admin turned it off, or
        with the CLI) is not resumed or measured here: that would download them."""
        data = config.data.source[3:] if config.data.source.startswith("hf:") else None
        for setting, source in (("data.source", data), ("model.pretrained", config.model.pretrained),
                                ("text2image.feature_extractor", config.text2image.feature_extractor),
                                ("text2image.clip_model", config.text2image.clip_model)):
            if source is not None and is_hub_id(source):
                self._check_hub(setting, source)

    def _check_model_source(self, source: str | None, setting: str, advice: str) -> None:
        if source is None:
            return
        if is_hub_id(source):
            return self._check_hub(setting, source)
        if not _inside(source, self.model_folders):
            raise DataError(f"{setting}={source[:200]!r} is not available on this server: {advice}.")

    def offered_models(self) -> dict[str, Path]:
        """What the admin's model folders hold, by a name a visitor may see (no server path):
        each model folder's entries (a folder that is itself a pipeline is one entry)."""
        offered = {}
        for folder in self.model_folders:
            entries = [folder] if (folder / "model_index.json").exists() else sorted(folder.glob("[!.]*"))
            for entry in entries:
                offered.setdefault(entry.name if entry.name not in offered else f"{folder.name}/{entry.name}", entry)
        return offered


def _inside(local: str, folders: tuple[Path, ...]) -> bool:
    try:
        path = Path(local).expanduser().resolve()  # links resolved: a link out of a folder is outside it
    except (OSError, RuntimeError, ValueError):
        return False
    return bool(local) and any(path.is_relative_to(folder) for folder in folders)


class _PixelBudget:
    """Decoded pixels left for one folder or archive, taken from each image's header before
    it is decoded (many large images in a small archive cost minutes of CPU otherwise)."""

    def __init__(self, limit: int = MAX_DATASET_PIXELS):
        self.left = limit

    def take(self, width: int, height: int) -> None:
        if width * height > self.left:
            raise DataError(f"the images add up to over {MAX_DATASET_PIXELS:,} pixels (the limit per dataset): "
                            "use fewer or smaller images")
        self.left -= width * height


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor | None  # int64 (N,) or None
    ids: torch.Tensor  # int64 (N,), stable global ids
    name: str = "dataset"
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    captions: list[str] | None = None  # one per image, for text-to-image fine-tuning
    resize_filter: str = "auto"  # how the images were resized (it changes distances: recorded with results)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}.")
        if len(self.ids) != len(self.images) or any(v is not None and len(v) != len(self.images)
                                                    for v in (self.labels, self.captions)):
            raise DataError("images, labels, captions and ids must have the same length.")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.images.shape[2]

    def select(self, positions: torch.Tensor | np.ndarray | list[int]) -> "ImageDataset":
        positions = torch.as_tensor(positions, dtype=torch.long)
        labels = None if self.labels is None else self.labels[positions]
        captions = None if self.captions is None else [self.captions[i] for i in positions.tolist()]
        return ImageDataset(self.images[positions], labels, self.ids[positions], self.name, list(self.rejected), captions,
                            self.resize_filter)

    def to_model_space(self) -> torch.Tensor:
        """float32 in [-1, 1], the model's input space."""
        return self.images.float().div(127.5).sub(1.0)


# -- conversion ---------------------------------------------------------------------------

RESAMPLING = {name: getattr(Image.Resampling, name.upper()) for name in RESIZE_FILTERS if name != "auto"}


def pil_to_array(image: Image.Image, resolution: int, channels: int, resize_filter: str = "auto") -> np.ndarray:
    """Any PIL image (L, LA, RGBA, P, I;16, CMYK, ...) to uint8 (C, res, res): centre-crop to a
    square, resize (filter "auto": lanczos down, bicubic up), convert. Transparent pixels are
    composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64))
        lo, hi = arr.min(initial=0), arr.max(initial=1)
        image = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        if resize_filter == "auto":
            resize_filter = "bicubic" if side < resolution else "lanczos"
        image = image.resize((resolution, resolution), RESAMPLING[resize_filter])
    arr = np.asarray(image, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def decode_image(data: bytes, resolution: int, channels: int, budget: _PixelBudget | None = None,
                 resize_filter: str = "auto") -> np.ndarray:
    """Bytes of an image file to uint8 (C, res, res); raises DataError with the reason."""
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"file is larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise DataError(f"image has {image.width}x{image.height} pixels, over the {MAX_PIXELS:,} pixel limit")
            if budget is not None:
                budget.take(image.width, image.height)
            image.load()
            return pil_to_array(image, resolution, channels, resize_filter)
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(f"image is over the {MAX_PIXELS:,} pixel limit") from None
    except Image.UnidentifiedImageError:  # its message names an in-memory buffer, nothing a user can act on
        raise DataError("not a readable image (unknown format or a damaged file)") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for unreadable files
        raise DataError(f"not a readable image ({err})") from None


def array_to_images(array: np.ndarray, resolution: int, channels: int, resize_filter: str = "auto") -> np.ndarray:
    """An image array (N,H,W), (N,H,W,C) or (N,C,H,W) of any numeric type to uint8 (N,C,res,res)."""
    arr = np.asarray(array)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise DataError(f"images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {arr.shape}.")
    if arr.shape[1] not in (1, 3, 4) and arr.shape[-1] in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.shape[1] not in (1, 3, 4):
        raise DataError(f"cannot tell the channel axis of images with shape {arr.shape}: use 1, 3 or 4 channels.")
    if len(arr) == 0:
        raise DataError("the images array is empty: it needs at least one image.")
    if arr.dtype == np.uint16:  # 16-bit images, as PIL reads them too
        arr = arr / 257.0
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise DataError(f"images must hold real numbers, got {arr.dtype}.")
        arr = np.nan_to_num(arr.astype(np.float64), nan=-1.0)
        low, high = arr.min(), arr.max()
        if low >= 0.0 and high <= 1.0:
            arr = arr * 255.0
        elif low < 0.0 or high > 255.0:
            raise DataError(f"image values run from {low:g} to {high:g} (or are not finite): give values in "
                            "0..255 or 0..1 (e.g. map [-1, 1] to [0, 1] first).")
        arr = np.rint(arr).astype(np.uint8)
    if arr.shape[1] == 4:
        arr = arr[:, :3]
    src_channels = arr.shape[1]
    if src_channels == channels and arr.shape[2] == arr.shape[3] == resolution:
        return np.ascontiguousarray(arr)
    mode = "L" if src_channels == 1 else "RGB"
    out = np.empty((len(arr), channels, resolution, resolution), np.uint8)
    for i, img in enumerate(arr):
        pixels = img[0] if src_channels == 1 else img.transpose(1, 2, 0)
        out[i] = pil_to_array(Image.fromarray(pixels, mode), resolution, channels, resize_filter)
    return out


# -- loaders ------------------------------------------------------------------------------

def load_builtin(name: str, resolution: int, channels: int, resize_filter: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        # scikit-learn ships these 1,797 8x8 digits (values 0..16) inside the package: no network.
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).astype(np.float64)
        return array_to_images(images[:, None].astype(np.uint8), resolution, channels, resize_filter), digits.target.astype(np.int64)
    raise DataError(f"unknown built-in dataset {name!r}: choose one of {', '.join(BUILTIN)}.")


def _labels_from_names(names: list[str]) -> np.ndarray | None:
    """Class labels from parent folder names (class_a/img.png), when every file has one."""
    parents = [Path(n).parent.as_posix() for n in names]
    if any(p in ("", ".") for p in parents) or len(set(parents)) < 2:
        return None
    classes = {p: i for i, p in enumerate(sorted(set(parents)))}
    return np.array([classes[p] for p in parents], dtype=np.int64)


def _decode_many(entries, resolution: int, channels: int, where: str, resize_filter: str = "auto"):
    """(name, bytes-reader) pairs to images, the names decoded and rejects (name, reason)."""
    images, names, rejected = [], [], []
    budget = _PixelBudget()
    for name, read in entries:
        try:
            images.append(decode_image(read(), resolution, channels, budget, resize_filter))
            names.append(name)
        except DataError as err:
            rejected.append((name, str(err)))
    if not images:
        reasons = "; ".join(f"{n}: {r}" for n, r in rejected[:5])
        raise DataError(f"{where} has no usable images{' (' + reasons + ')' if reasons else ''}: "
                        f"add PNG or JPEG files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return np.stack(images), names, rejected


def _read_file(path: Path) -> bytes:
    """A file's bytes, its size checked before anything is read."""
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"file is larger than {MAX_FILE_BYTES // 2**20} MiB")
    return path.read_bytes()


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


@contextmanager
def source_files(path: Path):
    """The files of a folder or a .zip as {relative name: reader of its bytes}, plus (name,
    reason) for entries refused on sight (links out of the folder, unsafe archive paths,
    oversized entries). A zip is read straight from the archive, never extracted to disk (no
    zip-slip possible); sizes and counts are checked from the central directory before
    anything is decompressed. Messages name the source by its last part only: a server never
    shows its own paths."""
    if path.is_dir():
        root = path.resolve()
        found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if len(found) > MAX_FILES:
            raise DataError(f"{path.name} holds {len(found):,} files, over the {MAX_FILES:,} limit: use a smaller folder.")
        files, rejected = {}, []
        for file in found:
            name = file.relative_to(path).as_posix()
            if not file.resolve().is_relative_to(root):
                rejected.append((name, "a link to a file outside the folder"))
            else:
                files[name] = lambda file=file: _read_file(file)
        yield files, rejected
        return
    try:
        archive = zipfile.ZipFile(path)
    except ZIP_ERRORS as err:
        raise DataError(f"{path.name} is not a readable zip archive ({err}).") from None
    with archive:
        files, rejected = {}, []
        infos = sorted((i for i in archive.infolist() if not i.is_dir()), key=lambda i: i.filename)
        if len(infos) > MAX_FILES:
            raise DataError(f"{path.name} has {len(infos):,} files, over the {MAX_FILES:,} limit.")
        total = sum(i.file_size for i in infos)
        if total > MAX_ARCHIVE_BYTES:
            raise DataError(f"{path.name} unpacks to {total / 2**30:.1f} GiB, over the {MAX_ARCHIVE_BYTES / 2**30:.0f} GiB limit.")
        for info in infos:
            name = info.filename
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or ".." in parts or ":" in name:
                rejected.append((name, "unsafe path in archive (absolute or with '..')"))
            elif "__MACOSX" in parts or Path(name).name.startswith("."):
                continue
            elif info.file_size > MAX_FILE_BYTES:
                rejected.append((name, f"file is larger than {MAX_FILE_BYTES // 2**20} MiB"))
            else:
                files[name] = lambda info=info: _read_member(archive, info)
        yield files, rejected


def source_name(path: Path) -> str:
    return f"the folder {path.name}" if path.is_dir() else f"the archive {path.name}"


def image_entries(files: dict, where: str) -> tuple[list, list[tuple[str, str]]]:
    """The image files among `files` (name, reader), and the others as rejected."""
    entries = [(name, read) for name, read in files.items() if is_image_name(name)]
    if len(entries) > MAX_IMAGES:
        raise DataError(f"{where} holds {len(entries):,} images, over the {MAX_IMAGES:,} limit: use a smaller set.")
    return entries, [(name, "not an image file (by extension)") for name in files if not is_image_name(name)]


def load_files(path: Path, resolution: int, channels: int, resize_filter: str = "auto"):
    """Images of a folder or a .zip, class labels from their folders."""
    where = source_name(path)
    with source_files(path) as (files, rejected):
        entries, others = image_entries(files, where)
        images, names, bad = _decode_many(entries, resolution, channels, where, resize_filter)
    return images, _labels_from_names(names), rejected + others + bad


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    # Read at most the declared size plus one byte: a lying header cannot inflate further.
    try:
        with archive.open(info) as handle:
            data = handle.read(info.file_size + 1)
    except ZIP_ERRORS as err:
        # damaged, encrypted or unsupported entries: reject this one, keep the rest
        raise DataError(f"damaged or unsupported archive entry ({err})") from None
    if len(data) > info.file_size:
        raise DataError("entry is larger than its header says")
    return data


def load_npz(path: Path, resolution: int, channels: int, resize_filter: str = "auto", caption_column: str | None = None):
    """`images`, optional `labels` and, with caption_column, that array of captions (text, one
    per image: how the app keeps a captioned upload). Returns images, labels, captions, rejected."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz:
                raise DataError(f"{path.name} has no 'images' array (found: {', '.join(npz.files) or 'nothing'}).")
            if caption_column and caption_column not in npz:
                raise DataError(f"{path.name} has no {caption_column!r} array of captions (found: {', '.join(npz.files)}): "
                                "name the array that holds them, or unset data.caption_column.")
            images = npz["images"]
            labels = npz["labels"].astype(np.int64).reshape(-1) if "labels" in npz else None
            texts = npz[caption_column] if caption_column else None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        reason = err if isinstance(err, ValueError) else "damaged, or not an .npz archive"  # OSErrors name the path
        raise DataError(f"{path.name} is not a readable .npz file ({reason}).") from None
    for name, values in (("labels", labels), (caption_column, texts)):
        if values is not None and len(values) != len(images):
            raise DataError(f"{path.name}: {name!r} has {len(values)} entries but 'images' has {len(images)}.")
    captions = None
    if texts is not None:
        if texts.dtype.kind != "U" or texts.ndim != 1:
            raise DataError(f"{path.name}: {caption_column!r} must be a 1-D array of text, got {texts.dtype} {texts.shape}.")
        captions = [check_caption(str(text)) for text in texts]
    return array_to_images(images, resolution, channels, resize_filter), labels, captions, []


def load_hf(spec: str, split: str, image_column: str | None, label_column: str | None, caption_column: str | None,
            resolution: int, channels: int, resize_filter: str = "auto"):
    """A Hugging Face dataset: a Hub id (`owner/name`, always read from the Hub), or a local
    folder written by `save_to_disk`. Returns images, labels, captions (when caption_column is
    given) and rejected rows."""
    import datasets

    folder = None
    if is_hub_id(spec):  # fetched (data files only) and loaded from its snapshot, never a local folder of that name
        try:
            folder = fetch(spec, "data.source", DATASET_FILES, repo_type="dataset")
        except ConfigError as err:
            raise DataError(str(err)) from None
    try:
        if folder is not None:
            ds = datasets.load_dataset(str(folder), split=split)
        else:
            ds = datasets.load_from_disk(str(Path(spec).expanduser()))
    except Exception as err:  # the loaders raise many types; all mean "cannot load this"
        raise DataError(f"cannot load Hugging Face dataset {spec[:200]!r} ({type(err).__name__}). Give a Hub id "
                        "(owner/name) and check the network, or a folder written by `save_to_disk`.") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"dataset {spec!r} has no split {split!r}: choose one of {', '.join(ds)}.")
        ds = ds[split]
    features = ds.features
    if image_column is None:
        image_column = next((k for k, v in features.items() if isinstance(v, datasets.Image)), None)
        if image_column is None:
            raise DataError(f"dataset {spec!r} has no image column (columns: {', '.join(features)}): name one.")
    for column in (image_column, caption_column):
        if column is not None and column not in features:
            raise DataError(f"dataset {spec!r} has no column {column!r} (columns: {', '.join(features)}).")
    if label_column is None:
        label_column = next((c for c in ("label", "labels") if c in features), None)
    if len(ds) > MAX_IMAGES:
        raise DataError(f"dataset {spec!r} has {len(ds):,} images, over the {MAX_IMAGES:,} limit: take a subset first.")
    texts = ds[caption_column] if caption_column else None
    images, kept, rejected = [], [], []
    for i, image in enumerate(ds[image_column]):
        try:
            if texts is not None:
                check_caption(texts[i])
            images.append(pil_to_array(image, resolution, channels, resize_filter))
            kept.append(i)
        except DataError as err:
            rejected.append((f"row {i}", str(err)))
        except (OSError, ValueError) as err:
            rejected.append((f"row {i}", f"not a readable image ({err})"))
    if not images:
        raise DataError(f"dataset {spec!r} has no usable images.")
    labels = None if label_column is None else np.asarray(ds[label_column], dtype=np.int64)[kept]
    captions = None if texts is None else [texts[i].strip() for i in kept]
    return np.stack(images), labels, captions, rejected


def check_caption(text) -> str:
    """A usable caption, or DataError with the reason."""
    if not isinstance(text, str) or not text.strip():
        raise DataError("no caption (empty or not text)")
    if len(text) > MAX_CAPTION_CHARS:
        raise DataError(f"caption is longer than {MAX_CAPTION_CHARS:,} characters")
    return text.strip()


# -- captioned sets, in the layouts people already have (hf:<id> with a text column: load_hf):
# Hugging Face `imagefolder` (images plus `metadata.jsonl` lines {"file_name": ..., "text": ...},
# a metadata.jsonl naming files relative to its own folder), or same-name `.txt` captions
# (cat.png + cat.txt); a .zip of either.

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


def has_captions(path: Path) -> bool:
    """Whether a folder or .zip carries captions: a metadata.jsonl, or an image's same-name .txt
    (a README.txt beside unlabelled images does not make them a captioned set)."""
    with source_files(path) as (files, _):
        caption_files = {posixpath.splitext(name)[0] + ".txt" for name in files if is_image_name(name)}
        return any(posixpath.basename(name) == METADATA or name in caption_files for name in files)


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


def load_dataset(config: DataConfig, policy: SourcePolicy | None = None) -> ImageDataset:
    """The dataset a DataConfig describes, subset and all. Raises DataError with what to do.
    A server passes its `policy`: then only the sources it allows are read."""
    config.validate()
    if policy is not None:
        policy.check(config.source)
    source, res, ch, resize = config.source, config.resolution, config.channels, config.resize_filter
    rejected: list[tuple[str, str]] = []
    labels = captions = None
    path = Path(source).expanduser()
    if config.caption_column and source in BUILTIN:
        raise DataError(f"data.caption_column is set but {source!r} has no captions: give a captioned folder or .zip "
                        "(metadata.jsonl or same-name .txt files), an .npz with an array of captions, or 'hf:<id>' with "
                        "a text column, or unset it.")
    if source in BUILTIN:
        images, labels = load_builtin(source, res, ch, resize)
        name = source
    elif source.startswith("hf:"):
        images, labels, captions, rejected = load_hf(source[3:], config.hf_split, config.hf_image_column,
                                                     config.hf_label_column, config.caption_column, res, ch, resize)
        name = source[3:]
    else:
        name = path.stem
        if not path.exists():
            raise DataError(f"data source {source!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor an "
                            "existing path: give a folder, a .zip or an .npz file, or 'hf:<dataset id>'.")
        if (path.is_dir() or path.suffix.lower() == ".zip") and config.caption_column:
            images, captions, rejected = load_captioned_files(path, config.caption_column, res, ch, resize)
        elif path.is_dir() or path.suffix.lower() == ".zip":
            images, labels, rejected = load_files(path, res, ch, resize)
        elif path.suffix.lower() == ".npz":
            images, labels, captions, rejected = load_npz(path, res, ch, resize, config.caption_column)
        else:
            raise DataError(f"{path.name}: unsupported file type; give a folder of images, a .zip or an .npz.")
    ids = np.arange(len(images), dtype=np.int64)
    if config.subset is not None and config.subset < len(images):
        keep = np.sort(np.random.default_rng(config.subset_seed).choice(len(images), config.subset, replace=False))
        images, ids = images[keep], ids[keep]
        labels = None if labels is None else labels[keep]
        captions = None if captions is None else [captions[i] for i in keep]
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)),
                        None if labels is None else torch.from_numpy(labels), torch.from_numpy(ids), name, rejected,
                        captions, resize)


import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import random_images
from iet_core.config import ConfigError, DataConfig
from iet_core.data import DataError, load_dataset


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_builtin_digits_offline_with_stable_ids_and_subset():
    full = load_dataset(DataConfig(source="digits", resolution=8, channels=1, subset=None))
    assert full.images.shape == (1797, 1, 8, 8) and full.images.dtype == torch.uint8
    assert full.labels is not None and full.ids.tolist() == list(range(1797))
    part = load_dataset(DataConfig(source="digits", resolution=16, channels=3, subset=50, subset_seed=3))
    assert part.images.shape == (50, 3, 16, 16)
    assert torch.equal(part.images[:, 0], part.images[:, 2])  # grey copied to RGB
    # a subset's ids point back at the same images of the full set
    full16 = load_dataset(DataConfig(source="digits", resolution=16, channels=3, subset=None))
    assert torch.equal(full16.images[part.ids], part.images)
    assert torch.equal(full16.labels[part.ids], part.labels)


def test_folder_with_class_subfolders_modes_and_rejects(tmp_path):
    arrays = random_images(6, size=12, channels=3)
    for i, array in enumerate(arrays):
        folder = tmp_path / ("cats" if i < 3 else "dogs")
        folder.mkdir(exist_ok=True)
        mode = ["RGB", "L", "RGBA", "P", "CMYK", "LA"][i]
        if mode == "CMYK":
            Image.fromarray(array).convert("CMYK").save(folder / f"{i}.jpg")
        else:
            (folder / f"{i}.png").write_bytes(_png(array, mode))
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = load_dataset(DataConfig(source=str(tmp_path), resolution=8, channels=3, subset=None))
    assert ds.images.shape == (6, 3, 8, 8)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    reasons = dict(ds.rejected)
    assert "not an image file" in reasons["cats/notes.txt"]
    assert "not a readable image" in reasons["dogs/broken.png"]
    assert "object at 0x" not in reasons["dogs/broken.png"]  # no Python object reprs in what users read
    grey = load_dataset(DataConfig(source=str(tmp_path), resolution=8, channels=1, subset=None))
    assert grey.images.shape == (6, 1, 8, 8)


def test_sixteen_bit_and_non_square_images_are_converted(tmp_path):
    deep = (np.linspace(0, 65535, 20 * 30).reshape(20, 30)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    ds = load_dataset(DataConfig(source=str(tmp_path), resolution=8, channels=1, subset=None))
    assert ds.images.shape == (1, 1, 8, 8)
    assert ds.images.max() > 200 and ds.images.min() < 60  # the range survives, not clipped to white


def test_zip_reads_images_and_rejects_unsafe_entries(tmp_path):
    arrays = random_images(4, size=10)
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i, array in enumerate(arrays):
            archive.writestr(f"imgs/{i}.png", _png(array))
        archive.writestr("../evil.png", _png(arrays[0]))
        archive.writestr("/abs.png", _png(arrays[0]))
        archive.writestr("readme.md", "hello")
        archive.writestr("__MACOSX/._0.png", b"junk")
    ds = load_dataset(DataConfig(source=str(path), resolution=8, channels=1, subset=None))
    assert len(ds) == 4
    reasons = dict(ds.rejected)
    assert "unsafe path" in reasons["../evil.png"] and "unsafe path" in reasons["/abs.png"]
    assert "not an image" in reasons["readme.md"]
    assert not (tmp_path / "evil.png").exists()
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    with pytest.raises(DataError, match="not a readable zip"):
        load_dataset(DataConfig(source=str(tmp_path / "bad.zip")))


def test_npz_layouts(tmp_path):
    nhwc = random_images(5, size=8, channels=3).astype(np.float32) / 255.0  # floats in [0, 1]
    np.savez(tmp_path / "a.npz", images=nhwc, labels=np.arange(5))
    ds = load_dataset(DataConfig(source=str(tmp_path / "a.npz"), resolution=8, channels=3, subset=None))
    assert ds.images.shape == (5, 3, 8, 8) and ds.labels.tolist() == [0, 1, 2, 3, 4]
    expected = np.rint(nhwc * 255).astype(np.uint8).transpose(0, 3, 1, 2)
    assert np.array_equal(ds.images.numpy(), expected)
    nchw = random_images(3, size=16, channels=3).transpose(0, 3, 1, 2)
    np.savez(tmp_path / "b.npz", images=nchw)
    ds = load_dataset(DataConfig(source=str(tmp_path / "b.npz"), resolution=8, channels=1, subset=None))
    assert ds.images.shape == (3, 1, 8, 8) and ds.labels is None
    np.savez(tmp_path / "c.npz", pictures=nchw)
    with pytest.raises(DataError, match="no 'images' array"):
        load_dataset(DataConfig(source=str(tmp_path / "c.npz")))


def test_hugging_face_dataset_from_a_local_folder(tmp_path):
    import datasets

    arrays = random_images(6, size=12, channels=3)
    table = datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in arrays], "label": [0, 1, 0, 1, 2, 2]},
                                       features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}))
    table.save_to_disk(str(tmp_path / "hf"))
    ds = load_dataset(DataConfig(source=f"hf:{tmp_path / 'hf'}", resolution=8, channels=3, subset=4))
    assert ds.images.shape == (4, 3, 8, 8) and len(ds.labels) == 4
    with pytest.raises(DataError, match="no column"):
        load_dataset(DataConfig(source=f"hf:{tmp_path / 'hf'}", hf_image_column="photo"))
    with pytest.raises(DataError, match="cannot fetch data.source='no-such-user/no-such-dataset' from the Hugging Face Hub"):
        load_dataset(DataConfig(source="hf:no-such-user/no-such-dataset"))  # offline in tests


def test_missing_and_empty_sources_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="neither a built-in dataset"):
        load_dataset(DataConfig(source=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images"):
        load_dataset(DataConfig(source=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="channels"):
        load_dataset(DataConfig(channels=2))

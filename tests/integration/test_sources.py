"""Data sources on a real local Ray: shapes, classes, counts, splits, corrupt files, errors."""

from __future__ import annotations

import io
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from ray.data.extensions import ArrowTensorArray
from sklearn.datasets import load_digits

from distdl.config import DataConfig
from distdl.data import sources
from distdl.data.sources import (
    SHAPE_CLASSES,
    decode_image,
    generate_shapes,
    load_images,
    normalization_stats,
)
from distdl.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def _ray(ray_address):
    # The env var only counts if set before ray.data was first imported; this always works.
    ray.data.DataContext.get_current().enable_progress_bars = False


def _arrays(ds: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=4096, batch_format="numpy"))
    return (np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["label"] for b in batches]))


def _keys(ds: ray.data.Dataset) -> Counter:
    images, labels = _arrays(ds)
    return Counter(image.tobytes() + bytes([label]) for image, label in zip(images, labels))


def _png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_file(folder: Path) -> Path:
    path = folder / "single.png"
    path.write_bytes(_png(np.zeros((4, 4), np.uint8)))
    return path


def _class_image(label: int, i: int, shape: tuple[int, ...]) -> np.ndarray:
    """A distinct image whose mean pixel value encodes its class (60 * label + 30)."""
    pixels = np.full(shape, 60 * label + 30, dtype=np.uint8)
    pixels.flat[i % pixels.size] += 1 + i  # unique content per image
    return pixels


# ---------------------------------------------------------------- digits


def test_digits_shapes_classes_and_batches():
    data = load_images(DataConfig(source="digits"))
    assert data.classes == [str(i) for i in range(10)]
    assert data.image_shape == (1, 8, 8) and data.skipped == 0
    batch = next(iter(data.train.iter_batches(batch_size=32, batch_format="numpy")))
    assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int64
    assert data.train.num_blocks() >= 2  # two workers can split it
    images, labels = _arrays(data.val)
    assert set(np.unique(images)) <= {round(v * 255 / 16) for v in range(17)}
    assert images.max() == 255 and set(labels) == set(range(10))


def test_digits_table_matches_load_digits_from_the_file_and_without_it(monkeypatch):
    digits = load_digits()
    expected = np.column_stack([digits.data, digits.target])
    assert np.array_equal(sources._digits_table(), expected)  # read from sklearn's file
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    assert np.array_equal(sources._digits_table(), expected)  # through load_digits


def test_digits_table_reads_without_a_working_directory(tmp_path, monkeypatch):
    # A Ray job's process can run in a directory that is gone by then.
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert sources._digits_table().shape == (1797, 65)


def test_digits_split_is_deterministic_disjoint_and_complete():
    digits = load_digits()
    everything = Counter(np.rint(im * 255 / 16).astype(np.uint8)[..., None].tobytes() + bytes([t])
                         for im, t in zip(digits.images, digits.target))
    first = load_images(DataConfig(source="digits", seed=3))
    again = load_images(DataConfig(source="digits", seed=3))
    other = load_images(DataConfig(source="digits", seed=4))
    train, val = _keys(first.train), _keys(first.val)
    assert train + val == everything  # disjoint and covering, counting duplicates
    assert train == _keys(again.train) and val == _keys(again.val)
    assert val != _keys(other.val)
    assert abs(sum(val.values()) - 0.2 * 1797) <= 10


def test_val_fraction_is_respected():
    data = load_images(DataConfig(source="digits", val_fraction=0.5))
    assert abs(data.val.count() - 1797 / 2) <= 10
    assert data.train.count() + data.val.count() == 1797


def test_image_size_resizes_in_memory_sources():
    data = load_images(DataConfig(source="digits", image_size=16))
    assert data.image_shape == (1, 16, 16)
    assert _arrays(data.val)[0].shape[1:] == (16, 16, 1)


def test_normalization_stats_match_numpy():
    data = load_images(DataConfig(source="digits"))
    stats = normalization_stats(data.train)
    pixels = _arrays(data.train)[0].astype(np.float64) / 255.0
    assert stats["mean"] == pytest.approx([pixels.mean()], rel=1e-9)
    assert stats["std"] == pytest.approx([pixels.std()], rel=1e-9)


# ---------------------------------------------------------------- shapes


def test_shapes_loads_with_classes_and_counts():
    data = load_images(DataConfig(source="shapes", num_samples=200, image_size=16))
    assert data.classes == SHAPE_CLASSES and data.image_shape == (3, 16, 16)
    images, labels = _arrays(data.train)
    val_count = data.val.count()
    assert len(labels) + val_count == 200 and abs(val_count - 40) <= len(SHAPE_CLASSES)
    assert images.shape[1:] == (16, 16, 3) and set(labels) == set(range(len(SHAPE_CLASSES)))


def test_shapes_are_deterministic_per_seed():
    images, labels = generate_shapes(64, 32, seed=5)
    again, again_labels = generate_shapes(64, 32, seed=5)
    other, _ = generate_shapes(64, 32, seed=6)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    assert not np.array_equal(images, other)
    assert np.bincount(labels).min() == 64 // len(SHAPE_CLASSES)  # balanced classes
    assert images.std() > 40  # shapes on contrasting backgrounds, not a flat image


def test_shapes_dataset_is_deterministic_per_seed():
    def load(seed):
        return _keys(load_images(DataConfig(source="shapes", num_samples=40, seed=seed)).val)

    assert load(1) == load(1) and load(1) != load(2)


# ---------------------------------------------------------------- imagefolder


def _write_folder(root: Path, classes: int = 3, per_class: int = 10,
                  shape: tuple[int, ...] = (10, 12, 3)) -> None:
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i:03d}.png").write_bytes(_png(_class_image(label, i, shape)))


def test_imagefolder_skips_and_counts_corrupt_files(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "class_1" / "zz_truncated.png").write_bytes(_png(_class_image(1, 99, (10, 12, 3)))[:60])
    (tmp_path / "class_2" / "zz_text.png").write_bytes(b"this is not an image")
    (tmp_path / "class_0" / "notes.txt").write_text("ignored: not an image extension")
    data = load_images(DataConfig(source=f"imagefolder:{tmp_path}", val_fraction=0.3))
    assert data.skipped == 2
    assert data.classes == ["class_0", "class_1", "class_2"]
    assert data.image_shape == (3, 10, 12)  # the first image's size, RGB
    train_images, train_labels = _arrays(data.train)
    val_images, val_labels = _arrays(data.val)
    assert len(train_labels) + len(val_labels) == 30 and len(val_labels) > 0
    for images, labels in ((train_images, train_labels), (val_images, val_labels)):
        assert np.array_equal(np.rint((images.mean(axis=(1, 2, 3)) - 30) / 60), labels)


def test_imagefolder_grayscale_resize_and_split_stability(tmp_path):
    _write_folder(tmp_path, classes=2, per_class=15, shape=(8, 8))
    (tmp_path / "class_0" / "big.jpg").write_bytes(_png(np.full((20, 30), 30, np.uint8), "JPEG"))
    cfg = DataConfig(source=f"imagefolder:{tmp_path}", image_size=6, seed=7)
    data = load_images(cfg)
    assert data.image_shape == (1, 6, 6) and data.skipped == 0
    assert _arrays(data.train)[0].shape[1:] == (6, 6, 1)
    again = load_images(cfg)
    assert _keys(data.val) == _keys(again.val) and _keys(data.train) == _keys(again.train)
    assert sum(_keys(data.train).values()) + sum(_keys(data.val).values()) == 31


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError, match="no class folders"):
        load_images(DataConfig(source=f"imagefolder:{tmp_path}"))
    with pytest.raises(UserError, match="is not a folder"):
        load_images(DataConfig(source=f"imagefolder:{_png_file(tmp_path)}"))
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no image files"):
        load_images(DataConfig(source=f"imagefolder:{tmp_path}"))
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="could be decoded"):
        load_images(DataConfig(source=f"imagefolder:{tmp_path}"))


def test_an_odd_first_image_asks_for_data_image_size(tmp_path):
    _write_folder(tmp_path, classes=2, per_class=5)
    icon = tmp_path / "class_0" / "-icon.png"  # sorts first
    icon.write_bytes(_png(np.zeros((2, 2), np.uint8)))
    with pytest.raises(UserError, match=r"is 2x2 pixels, .* set data.image_size \(4 to 1024\)"):
        load_images(DataConfig(source=f"imagefolder:{tmp_path}"))
    data = load_images(DataConfig(source=f"imagefolder:{tmp_path}", image_size=8))
    assert data.image_shape == (3, 8, 8)


def test_training_refuses_a_single_class(tmp_path):
    from distdl import config, recipes
    from distdl.train.trainer import prepare_data

    _write_folder(tmp_path, classes=1, per_class=10)
    raw = config.merge(recipes.get("debug"), {"data": {"source": f"imagefolder:{tmp_path}"}})
    with pytest.raises(UserError, match=r"has one class \(class_0\); a classifier learns"):
        prepare_data(config.Config.from_dict(raw))


def test_a_size_of_height_and_width_and_a_whole_load(tmp_path):
    """Evaluation loads at a model's (H, W), resized once, and a set too small to split."""
    _write_folder(tmp_path, classes=2, per_class=1, shape=(20, 20, 3))
    with pytest.raises(UserError, match="the split left"):
        load_images(DataConfig(source=f"imagefolder:{tmp_path}"))
    data = load_images(DataConfig(source=f"imagefolder:{tmp_path}"), size=(5, 10), whole=True)
    images, _ = _arrays(data.train.union(data.val))
    assert data.image_shape == (1, 5, 10) and images.shape == (2, 5, 10, 1)  # gray pixels
    expected = decode_image((tmp_path / "class_0" / "000.png").read_bytes(), channels=1,
                            size=(5, 10), max_pixels=10_000)
    assert any(np.array_equal(image, expected) for image in images)
    digits = load_images(DataConfig(source="digits"), size=(4, 6))
    assert digits.image_shape == (1, 4, 6)


# ---------------------------------------------------------------- parquet


def test_parquet_bytes_column_with_int_labels_and_a_corrupt_row(tmp_path):
    images = [_class_image(i % 4, i, (6, 6, 3)) for i in range(40)]
    table = pa.table({"png": [_png(im) for im in images[:-1]] + [b"corrupt"],
                      "target": [i % 4 for i in range(40)], "extra": list(range(40))})
    pq.write_table(table, tmp_path / "data.parquet")
    cfg = DataConfig(source=f"parquet:{tmp_path / 'data.parquet'}", image_column="png",
                     label_column="target")
    data = load_images(cfg)
    assert data.classes == ["0", "1", "2", "3"] and data.image_shape == (3, 6, 6)
    assert data.skipped == 1
    assert data.train.count() + data.val.count() == 39
    assert _keys(data.val) == _keys(load_images(cfg).val)


@pytest.mark.parametrize("layout", ["nested", "flat", "tensor"])
def test_parquet_pixel_arrays_with_string_labels(tmp_path, layout):
    names = ["zebra", "ant", "moose"]
    images = np.stack([_class_image(i % 3, i, (5, 5, 3)) for i in range(30)])
    column = {"nested": lambda: [im.tolist() for im in images],
              "flat": lambda: [im.ravel().tolist() for im in images],
              "tensor": lambda: ArrowTensorArray.from_numpy(images)}[layout]()
    pq.write_table(pa.table({"image": column, "label": [names[i % 3] for i in range(30)]}),
                   tmp_path / "part-0.parquet")
    data = load_images(DataConfig(source=f"parquet:{tmp_path}"))  # a folder of Parquet files
    assert data.classes == ["ant", "moose", "zebra"] and data.image_shape == (3, 5, 5)
    loaded = _keys(data.train) + _keys(data.val)
    expected = Counter(im.tobytes() + bytes([sorted(names).index(names[i % 3])])
                       for i, im in enumerate(images))
    assert loaded == expected


def test_parquet_labels_are_their_sorted_distinct_values(tmp_path):
    images = [_png(_class_image(i % 2, i, (6, 6, 3))) for i in range(20)]
    labels = [(1, 5_000_000)[i % 2] for i in range(20)]
    pq.write_table(pa.table({"image": images, "label": labels}), tmp_path / "ints.parquet")
    data = load_images(DataConfig(source=f"parquet:{tmp_path / 'ints.parquet'}"))
    assert data.classes == ["1", "5000000"]
    loaded, classes = _arrays(data.train.union(data.val))
    assert np.array_equal(np.rint((loaded.mean(axis=(1, 2, 3)) - 30) / 60), classes)


def test_parquet_categorical_labels_and_hugging_face_image_structs(tmp_path):
    names = ["dog", "cat"]
    structs = [{"bytes": _png(_class_image(i % 2, i, (6, 6, 3))), "path": f"{i}.png"}
               for i in range(20)]
    labels = pa.array([names[i % 2] for i in range(20)]).dictionary_encode()
    pq.write_table(pa.table({"image": structs, "label": labels}), tmp_path / "hf.parquet")
    data = load_images(DataConfig(source=f"parquet:{tmp_path / 'hf.parquet'}"))
    assert data.classes == ["cat", "dog"] and data.skipped == 0
    loaded, classes = _arrays(data.train.union(data.val))
    # dog (class 1 of the sorted names) was drawn as image class 0, cat as 1.
    assert np.array_equal(np.rint((loaded.mean(axis=(1, 2, 3)) - 30) / 60), 1 - classes)


def test_parquet_missing_column_lists_the_columns(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x"], "label": [0]}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match=r"no column 'image'.*pixels, label"):
        load_images(DataConfig(source=f"parquet:{tmp_path / 'd.parquet'}"))
    with pytest.raises(UserError, match=r"no column 'y'.*pixels, label"):
        load_images(DataConfig(source=f"parquet:{tmp_path}", image_column="pixels",
                               label_column="y"))


def test_parquet_unusable_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="holds no Parquet files"):
        load_images(DataConfig(source=f"parquet:{tmp_path}"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot be read"):
        load_images(DataConfig(source=f"parquet:{tmp_path}"))
    pq.write_table(pa.table({"image": [b"x"], "label": [0.5]}), tmp_path / "broken.parquet")
    with pytest.raises(UserError, match="labels must be integers or strings"):
        load_images(DataConfig(source=f"parquet:{tmp_path}"))
    empty = pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())})
    pq.write_table(empty, tmp_path / "broken.parquet")
    with pytest.raises(UserError, match="has no rows"):
        load_images(DataConfig(source=f"parquet:{tmp_path}"))


# ---------------------------------------------------------------- cifar10


def _write_cifar(root: Path, rows: int = 12) -> None:
    root.mkdir(parents=True)
    # Real batches are Python 2 pickles: bytes keys, data rows of 3072 uint8 as R, G, B planes.
    for b, name in enumerate(["data_batch_1", "data_batch_2", "test_batch"]):
        data = np.empty((rows, 3, 32, 32), dtype=np.uint8)
        labels = [(b * rows + i) % 10 for i in range(rows)]
        for i, label in enumerate(labels):
            data[i] = np.array([label, 100 + label, 200 + i])[:, None, None]
        batch = {b"batch_label": name.encode(), b"labels": labels,
                 b"data": data.reshape(rows, 3072), b"filenames": [b"x.png"] * rows}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [f"name{i}".encode() for i in range(10)]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))


def test_cifar10_pickled_batches(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        data = load_images(DataConfig(source=f"cifar10:{path}", val_fraction=0.25))
        assert data.classes == [f"name{i}" for i in range(10)] and data.image_shape == (3, 32, 32)
        images, labels = _arrays(data.train)
        assert len(labels) + data.val.count() == 36
        assert np.array_equal(images[:, 5, 7, 0], labels)  # CHW planes became HWC pixels
        assert np.array_equal(images[:, 0, 0, 1], labels + 100)


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    root = tmp_path / "cifar"
    _write_cifar(root)

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(UserError, match="not a readable CIFAR-10 batch"):
        load_images(DataConfig(source=f"cifar10:{root}"))


@pytest.mark.parametrize(("batch", "message"), [
    ([1, 2, 3], "it holds a list, not a dict"),
    ({b"labels": [0]}, "it needs 'data'"),
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]},
     r"\(3, 3072\) data for \(2,\) labels"),
])
def test_cifar10_batches_that_do_not_hold_together(tmp_path, batch, message):
    root = tmp_path / "cifar"
    _write_cifar(root)
    (root / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UserError, match=message):
        load_images(DataConfig(source=f"cifar10:{root}"))


# ---------------------------------------------------------------- names and paths


def test_unknown_source_lists_the_choices():
    with pytest.raises(UserError, match="unknown dataset 'mnist'; choose digits, shapes"):
        load_images(DataConfig(source="mnist"))
    with pytest.raises(UserError, match="unknown dataset 'parquet:'"):
        load_images(DataConfig(source="parquet:"))


@pytest.mark.parametrize("kind", ["imagefolder", "parquet", "cifar10"])
def test_missing_path_is_named(tmp_path, kind):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"path not found: {missing}"):
        load_images(DataConfig(source=f"{kind}:{missing}"))

"""Image data sources: a name or URI -> train and validation Ray Datasets of uint8 HWC images.

Sources (`DataConfig.source`):

- ``digits``: scikit-learn's 1,797 handwritten digits, 8x8 grayscale, scaled from 0..16 to 0..255.
- ``shapes``: generated colour images of eight geometric shapes (`generate_shapes`).
- ``imagefolder:PATH``: one sub-folder per class (sorted folder names are the classes).
- ``parquet:PATH``: a Parquet file or folder; `image_column` holds encoded images (bytes, or
  structs with a `bytes` field as Hugging Face's datasets writes them) or pixel arrays (H x W,
  H x W x C, C x H x W, or flat with a square side; integers are read as 0..255, floats as
  0..1), `label_column` holds integers or strings (pandas categoricals too); its sorted distinct
  values are the classes.
- ``cifar10:PATH``: the python-pickle CIFAR-10 batches (PATH or PATH/cifar-10-batches-py). All six
  batches are pooled and split like every other source, so `val_fraction` means the same
  everywhere (1/6 gives the usual 50,000 / 10,000 sizes).

Every dataset has the columns ``image`` (uint8, H x W x C) and ``label`` (int64).

Size and channels: images are resized to `image_size` when it is set; otherwise file sources
are resized to the size of their first readable image (in path order for folders), which must
lie within data.image_size's bounds. Folder and Parquet images become RGB, or single-channel
when every image is grayscale (R == G == B in every pixel, as for mode-L files), so a grayscale
folder does not pay for three channels.

Split: deterministic for a given seed and `val_fraction`. In-memory sources (digits, shapes,
cifar10) split each class with a seeded permutation. File sources put an example in validation
when a hash of (seed, key) falls under `val_fraction`, where the key is the path relative to the
folder (imagefolder) or the image's content (parquet): the split then does not depend on read
order or on how many workers read, and duplicate images never straddle the split.

Corrupt files: an image that cannot be decoded (truncated, not an image, more than MAX_PIXELS
pixels, a pixel array of no image shape) is skipped and counted in `ImageData.skipped`, with one
warning for the whole load: one bad file in a scraped folder should not cost a training run. When
no image at all can be decoded, that is a UserError.

Loading decodes file sources once and keeps the decoded images in Ray's object store
(`materialize`), so the skip count is known up front and epochs do not decode again.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.extensions import ArrowTensorArray
from ray.data.dataset import MaterializedDataset

from distdl.config import IMAGE_SIDES, DataConfig
from distdl.data.transforms import decode_image, resize_uint8
from distdl.errors import UserError

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000
"""Largest image decoded (pixels); bigger files are treated as unreadable (decompression bombs)."""
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SHAPES_SIDE = 32  # default side (pixels) of generated shapes
SHAPE_CLASSES = ["circle", "square", "triangle", "diamond", "plus", "cross", "ring", "frame"]
_BLOCK_BYTES = 8 << 20  # target block size of in-memory datasets: a few blocks per worker
_LOCAL_STATS_BYTES = 64 << 20  # in-memory datasets up to this size get their statistics locally
_DECODE_BATCH = 64  # images per decode call: small batches spread a folder over every CPU
_PROBE_LIMIT = 100  # images tried to find the size of the first readable one
_HASH_BUCKETS = 1_000_000  # resolution of the file-source split (val_fraction in millionths)
_CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@dataclass(frozen=True)
class ImageData:
    train: ray.data.Dataset
    """Training examples: "image" uint8 (H, W, C), "label" int64."""
    val: ray.data.Dataset
    """Validation examples, same columns."""
    classes: list[str]
    """Class names; the label is the index."""
    image_shape: tuple[int, int, int]
    """(C, H, W) of every image in train and val."""
    skipped: int
    """Unreadable or corrupt images skipped (0 for in-memory sources)."""


def check_source(source: str) -> Path | None:
    """The path that a file source names (None for digits and shapes); a UserError for an
    unknown source, a missing path, or a folder not laid out as its kind needs. It reads no
    data, so the CLI checks before Ray starts."""
    kind, _, rest = source.partition(":")
    if source in ("digits", "shapes"):
        return None
    if kind in _FILE_LOADERS and rest:
        path = _existing(rest, source)
        if kind in _LAYOUT_CHECKS:  # a glance at the folder, not a read of the data
            _LAYOUT_CHECKS[kind](path)
        return path
    raise UserError(f"unknown dataset '{source}'; choose digits, shapes, imagefolder:PATH, "
                    "parquet:PATH or cifar10:PATH")


def load_images(cfg: DataConfig, *, size: tuple[int, int] | None = None,
                whole: bool = False) -> ImageData:
    """Load the source named by `cfg.source`, split into train and validation.

    `size` (H, W) overrides `cfg.image_size`, for a model whose input is not square. `whole`:
    every image is wanted, as by evaluation, so a split that leaves one side empty is no error.
    """
    path = check_source(cfg.source)
    size = size or ((cfg.image_size, cfg.image_size) if cfg.image_size else None)
    if path is None:
        images, labels, classes = _digits() if cfg.source == "digits" else _shapes(cfg, size)
        data = _from_arrays(images, labels, classes, cfg, size, whole)
    else:
        data = _FILE_LOADERS[cfg.source.partition(":")[0]](cfg, path, size, whole)
    log.info("%s: %d classes, images of shape %s (C, H, W), %d skipped", cfg.source,
             len(data.classes), data.image_shape, data.skipped)
    return data


def _existing(path_text: str, source: str) -> Path:
    path = Path(path_text).expanduser().resolve()
    if not path.exists():
        raise UserError(f"data.source '{source}': path not found: {path_text}")
    return path


# ---------------------------------------------------------------- in-memory sources


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    table = _digits_table()
    pixels = table[:, :-1].reshape(-1, 8, 8)
    images = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, table[:, -1].astype(np.int64), [str(i) for i in range(10)]


def _digits_table() -> np.ndarray:
    """scikit-learn's digits: 1,797 rows of 64 pixel values (0..16) and the label.

    Read from the file scikit-learn ships them in: importing sklearn for `load_digits` took
    0.9 to 1.0 s here, on the way to the first training step of the default run.
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            # An open file, not the path: for a path, numpy resolves the working directory,
            # which a Ray job's process may no longer have.
            with gzip.open(path, "rt") as table:
                return np.loadtxt(table, delimiter=",")
    from sklearn.datasets import load_digits  # a scikit-learn that keeps the file elsewhere

    digits = load_digits()
    return np.column_stack([digits.data, digits.target])


def _shapes(cfg: DataConfig, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    # Drawn square at the larger side; _from_arrays resizes a (H, W) that is not square.
    images, labels = generate_shapes(cfg.num_samples, max(size or (SHAPES_SIDE,)), cfg.seed)
    return images, labels, list(SHAPE_CLASSES)


def _cifar10(cfg: DataConfig, path: Path, size: tuple[int, int] | None, whole: bool) -> ImageData:
    root, present = _cifar_batches(path)
    if len(present) < len(_CIFAR_BATCHES):
        log.warning("%s: reading only %s of the six CIFAR-10 batches", root, ", ".join(present))
    parts = [_cifar_batch(root / name) for name in present]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    if not len(labels):
        raise UserError(f"the CIFAR-10 batches in {root} hold no images")
    names = _unpickle(root / "batches.meta").get("label_names")
    if not isinstance(names, list) or len(names) <= labels.max():
        raise UserError(f"{root / 'batches.meta'} does not name the {labels.max() + 1} classes "
                        "its batches use (label_names)")
    classes = [_text(name) for name in names]
    return _from_arrays(images, labels, classes, cfg, size, whole)


def _cifar_batches(path: Path) -> tuple[Path, list[str]]:
    """The CIFAR-10 folder at or in `path`, and the names of the batches it holds."""
    root = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    if not (root / "batches.meta").is_file():
        raise UserError(f"{root} is not a CIFAR-10 folder: expected batches.meta and data_batch_1.."
                        "data_batch_5 / test_batch (the python version, cifar-10-batches-py)")
    present = [name for name in _CIFAR_BATCHES if (root / name).is_file()]
    if not present:
        raise UserError(f"{root} holds none of the CIFAR-10 batches data_batch_1..data_batch_5 "
                        "and test_batch")
    return root, present


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch's images (N, 32, 32, 3) and labels, checked to belong together."""
    batch = _unpickle(path)
    try:
        data = np.asarray(batch["data"], np.uint8)
        labels = np.asarray(batch["labels"], np.int64)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} is not a CIFAR-10 batch: it needs 'data' (N x 3072 bytes) "
                        "and 'labels' (N integers)") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),) \
            or (len(labels) and labels.min() < 0):
        raise UserError(f"{path} is not a CIFAR-10 batch: {data.shape} data for "
                        f"{labels.shape} labels; expected N x 3072 and N labels >= 0")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW planes
    return np.ascontiguousarray(images), labels


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold (dicts, lists, numpy arrays): no code can run."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"),
                ("_codecs", "encode")}  # how Python 3 writes bytes in protocol 2 pickles

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = _ArrayUnpickler(f, encoding="bytes").load()  # the batches are Python 2 pickles
    except Exception as exc:  # pickle raises many types on damaged files
        raise UserError(f"{path} is not a readable CIFAR-10 batch: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a CIFAR-10 batch: it holds a {type(raw).__name__}, "
                        "not a dict")
    return {_text(k): v for k, v in raw.items()}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _from_arrays(images: np.ndarray, labels: np.ndarray, classes: list[str], cfg: DataConfig,
                 size: tuple[int, int] | None, whole: bool) -> ImageData:
    """Resize (when asked), split and wrap in-memory images as Ray Datasets."""
    if size and images.shape[1:3] != size:
        images = np.stack([resize_uint8(image, size) for image in images])
    train, val = _split_indices(labels, cfg.val_fraction, cfg.seed)
    if not whole:
        _check_split(len(train), len(val), cfg.source)
    height, width, channels = images.shape[1:]
    return ImageData(train=_to_dataset(images[train], labels[train]),
                     val=_to_dataset(images[val], labels[val]),
                     classes=classes, image_shape=(channels, height, width), skipped=0)


def _split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified seeded split; both parts are shuffled so no block holds a single class."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        is_val[members[: round(len(members) * val_fraction)]] = True
    return rng.permutation(np.flatnonzero(~is_val)), rng.permutation(np.flatnonzero(is_val))


def _check_split(n_train: int, n_val: int, source: str) -> None:
    if n_train == 0 or n_val == 0:
        raise UserError(f"{source}: the split left {n_train} training and {n_val} validation "
                        "images; use more images or change data.val_fraction")


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> ray.data.Dataset:
    # A tensor column keeps each row an (H, W, C) array and batches (B, H, W, C), zero-copy.
    table = pa.table({"image": ArrowTensorArray.from_numpy(images),
                      "label": pa.array(labels.astype(np.int64))})
    # At least 4 blocks, so that two workers can split them.
    blocks = min(int(np.clip(images.nbytes // _BLOCK_BYTES, 4, 64)), len(images))
    rows = -(-len(images) // blocks)
    # from_blocks computes block metadata here; from_arrow would start a task worker for it.
    return ray.data.from_blocks([table.slice(start, rows) for start in range(0, len(table), rows)])


# ---------------------------------------------------------------- generated shapes


def generate_shapes(n: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` RGB images (n, side, side, 3) of SHAPE_CLASSES, and their labels; same seed, same data.

    Each image has one shape of random size, position, small rotation and colour on a random
    background of contrasting colour, plus Gaussian noise. Drawn with vectorized numpy in chunks
    (4,000 images of 32x32 take a fraction of a second).
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPE_CLASSES)).astype(np.int64)
    images = np.empty((n, side, side, 3), dtype=np.uint8)
    chunk = max(1, (4 << 20) // (side * side))  # ~4M pixels per chunk bounds the float temporaries
    for start in range(0, n, chunk):
        images[start:start + chunk] = _draw(labels[start:start + chunk], side, rng)
    return images, labels


def _draw(labels: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    radius = rng.uniform(0.22, 0.42, n) * side  # half the shape's extent, in pixels
    cx, cy = rng.uniform(radius, side - radius), rng.uniform(radius, side - radius)
    angle = rng.uniform(-0.3, 0.3, n)  # radians; small, so square/diamond and plus/cross stay apart
    background = rng.uniform(0.0, 1.0, (n, 3))
    foreground = (background + rng.uniform(0.3, 0.7, (n, 3))) % 1.0  # >= 0.3 away on every channel
    cx, cy, radius, angle = (x.astype(np.float32)[:, None, None] for x in (cx, cy, radius, angle))
    grid = np.arange(side, dtype=np.float32) + 0.5
    dx, dy = (grid[None, None, :] - cx) / radius, (grid[None, :, None] - cy) / radius
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = dx * cos + dy * sin, dy * cos - dx * sin
    mask = np.zeros((n, side, side), dtype=bool)
    for label, shape_mask in enumerate(_SHAPE_MASKS):
        chosen = labels == label
        mask[chosen] = shape_mask(u[chosen], v[chosen])
    pixels = np.where(mask[..., None], foreground[:, None, None, :].astype(np.float32),
                      background[:, None, None, :].astype(np.float32))
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * 0.06
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _plus(u: np.ndarray, v: np.ndarray, arm: float) -> np.ndarray:
    a, b = np.abs(u), np.abs(v)
    return ((a <= arm) & (b <= 1.0)) | ((b <= arm) & (a <= 1.0))


# Masks over coordinates normalized by the shape's radius (the unit disc is the shape's extent).
_SHAPE_MASKS: list[Callable[[np.ndarray, np.ndarray], np.ndarray]] = [
    lambda u, v: u * u + v * v <= 1.0,  # circle
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,  # square
    lambda u, v: (v <= 0.55) & (0.866 * u - 0.5 * v <= 0.55) & (-0.866 * u - 0.5 * v <= 0.55),
    lambda u, v: np.abs(u) + np.abs(v) <= 1.0,  # diamond
    lambda u, v: _plus(u, v, 0.3),  # plus
    lambda u, v: _plus((u + v) * 0.7071, (u - v) * 0.7071, 0.25),  # cross (a plus turned 45°)
    lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.3),  # ring
    lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.85)
    & (np.maximum(np.abs(u), np.abs(v)) >= 0.5),  # frame
]


# ---------------------------------------------------------------- file sources


def _imagefolder(cfg: DataConfig, root: Path, size: tuple[int, int] | None,
                 whole: bool) -> ImageData:
    classes = _class_folders(root)
    files = sorted(str(p) for c in classes for p in (root / c).rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"imagefolder {root} has no image files ({' '.join(IMAGE_EXTENSIONS)}) "
                        "in its class folders")
    size = size or _first_size((Path(f).read_bytes() for f in files), str(root))
    decoded = ray.data.read_binary_files(files, include_paths=True).map_batches(
        _decode_folder_batch, batch_format="numpy", batch_size=_DECODE_BATCH,
        fn_kwargs={"root": str(root), "classes": classes, "size": size,
                   "seed": cfg.seed, "val_fraction": cfg.val_fraction})
    return _finish(decoded, classes, size, cfg.source, whole)


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise UserError(f"imagefolder {root} is not a folder (expected one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"imagefolder {root} has no class folders; put each class's images "
                        "in a sub-folder named after the class")
    return classes


def _decode_folder_batch(batch: dict[str, np.ndarray], *, root: str, classes: list[str],
                         size: tuple[int, int], seed: int, val_fraction: float) -> dict[str, np.ndarray]:
    relative = [Path(os.path.relpath(p, root)).as_posix() for p in batch["path"]]
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[r.split("/", 1)[0]] for r in relative]
    keys = [r.encode() for r in relative]
    return _decode_batch(batch["bytes"], labels, keys, size, seed, val_fraction)


def _parquet(cfg: DataConfig, path: Path, size: tuple[int, int] | None, whole: bool) -> ImageData:
    raw = _read_parquet(path)
    schema = raw.schema()
    for column, name in ((cfg.image_column, "image_column"), (cfg.label_column, "label_column")):
        if column not in schema.names:
            raise UserError(f"parquet {path} has no column '{column}' (data.{name}); "
                            f"its columns are: {', '.join(schema.names)}")
    raw = raw.select_columns([cfg.image_column, cfg.label_column])
    label_type = schema.types[schema.names.index(cfg.label_column)]
    classes, index = _parquet_classes(raw, cfg.label_column, label_type, path)
    probe = (_unwrap(row[cfg.image_column]) for row in raw.take(_PROBE_LIMIT))
    size = size or _first_size(probe, str(path))
    decoded = raw.map_batches(
        _decode_table_batch, batch_format="numpy", batch_size=_DECODE_BATCH,
        fn_kwargs={"image_column": cfg.image_column, "label_column": cfg.label_column,
                   "index": index, "size": size, "seed": cfg.seed,
                   "val_fraction": cfg.val_fraction})
    return _finish(decoded, classes, size, cfg.source, whole)


def _read_parquet(path: Path) -> ray.data.Dataset:
    # Ray 2.60's default Parquet reader (DataSourceV2) starts 32 footer-reading actors for every
    # pass over the data: seconds each time on a small machine, and a load makes three passes.
    # The classic reader uses plain tasks. The flag is read when the dataset is created.
    ctx = ray.data.DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        raw = ray.data.read_parquet(str(path))
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"parquet {path} cannot be read: {str(exc).splitlines()[0]}") from None
    finally:
        ctx.use_datasource_v2 = previous
    if raw.schema() is None:
        raise UserError(f"parquet {path} holds no Parquet files")
    return raw


def _parquet_classes(raw: ray.data.Dataset, column: str, kind: pa.DataType,
                     path: Path) -> tuple[list[str], dict[Any, int]]:
    """Class names and the label -> class index map: the sorted distinct labels, so that
    integer labels such as 1..10, or 0 and 5,000,000, make as many classes as they have values."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type  # pandas' categorical columns
    if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"parquet {path}: label column '{column}' holds {kind}; "
                        "labels must be integers or strings")
    values = raw.unique(column) or []  # None for a file with no rows
    if not values:
        raise UserError(f"parquet {path} has no rows")
    if any(v is None for v in values):
        raise UserError(f"parquet {path}: label column '{column}' has missing (null) labels")
    ordered = sorted(values)
    return [str(v) for v in ordered], {v: i for i, v in enumerate(ordered)}


def _decode_table_batch(batch: dict[str, np.ndarray], *, image_column: str, label_column: str,
                        index: dict[Any, int], size: tuple[int, int], seed: int,
                        val_fraction: float) -> dict[str, np.ndarray]:
    raws = [_unwrap(raw) for raw in batch[image_column]]
    labels = [index[v] for v in batch[label_column]]
    keys = [_content_key(raw) for raw in raws]
    return _decode_batch(raws, labels, keys, size, seed, val_fraction)


def _unwrap(raw: Any) -> Any:
    """The encoded bytes of an image column of structs {bytes, path}, as Hugging Face's
    datasets writes images; any other value as it is."""
    return raw.get("bytes") if isinstance(raw, dict) else raw


def _content_key(raw: Any) -> bytes:
    """Bytes that identify an image's content (nested lists arrive as object arrays of arrays)."""
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, np.ndarray) and raw.dtype == object:
        return b"|".join(_content_key(part) for part in raw)
    return np.ascontiguousarray(raw).tobytes()


def _first_size(raws: Iterable[Any], where: str) -> tuple[int, int]:
    """(H, W) of the first readable image, which every image is resized to when data.image_size
    is not set; within data.image_size's own bounds, so one odd file cannot set a useless size."""
    for raw in islice(raws, _PROBE_LIMIT):
        try:
            height, width = _to_rgb(raw, None).shape[:2]
        except ValueError:
            continue
        low, high = IMAGE_SIDES
        if not (low <= min(height, width) and max(height, width) <= high):
            raise UserError(f"the first image in {where} is {height}x{width} pixels, and every "
                            f"image would be resized to that; set data.image_size "
                            f"({low} to {high})")
        return height, width
    raise UserError(f"none of the first {_PROBE_LIMIT} images in {where} could be decoded "
                    "(truncated files, or not images?)")


def _decode_batch(raws: Iterable[Any], labels: Iterable[int], keys: list[bytes],
                  size: tuple[int, int], seed: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Decode to RGB at `size`, flagging rows that are unreadable, grayscale, or in validation."""
    images = np.zeros((len(keys), *size, 3), dtype=np.uint8)
    ok = np.zeros(len(keys), dtype=bool)
    for i, raw in enumerate(raws):
        try:
            images[i] = _to_rgb(raw, size)
            ok[i] = True
        except ValueError:
            pass  # counted and reported once by the driver (see the module docstring)
    gray = ((images[..., 0] == images[..., 1]) & (images[..., 1] == images[..., 2])).all(axis=(1, 2))
    return {"image": images, "label": np.asarray(labels, dtype=np.int64), "ok": ok,
            "gray": gray, "is_val": _in_validation(keys, seed, val_fraction)}


def _in_validation(keys: list[bytes], seed: int, val_fraction: float) -> np.ndarray:
    salt = f"{seed}\0".encode()
    buckets = [int.from_bytes(hashlib.blake2b(salt + key, digest_size=8).digest(), "little")
               % _HASH_BUCKETS for key in keys]
    return np.asarray(buckets, dtype=np.int64) < round(val_fraction * _HASH_BUCKETS)


def _to_rgb(raw: Any, size: tuple[int, int] | None) -> np.ndarray:
    """Encoded bytes or a pixel array -> uint8 (H, W, 3); ValueError when it is not an image."""
    if isinstance(raw, bytes):
        return decode_image(raw, channels=3, size=size, max_pixels=MAX_PIXELS)
    pixels = _hwc(_stack(raw))
    if pixels.shape[0] * pixels.shape[1] > MAX_PIXELS:
        raise ValueError(f"pixel array of shape {pixels.shape} is larger than {MAX_PIXELS} pixels")
    rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3]
    return resize_uint8(np.ascontiguousarray(rgb), size) if size else rgb


def _stack(raw: Any) -> np.ndarray:
    if isinstance(raw, np.ndarray) and raw.dtype == object:
        try:
            return np.stack([_stack(part) for part in raw])
        except ValueError:
            raise ValueError("ragged pixel array") from None
    return np.asarray(raw)


def _hwc(pixels: np.ndarray) -> np.ndarray:
    """A pixel array (flat, HW, HWC or CHW; ints 0..255 or floats 0..1) -> uint8 (H, W, C)."""
    if pixels.ndim == 1:
        pixels = _unflatten(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim == 3 and pixels.shape[0] in (1, 3) and pixels.shape[2] not in (1, 3, 4):
        pixels = pixels.transpose(1, 2, 0)
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4) or min(pixels.shape) == 0:
        raise ValueError(f"pixel array of shape {pixels.shape} is not an image")
    if pixels.dtype.kind == "f":
        return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if pixels.dtype.kind in "iu":
        return np.clip(pixels, 0, 255).astype(np.uint8)
    raise ValueError(f"pixel array of dtype {pixels.dtype} is not an image")


def _unflatten(flat: np.ndarray) -> np.ndarray:
    """Flat pixels with a square side: side*side (gray) or side*side*3 (RGB, HWC order)."""
    for channels in (1, 3):
        side = math.isqrt(len(flat) // channels)
        if side * side * channels == len(flat):
            return flat.reshape(side, side, channels)
    raise ValueError(f"{len(flat)} flat pixels are not a square image")


def _finish(decoded: ray.data.Dataset, classes: list[str], size: tuple[int, int],
            source: str, whole: bool) -> ImageData:
    """Decode once, count what was skipped, and split into lazy train/val views."""
    decoded = decoded.materialize()
    totals = _tally(decoded)
    skipped = totals["rows"] - totals["ok"]
    if totals["ok"] == 0:
        raise UserError(f"{source}: none of the {totals['rows']} images could be decoded")
    if skipped:
        log.warning("%s: skipped %d of %d images that could not be decoded (corrupt, not an "
                    "image, or over %d pixels)", source, skipped, totals["rows"], MAX_PIXELS)
    if not whole:
        _check_split(totals["ok"] - totals["val"], totals["val"], source)
    channels = 1 if totals["gray"] == totals["ok"] else 3
    return ImageData(train=_view(decoded, False, channels), val=_view(decoded, True, channels),
                     classes=classes, image_shape=(channels, *size), skipped=skipped)


def _view(decoded: ray.data.Dataset, want_val: bool, channels: int) -> ray.data.Dataset:
    return decoded.map_batches(_select, batch_format="numpy", batch_size=None,
                               fn_kwargs={"want_val": want_val, "channels": channels})


def _tally(decoded: ray.data.Dataset) -> dict[str, int]:
    parts = decoded.map_batches(_tally_batch, batch_format="numpy", batch_size=None).take_all()
    return {key: int(sum(part[key] for part in parts)) for key in ("rows", "ok", "gray", "val")}


def _tally_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = batch["ok"]
    return {"rows": np.array([len(ok)]), "ok": np.array([ok.sum()]),
            "gray": np.array([(ok & batch["gray"]).sum()]),
            "val": np.array([(ok & batch["is_val"]).sum()])}


def _select(batch: dict[str, np.ndarray], *, want_val: bool, channels: int) -> dict[str, np.ndarray]:
    keep = batch["ok"] & (batch["is_val"] == want_val)
    return {"image": np.ascontiguousarray(batch["image"][keep][..., :channels]),
            "label": batch["label"][keep]}


_FILE_LOADERS: dict[str, Callable[[DataConfig, Path], ImageData]] = {
    "imagefolder": _imagefolder, "parquet": _parquet, "cifar10": _cifar10,
}
_LAYOUT_CHECKS: dict[str, Callable[[Path], Any]] = {
    "imagefolder": _class_folders, "cifar10": _cifar_batches,
}


# ---------------------------------------------------------------- statistics


def normalization_stats(ds: ray.data.Dataset) -> dict[str, list[float]]:
    """Per-channel mean and std of pixel values scaled to [0, 1], in one pass over `ds`."""
    if isinstance(ds, MaterializedDataset) and ds.size_bytes() <= _LOCAL_STATS_BYTES:
        # Small data already in the object store: reading it here beats starting a task worker.
        batches = ds.iter_batches(batch_size=None, batch_format="numpy")
        parts = [{k: v[0] for k, v in _moments(batch).items()} for batch in batches]
    else:
        parts = ds.map_batches(_moments, batch_format="numpy", batch_size=None).take_all()
    count = sum(int(p["count"]) for p in parts)
    if count == 0:
        raise ValueError("normalization_stats: the dataset has no images")
    # Integer sums are exact, so E[x^2] - E[x]^2 does not lose precision on large datasets.
    total = np.sum([p["sum"] for p in parts], axis=0).astype(np.float64) / 255.0
    squares = np.sum([p["sumsq"] for p in parts], axis=0).astype(np.float64) / 255.0**2
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    # A constant channel would make normalize() divide by zero.
    return {"mean": mean.tolist(), "std": np.maximum(std, 1e-3).tolist()}


def _moments(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    images = batch["image"]
    pixels = images.reshape(-1, images.shape[-1]).astype(np.int64)
    return {"count": np.array([len(pixels)]), "sum": pixels.sum(axis=0)[None],
            "sumsq": (pixels * pixels).sum(axis=0)[None]}

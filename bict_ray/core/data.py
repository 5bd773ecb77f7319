"""Image datasets: Fashion-MNIST (the embedded default), an ImageFolder tree, an ``.npz`` of arrays, or a Parquet
table of encoded images (as Hugging Face ``datasets`` and Ray Data write one; ``core.image_table`` reads it).

Every loader returns the same thing, a :class:`Dataset` of a train and a test :class:`ImageSet` with uint8
images (N, C, H, W), global int64 labels and int64 sample ids that are unique across both splits, so a gallery row
can always be traced back to its image: assigned 0 … N−1, train first, or the data's own (a Parquet table's id
column), ascending within each split. Data with query and gallery sets of its own (npz keys
``x_query``/``y_query``/``x_gallery``/``y_gallery``, ImageFolder ``query/`` and ``gallery/`` beside ``train/``,
Parquet ``query`` and ``gallery`` beside ``train``) has them as its test split, queries first.

:func:`load_dataset` then applies the run's retrieval protocol (``PROTOCOLS``, docs/PROTOCOL.md): the open-set
``scenario.test_classes`` leave train and validation and are all the test split keeps, and ``Dataset.query`` and
``Dataset.gallery`` are the test split as the protocol searches it.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bict_ray.errors import DataError

if TYPE_CHECKING:  # the config sits above core: it checks its choices against the lists defined here
    from bict_ray.config import DataConfig, EvalConfig, ScenarioConfig

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_ENV = "BICT_FASHION_MNIST_ROOT"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_USER_IMAGE_SIZE = 32
# the subtrees of an ImageFolder root with its own test sets; the Parquet files or folders of such a Parquet root
IMAGE_FOLDER_SETS = ("train", "query", "gallery")
# data.kind=parquet's default columns: those Hugging Face datasets writes for an image dataset (an Image feature
# `image`, a ClassLabel `label`); `id` is optional (DataConfig.id_column)
PARQUET_IMAGE_COLUMN, PARQUET_LABEL_COLUMN, PARQUET_ID_COLUMN = "image", "label", "id"
PARQUET_SUFFIX = ".parquet"
NPZ_QUERY_GALLERY = ("x_query", "y_query", "x_gallery", "y_gallery")
# eval.protocol: leave_one_out (the test split is query and gallery, self-matches excluded by id) | query_gallery
# (two disjoint parts of it: the data's own query and gallery sets, else a seeded per-class split)
PROTOCOLS = ("leave_one_out", "query_gallery")


@dataclass
class ImageSet:
    """One split: images (N, C, H, W) uint8, labels (N,) int64 global class ids, ids (N,) int64 unique."""

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.ids[index])


@dataclass
class Dataset:
    """train: what models train on; val: held out of the training images, selects (None without one); test:
    reported.

    query, gallery: the test split as ``protocol`` searches it: under leave_one_out both are ``test`` itself (one
    object), under query_gallery two disjoint parts of it whose union is ``test``; ids stay unique, so a query is
    excluded by id from a gallery that holds its image and from no other. :func:`load_dataset` sets them; a loader
    sets them only for data with sets of its own. test_classes: the open-set classes, absent from train and val
    and the only ones in test (None: closed set).
    """

    train: ImageSet
    test: ImageSet
    classes: list[str]
    source: str  # where it was found, for `bict-ray env` and the run's record
    val: ImageSet | None = None
    query: ImageSet | None = None
    gallery: ImageSet | None = None
    protocol: str = "leave_one_out"
    test_classes: list[int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check_protocol(self, protocol: str, test_classes: list[int] | None) -> None:
        """Refuse to be searched under another protocol or open set than the one its sets were cut for."""
        wanted = (protocol, None if test_classes is None else sorted(test_classes))
        if (self.protocol, self.test_classes) != wanted:
            raise DataError(f"the dataset was loaded for eval.protocol={self.protocol}, scenario.test_classes="
                            f"{self.test_classes}, and this run has {wanted[0]}, {wanted[1]}: load it with "
                            "load_dataset(config.data, config.eval, config.scenario)")

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[2]


def load_dataset(cfg: DataConfig, evaluation: EvalConfig | None = None,
                 scenario: ScenarioConfig | None = None) -> Dataset:
    """Load the dataset that ``cfg.kind`` names (one of ``DATA_KINDS``), with ids assigned, the open-set
    ``scenario.test_classes`` applied, the smoke limits, the validation set, and the query and gallery sets of
    ``evaluation.protocol`` (without ``evaluation``: leave_one_out; without ``scenario``: a closed set)."""
    protocol = evaluation.protocol if evaluation is not None else "leave_one_out"
    test_classes = scenario.test_classes if scenario is not None else None
    dataset = DATA_KINDS[cfg.kind](cfg)
    # the data's own query set, by id: the steps below convert, filter and limit the test split, and the
    # protocol's sets are cut from what is left of it
    own_queries = None if dataset.query is None else dataset.query.ids
    dataset = _conform(dataset, cfg)
    if test_classes is not None:
        dataset = _open_set(dataset, test_classes)
    dataset = _validation(_limit(dataset, cfg), cfg)
    if protocol == "leave_one_out":
        dataset.query = dataset.gallery = dataset.test
    else:
        dataset.query, dataset.gallery = _query_gallery(dataset.test, own_queries, evaluation.query_fraction,
                                                        cfg.seed, test_classes)
    dataset.protocol = protocol
    return dataset


def find_fashion_mnist(root: str | None = None) -> Path | None:
    """Where the Fashion-MNIST idx files are: ``root``, $BICT_FASHION_MNIST_ROOT, then the Debian package's folder."""
    candidates = [root, os.environ.get(FASHION_MNIST_ENV), *FASHION_MNIST_DIRS]
    for candidate in candidates:
        if not candidate:
            continue
        for folder in (Path(candidate), Path(candidate) / "FashionMNIST" / "raw", Path(candidate) / "raw"):
            if _idx_path(folder, "train-images-idx3-ubyte") is not None:
                return folder
    return None


def load_fashion_mnist(root: str | None = None, download_root: str | None = None) -> Dataset:
    """Fashion-MNIST from local idx files, else torchvision's download (needs a network)."""
    folder = find_fashion_mnist(root)
    if folder is None:
        folder = _download_fashion_mnist(download_root or root or os.path.expanduser("~/.cache/bict-ray"))
    train_x = _read_idx(_idx_path(folder, "train-images-idx3-ubyte"))
    train_y = _read_idx(_idx_path(folder, "train-labels-idx1-ubyte"))
    test_x = _read_idx(_idx_path(folder, "t10k-images-idx3-ubyte"))
    test_y = _read_idx(_idx_path(folder, "t10k-labels-idx1-ubyte"))
    return _assemble(train_x[:, None], train_y, test_x[:, None], test_y, list(FASHION_MNIST_CLASSES), str(folder))


def load_npz(path: str, cfg: DataConfig) -> Dataset:
    """An ``.npz`` with ``images`` (N, H, W) or (N, H, W, C) or (N, C, H, W) uint8 and ``labels`` (N,) ints.

    Optional ``test_images``/``test_labels`` give the test split, or ``x_query``/``y_query`` and
    ``x_gallery``/``y_gallery`` (all four, shaped as ``images``/``labels``) separate query and gallery sets, which
    together are the test split; otherwise ``cfg.test_fraction`` of each class is held out (seeded). Optional
    ``classes`` names the classes.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"npz file not found: {file}")
    try:
        with np.load(file, allow_pickle=False) as arrays:
            content = {key: arrays[key] for key in arrays.files}
    except Exception as err:  # numpy raises several types for a damaged archive
        raise DataError(f"cannot read npz file {file}: {err}") from None
    for key in ("images", "labels"):
        if key not in content:
            raise DataError(f"npz file {file} has no '{key}' array (it has: {', '.join(content) or 'nothing'})")
    images = _to_nchw(content["images"], f"{file}:images")
    labels = _check_labels(content["labels"], len(images), f"{file}:labels")
    num_queries = None
    own_sets = [key for key in NPZ_QUERY_GALLERY if key in content]
    if own_sets:
        missing = [key for key in NPZ_QUERY_GALLERY if key not in content]
        if missing:
            raise DataError(f"npz file {file} has {', '.join(own_sets)} but no {', '.join(missing)}: separate query "
                            f"and gallery sets need all of {', '.join(NPZ_QUERY_GALLERY)}")
        if "test_images" in content:
            raise DataError(f"npz file {file} has both test_images and x_query/x_gallery: its test split is either "
                            "test_images/test_labels or the query and gallery sets")
        sets = []
        for x, y in (("x_query", "y_query"), ("x_gallery", "y_gallery")):
            set_images = _to_nchw(content[x], f"{file}:{x}")
            if set_images.shape[1:] != images.shape[1:]:
                raise DataError(f"{file}:{x} holds images of shape {set_images.shape[1:]}, images of "
                                f"{images.shape[1:]}: every set needs the same (C, H, W)")
            sets.append((set_images, _check_labels(content[y], len(set_images), f"{file}:{y}")))
        (query_x, query_y), (gallery_x, gallery_y) = sets
        test_images, test_labels = np.concatenate([query_x, gallery_x]), np.concatenate([query_y, gallery_y])
        num_queries = len(query_y)
    elif "test_images" in content:
        test_images = _to_nchw(content["test_images"], f"{file}:test_images")
        test_labels = _check_labels(content.get("test_labels"), len(test_images), f"{file}:test_labels")
    else:
        train_idx, test_idx = _holdout(labels, cfg.test_fraction, cfg.seed)
        images, test_images = images[train_idx], images[test_idx]
        labels, test_labels = labels[train_idx], labels[test_idx]
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    classes = [str(c) for c in content["classes"]] if "classes" in content else [str(c) for c in range(num_classes)]
    if len(classes) < 2:
        raise DataError(f"npz file {file} has {len(classes)} class(es); retrieval needs at least 2")
    return _assemble(images, labels, test_images, test_labels, classes, str(file), num_queries)


def load_image_folder(path: str, cfg: DataConfig) -> Dataset:
    """An ImageFolder tree: one sub-folder per class, numbered in sorted folder order; any size, grey or RGB.

    A root holding ``query/`` or ``gallery/`` is read as three subtrees, ``train/``, ``query/`` and ``gallery/``,
    each with one sub-folder per class (classes numbered in sorted order of the names found in any of them): the
    query and gallery sets, together the test split. Otherwise ``cfg.test_fraction`` of each class is held out.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    subtrees = [name for name in IMAGE_FOLDER_SETS if (root / name).is_dir()]
    if "query" not in subtrees and "gallery" not in subtrees:
        class_dirs = _class_dirs(root)
        classes = sorted(class_dirs)
        files, labels = _class_files(class_dirs, classes)
        images = _read_images(files, cfg)
        train_idx, test_idx = _holdout(labels, cfg.test_fraction, cfg.seed)
        return _assemble(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], classes,
                         str(root))
    missing = [f"{name}/" for name in IMAGE_FOLDER_SETS if name not in subtrees]
    if missing:
        raise DataError(f"image folder {root} has {', '.join(f'{n}/' for n in subtrees)} but no "
                        f"{', '.join(missing)}: separate query and gallery sets need train/, query/ and gallery/ "
                        "side by side, each with one sub-folder per class")
    trees = {name: _class_dirs(root / name, least=1) for name in IMAGE_FOLDER_SETS}
    classes = sorted(set().union(*trees.values()))
    if len(classes) < 2:
        raise DataError(f"image folder {root} has {len(classes)} class folder name(s) across train/, query/ and "
                        "gallery/; it needs at least 2")
    parts = {name: _class_files(trees[name], classes) for name in IMAGE_FOLDER_SETS}
    images = _read_images([f for files, _ in parts.values() for f in files], cfg)
    ends = np.cumsum([len(files) for files, _ in parts.values()])
    (train_y, query_y, gallery_y) = (labels for _, labels in parts.values())
    return _assemble(images[: ends[0]], train_y, images[ends[0]:], np.concatenate([query_y, gallery_y]), classes,
                     str(root), num_queries=len(query_y))


def load_parquet(path: str, cfg: DataConfig) -> Dataset:
    """A Parquet table of images, as Hugging Face ``datasets`` and Ray Data write one: one row per image, its
    encoded bytes (PNG, JPEG or any format PIL reads) in ``cfg.image_column`` (binary, or a struct with a ``bytes``
    field as ``datasets`` writes an Image), its class id in ``cfg.label_column`` (integers >= 0) and its id in
    ``cfg.id_column``. The images are decoded in memory and converted and resized as ImageFolder images are.

    ``path`` is one Parquet file or a folder of them: every ``*.parquet`` below it, in sorted path order, is one
    table, of which ``cfg.test_fraction`` of each class is held out. A folder holding ``query`` or ``gallery`` (a
    ``NAME.parquet`` file or a ``NAME/`` folder of Parquet files) is read as three sets, ``train``, ``query`` and
    ``gallery``: the query and gallery sets, together the test split, queries first.

    Ids are the id column's (every file has it, or none does); without one (or with ``id_column`` None), each row's
    position in the table: the files in order, for three sets train, query, gallery in turn. Each set's rows are
    ordered by id, so the same rows split the same way however they were spread over files. Classes are numbered by
    the labels; named by the label column's ClassLabel names where the files' Hugging Face metadata has them.
    """
    from bict_ray.core.image_table import read_image_table  # pyarrow, for this kind only

    root = Path(path)
    if not root.exists():
        raise DataError(f"Parquet data not found: {root}")
    sets = _parquet_sets(root)
    table = read_image_table([file for _, files in sets for file in files], cfg.image_column, cfg.label_column,
                             cfg.id_column, id_optional=cfg.id_column == PARQUET_ID_COLUMN)
    # the sets' rows: [rows[k], rows[k + 1]) of the table
    file_ends = np.cumsum([0] + [len(files) for _, files in sets])
    rows = np.cumsum([0] + [sum(table.rows_per_file[a:b]) for a, b in zip(file_ends[:-1], file_ends[1:])])
    for (origin, files), first, last in zip(sets, rows[:-1], rows[1:]):
        if first == last:
            held = "" if origin.is_file() else f" in its {len(files)} Parquet file(s)"
            raise DataError(f"{origin}: no rows{held}; a dataset needs images")
    num_classes = int(table.labels.max()) + 1
    classes = table.class_names or [str(c) for c in range(num_classes)]
    if len(classes) < 2:
        raise DataError(f"Parquet data {root} has {len(classes)} class(es) (labels 0 … {num_classes - 1}); retrieval "
                        "needs at least 2")
    images = decode_images(table.images, cfg, table.images.where)
    # each set in id order (a stable sort: rows without ids are in order already)
    parts = [np.arange(first, last)[np.argsort(table.ids[first:last], kind="stable")]
             for first, last in zip(rows[:-1], rows[1:])]
    if len(parts) == 1:
        (order,) = parts
        train_idx, test_idx = (order[i] for i in _holdout(table.labels[order], cfg.test_fraction, cfg.seed))
        test_queries = None
    else:
        train_idx, query_idx, gallery_idx = parts
        test_idx, test_queries = np.concatenate([query_idx, gallery_idx]), len(query_idx)
    return _assemble(images[train_idx], table.labels[train_idx], images[test_idx], table.labels[test_idx], classes,
                     str(root), test_queries, ids=(table.ids[train_idx], table.ids[test_idx]))


def load_image_set(path: str, cfg: DataConfig) -> ImageSet:
    """One Parquet table of images (a file, or a folder of them as ``load_parquet`` reads one) as a single
    ``ImageSet``, decoded as ``data.kind: parquet`` decodes: images to embed outside a dataset's splits, such as new
    rows for a gallery (``bict-ray append --images``). The id column (``cfg.id_column``) is required, since the rows
    join rows that have ids of their own; so is the label column (``cfg.label_column``)."""
    from bict_ray.core.image_table import read_image_table  # pyarrow, for this kind only

    root = Path(path)
    if not root.exists():
        raise DataError(f"Parquet images not found: {root}")
    table = read_image_table([root] if root.is_file() else _parquet_files(root), cfg.image_column, cfg.label_column,
                             cfg.id_column)
    if not len(table.labels):
        raise DataError(f"{root}: no rows")
    return ImageSet(decode_images(table.images, cfg, table.images.where), table.labels, table.ids)


# data.kind -> loader; a new format is a loader taking the DataConfig, and one line here
DATA_KINDS = {
    "fashion_mnist": lambda cfg: load_fashion_mnist(cfg.root),
    "npz": lambda cfg: load_npz(cfg.root, cfg),
    "imagefolder": lambda cfg: load_image_folder(cfg.root, cfg),
    "parquet": lambda cfg: load_parquet(cfg.root, cfg),
}


def parquet_table_files(path: str) -> list[Path]:
    """Every Parquet file of the data at ``path`` as ``load_parquet`` reads it (one table, or its train, query and
    gallery sets), in that order: what a stream of the images reads (``distributed.ingest``)."""
    return [file for _, files in _parquet_sets(Path(path)) for file in files]


def missing_dataset_message(root: str | None = None) -> str:
    tried = [p for p in (root, os.environ.get(FASHION_MNIST_ENV), *FASHION_MNIST_DIRS) if p]
    return ("Fashion-MNIST not found (looked in: " + ", ".join(tried) + ") and the download failed. Get it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four idx files "
            "(train-images-idx3-ubyte[.gz], ...) in a folder and pass --set data.root=FOLDER "
            f"or set ${FASHION_MNIST_ENV}.")


def _parquet_sets(root: Path) -> list[tuple[Path, list[Path]]]:
    """(where it is, its Parquet files) of each set of ``root``: one table (a file, or every ``*.parquet`` below a
    folder), or ``train``, ``query`` and ``gallery``, each a ``NAME.parquet`` file or a ``NAME/`` folder of them."""
    if root.is_file():
        return [(root, [root])]
    found = {}
    for name in IMAGE_FOLDER_SETS:
        file, folder = root / f"{name}{PARQUET_SUFFIX}", root / name
        if file.is_file() and folder.is_dir():
            raise DataError(f"Parquet data {root} has both {file.name} and {name}/: the {name} set is one of them")
        if file.is_file() or folder.is_dir():
            found[name] = file if file.is_file() else folder
    if "query" not in found and "gallery" not in found:
        return [(root, _parquet_files(root))]
    missing = [name for name in IMAGE_FOLDER_SETS if name not in found]
    if missing:
        raise DataError(f"Parquet data {root} has {', '.join(found)} but no {', '.join(missing)}: separate query and "
                        f"gallery sets need train, query and gallery side by side, each a NAME{PARQUET_SUFFIX} file "
                        "or a NAME/ folder of Parquet files")
    # a file beside the three sets would belong to none of them: refused rather than left out unseen
    others = sorted(p.name for p in root.glob(f"*{PARQUET_SUFFIX}") if p.stem not in IMAGE_FOLDER_SETS
                    and not p.name.startswith("."))
    if others:
        raise DataError(f"Parquet data {root} has train, query and gallery sets and also {', '.join(others)}, which "
                        "is in none of them: move it into one of the sets or out of the folder")
    return [(found[name], [found[name]] if found[name].is_file() else _parquet_files(found[name]))
            for name in IMAGE_FOLDER_SETS]


def _parquet_files(folder: Path) -> list[Path]:
    """Every ``*.parquet`` below ``folder`` (sub-folders too, as Ray Data and Hugging Face lay them out), in sorted
    path order; hidden files and folders are not data."""
    files = sorted((p for p in folder.rglob(f"*{PARQUET_SUFFIX}")
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise DataError(f"Parquet data folder {folder} holds no {PARQUET_SUFFIX} files")
    return files


def _download_fashion_mnist(root: str) -> Path:
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root, train=True, download=True)
        FashionMNIST(root, train=False, download=True)
    except Exception as err:  # any network or disk failure leads to the same advice
        raise DataError(f"{missing_dataset_message(root)} ({type(err).__name__}: {err})") from None
    folder = find_fashion_mnist(root)
    if folder is None:
        raise DataError(missing_dataset_message(root))
    return folder


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path | None) -> np.ndarray:
    if path is None:
        raise DataError("Fashion-MNIST folder is incomplete: " + missing_dataset_message())
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(f"{path} is truncated: expected {expected} values, found {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()


def _assemble(train_x, train_y, test_x, test_y, classes, source, num_queries: int | None = None,
              ids: tuple[np.ndarray, np.ndarray] | None = None) -> Dataset:
    """num_queries: the data's own query set is the first ``num_queries`` test images, its gallery the rest.
    ids: the data's own ids of the train and test images (unique across both); None: 0 … N−1, train first."""
    train_y = np.asarray(train_y, dtype=np.int64)
    test_y = np.asarray(test_y, dtype=np.int64)
    if ids is None:
        ids = (np.arange(len(train_y)), np.arange(len(train_y), len(train_y) + len(test_y)))
    train_ids, test_ids = (np.asarray(part, dtype=np.int64) for part in ids)
    dataset = Dataset(ImageSet(np.ascontiguousarray(train_x), train_y, train_ids),
                      ImageSet(np.ascontiguousarray(test_x), test_y, test_ids), list(classes), source)
    if num_queries is not None:
        dataset.query = dataset.test.subset(np.arange(num_queries))
        dataset.gallery = dataset.test.subset(np.arange(num_queries, len(test_y)))
    return dataset


def _class_dirs(folder: Path, least: int = 2) -> dict[str, Path]:
    """The class sub-folders of ``folder`` by name; at least ``least`` of them."""
    found = {p.name: p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if len(found) < least:
        raise DataError(f"image folder {folder} has {len(found)} class folder(s); it needs at least {least} "
                        "(one sub-folder per class)")
    return found


def _class_files(class_dirs: dict[str, Path], classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """The image files under each class folder (sorted) and their labels, the class's index in ``classes``."""
    files, labels = [], []
    for name in sorted(class_dirs):
        found = sorted(p for p in class_dirs[name].rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder {class_dirs[name]} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [classes.index(name)] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def _read_images(files: list[Path], cfg: DataConfig) -> np.ndarray:
    """The image files, as :func:`decode_images` makes them."""
    return decode_images(files, cfg, lambda i: str(files[i]))


# what PIL raises for data it cannot decode: an unknown format or a truncated file (OSError), a corrupt chunk of a
# known one (SyntaxError, e.g. a PNG's checksum), a header it cannot use (ValueError)
_UNDECODABLE = (OSError, SyntaxError, ValueError)


def decode_images(sources: Sequence[Path | bytes], cfg: DataConfig, where: Callable[[int], str]) -> np.ndarray:
    """(N, C, H, W) uint8 of the images ``sources`` hold, each a file or the encoded bytes of one (decoded in
    memory), resized to data.image_size; grey when data.channels says so or every sampled image is. where(i): how a
    message names image i (its file; a table's file, row and column)."""
    from PIL import Image, UnidentifiedImageError

    size = cfg.image_size or DEFAULT_USER_IMAGE_SIZE
    mode = None if cfg.channels is None else ("L" if cfg.channels == 1 else "RGB")
    if mode is None:
        mode = "L" if all(_is_grey(sources[i]) for i in range(0, len(sources), max(1, len(sources) // 16))) else "RGB"
    images = np.empty((len(sources), 1 if mode == "L" else 3, size, size), dtype=np.uint8)
    for i in range(len(sources)):
        try:
            with _open_image(sources[i]) as img:
                pixels = np.asarray(img.convert(mode).resize((size, size), Image.BILINEAR))
        except _UNDECODABLE as err:
            # PIL's own words for an unknown format name the file object, which for bytes says nothing
            reason = "not an image in a format PIL reads" if isinstance(err, UnidentifiedImageError) else err
            raise DataError(f"cannot read image {where(i)}: {reason}") from None
        images[i] = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
    return images


def _open_image(source: Path | bytes):
    from PIL import Image

    return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def _conform(dataset: Dataset, cfg: DataConfig) -> Dataset:
    """Apply data.channels and data.image_size to loaders that keep the files' own shape."""
    want_c = cfg.channels or dataset.channels
    want_s = cfg.image_size or dataset.image_size
    if (want_c, want_s) == (dataset.channels, dataset.image_size):
        return dataset
    import torch
    import torch.nn.functional as F

    def convert(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).float()
        if x.shape[1] != want_c:
            x = x.mean(dim=1, keepdim=True) if want_c == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[2] != want_s or x.shape[3] != want_s:
            x = F.interpolate(x, size=(want_s, want_s), mode="bilinear", align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8).numpy()

    dataset.train.images = convert(dataset.train.images)
    dataset.test.images = convert(dataset.test.images)
    return dataset


def _limit(dataset: Dataset, cfg: DataConfig) -> Dataset:
    """Keep a seeded, class-stratified subset for smoke runs (ids stay those of the full dataset)."""
    rng = np.random.default_rng(cfg.seed)
    for split, limit in (("train", cfg.limit_train), ("test", cfg.limit_test)):
        part: ImageSet = getattr(dataset, split)
        if limit is None or limit >= len(part):
            continue
        order = rng.permutation(len(part))
        # interleave classes so that any prefix is close to class-balanced
        ranks = np.empty(len(part), dtype=np.int64)
        for c in np.unique(part.labels):
            members = order[part.labels[order] == c]
            ranks[members] = np.arange(len(members))
        keep = np.sort(order[np.lexsort((part.labels[order], ranks[order]))][:limit])
        setattr(dataset, split, part.subset(keep))
    return dataset


def _validation(dataset: Dataset, cfg: DataConfig) -> Dataset:
    """Hold ``cfg.val_fraction`` of each class's training images out as the validation set (seeded; the ids stay
    those of the dataset, so the validation set is disjoint from train and test by construction)."""
    if cfg.val_fraction == 0:
        return dataset
    # a seed of its own: the validation set does not move when data.seed's other draws (limits, user test splits) do
    train_idx, val_idx = _holdout(dataset.train.labels, cfg.val_fraction, cfg.seed + VALIDATION_SEED_OFFSET)
    dataset.val = dataset.train.subset(val_idx)
    dataset.train = dataset.train.subset(train_idx)
    return dataset


# added to data.seed for the validation holdout
VALIDATION_SEED_OFFSET = 7919
# added to data.seed for the query/gallery split of the test split
QUERY_SEED_OFFSET = 104729


def _open_set(dataset: Dataset, test_classes: list[int]) -> Dataset:
    """Open set: ``test_classes`` leave the training images (so every model's split, psi's training pairs and the
    validation set drawn from them) and are all the test split keeps."""
    where = f"scenario.test_classes {test_classes}"
    unknown = sorted(c for c in test_classes if c >= dataset.num_classes)
    if unknown:
        raise DataError(f"{where} names class(es) {unknown} that do not exist "
                        f"(the dataset has classes 0..{dataset.num_classes - 1})")
    held_out = np.isin(dataset.train.labels, test_classes)
    if held_out.all():
        raise DataError(f"{where} hold every training image: no model would have anything to train on")
    kept = np.isin(dataset.test.labels, test_classes)
    if not kept.any():
        raise DataError(f"{where}: the test split holds no image of these classes")
    dataset.train = dataset.train.subset(np.flatnonzero(~held_out))
    dataset.test = dataset.test.subset(np.flatnonzero(kept))
    dataset.test_classes = sorted(test_classes)
    return dataset


def _query_gallery(test: ImageSet, own_queries: np.ndarray | None, fraction: float, seed: int,
                   test_classes: list[int] | None) -> tuple[ImageSet, ImageSet]:
    """eval.protocol=query_gallery: the test split cut into a query and a gallery set, disjoint by id: the data's
    own sets (``own_queries``: the query set's ids), else ``fraction`` of each class as queries (seeded)."""
    if own_queries is None:
        gallery_idx, query_idx = _holdout(test.labels, fraction, seed + QUERY_SEED_OFFSET,
                                          " in the test split; eval.protocol=query_gallery splits each class into "
                                          "queries and gallery, so it needs at least 2")
    else:
        is_query = np.isin(test.ids, own_queries)
        query_idx, gallery_idx = np.flatnonzero(is_query), np.flatnonzero(~is_query)
    for name, index in (("query", query_idx), ("gallery", gallery_idx)):
        if not len(index):
            kept = "" if test_classes is None else f" of scenario.test_classes {test_classes}"
            raise DataError(f"eval.protocol=query_gallery: the {name} set holds no image{kept}")
    return test.subset(query_idx), test.subset(gallery_idx)


def _holdout(labels: np.ndarray, fraction: float, seed: int,
             needs: str = "; each class needs at least 2 (one to train on, one to search for)",
             ) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class: ``fraction`` of each class (at least one image) is held out (the test, the
    validation or the query set); returns (kept, held out). needs: why a class of one image is refused."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < 2:
            raise DataError(f"class {c} has {len(members)} image(s){needs}")
        n_test = min(len(members) - 1, max(1, round(fraction * len(members))))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and images.size and images.max() <= 1.0:
            images = images * 255.0
        images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        if images.shape[1] in (1, 3):
            return images
        if images.shape[3] in (1, 3):
            return images.transpose(0, 3, 1, 2)
    raise DataError(f"{where} must have shape (N, H, W), (N, H, W, C) or (N, C, H, W) with C in (1, 3); "
                    f"got {images.shape}")


def _check_labels(labels, n: int, where: str) -> np.ndarray:
    if labels is None:
        raise DataError(f"{where} is missing")
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where} must be {n} integers, got shape {labels.shape} of {labels.dtype}")
    if labels.min() < 0:
        raise DataError(f"{where} has negative class ids")
    return labels.astype(np.int64)


def _is_grey(source: Path | bytes) -> bool:
    try:
        with _open_image(source) as img:
            return img.mode in ("L", "1", "I;16", "I")
    except _UNDECODABLE:
        return False  # an unreadable image is reported by the loader with its name

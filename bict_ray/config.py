"""Typed configuration: dataclasses loaded from YAML, validated on construction.

A config file is a YAML mapping of sections (``data``, ``scenario``, ``model``, ...). Unknown keys are an
error that names them and lists the valid ones; ``--set section.key=value`` overrides are parsed as YAML
scalars and checked against the field's type, so ``--set train.epochs=abc`` fails instead of running.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bict_ray import presets
from bict_ray.core.closed_form import FIT_METHODS
from bict_ray.core.data import (DATA_KINDS, PARQUET_ID_COLUMN, PARQUET_IMAGE_COLUMN, PARQUET_LABEL_COLUMN,
                                PROTOCOLS)
from bict_ray.core.embed import PRECISIONS
from bict_ray.core.external import INPUT_KINDS, OLD_MODEL_KINDS
from bict_ray.core.foreign import FACTORY_RE
from bict_ray.core.losses import COMPAT_LOSSES
from bict_ray.core.models import CLASSIFIERS, backbone_problem
from bict_ray.core.splits import SCENARIOS
from bict_ray.errors import ConfigError
from bict_ray.core.embedding_column import ENCODINGS

SINGLE_WORKER = ("task", "ray_train")  # train.single_worker: where a stage with one worker runs
INGEST = ("memory", "stream")  # train.ingest: how an embedding model's training images reach its workers
EMBED_PLACES = ("driver", "tasks")  # eval.embed: where query sets are embedded

# The arms a run can compare with BiCT (bict_ray.pipeline.arms), each on the run's own phi_1, gallery v1 and splits:
# bct_chained (phi_t compatible with phi_{t-1}, gallery never upgraded), bct_anchored (every phi_t compatible with
# phi_1, gallery never upgraded), independent_psi (lambda = 0, then psi), linear_psi (psi fitted in closed form)
ARMS = ("bct_chained", "bct_anchored", "independent_psi", "linear_psi")


@dataclass
class DataConfig:
    """Where the images come from. ``kind``: fashion_mnist | imagefolder | npz | parquet (README, "Data")."""

    kind: str = "fashion_mnist"
    root: str | None = None
    image_size: int | None = None  # None: the dataset's own size (28 for Fashion-MNIST, 32 for user data)
    channels: int | None = None  # None: 1 for Fashion-MNIST and grayscale data, else 3
    test_fraction: float = 0.2  # user data has no test split: this share of each class becomes the test set
    # this share of each class's training images (seeded, saved with the splits) is held out as the validation set,
    # which selects (the lambda search); no model trains on it. 0: no validation set (and no search)
    val_fraction: float = 0.1
    limit_train: int | None = None  # keep at most this many training images (smoke runs)
    limit_test: int | None = None  # keep at most this many test images (smoke runs)
    seed: int = 0
    # kind=parquet: the table's columns; the defaults are what Hugging Face datasets writes for an image dataset.
    # image_column: the encoded images (binary, or a struct with a `bytes` field); label_column: integer class ids
    image_column: str = PARQUET_IMAGE_COLUMN
    label_column: str = PARQUET_LABEL_COLUMN
    # integer ids, kept as the images' ids (so old_model.kind=embeddings rows match them). A table without an `id`
    # column (the default name) numbers its rows 0 … N−1 instead; another name must exist; null: always numbered
    id_column: str | None = PARQUET_ID_COLUMN

    def __post_init__(self):
        _check_choice("data.kind", self.kind, DATA_KINDS)
        if self.kind != "fashion_mnist" and not self.root:
            raise ConfigError(f"data.root is required for data.kind={self.kind}")
        columns = {"image_column": PARQUET_IMAGE_COLUMN, "label_column": PARQUET_LABEL_COLUMN,
                   "id_column": PARQUET_ID_COLUMN}
        for name, default in columns.items():
            value = getattr(self, name)
            if value != default and self.kind != "parquet":  # a key meant for a Parquet table is never ignored
                raise ConfigError(f"data.{name} is read by data.kind=parquet only, and data.kind is {self.kind}")
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"data.{name} must name a column, got {value!r}")
        named = [getattr(self, name) for name in columns if getattr(self, name) is not None]
        if len(set(named)) != len(named):
            raise ConfigError(f"data.image_column, data.label_column and data.id_column must name different "
                              f"columns, got {', '.join(named)}")
        _check_range("data.test_fraction", self.test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _check_range("data.val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.channels}")
        for name in ("image_size", "limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")


@dataclass
class ScenarioConfig:
    """The upgrade sequence phi_1 -> ... -> phi_T and what each model's training split holds.

    class_growth: model t trains on the classes in ``classes[t-1]`` (default: evenly growing subsets ending
    with every class). data_growth: model t trains on ``fractions[t-1]`` of each class's images (nested, so
    later models see a superset; default evenly growing up to 1.0).
    """

    kind: str = "class_growth"
    steps: int = 3  # number of models T (T - 1 upgrades)
    classes: list[list[int]] | None = None
    fractions: list[float] | None = None
    seed: int = 0
    # open set: these classes are held out of every model's (and psi's) training and of the validation set, and the
    # test queries and gallery hold only them (docs/PROTOCOL.md, "Retrieval protocols"). None: closed set
    test_classes: list[int] | None = None

    def __post_init__(self):
        _check_choice("scenario.kind", self.kind, SCENARIOS)
        if self.steps < 2:
            raise ConfigError(f"scenario.steps must be >= 2 (an old and a new model), got {self.steps}")
        if self.classes is not None:
            if len(self.classes) != self.steps:
                raise ConfigError(
                    f"scenario.classes has {len(self.classes)} subsets but scenario.steps is {self.steps}")
            for t, subset in enumerate(self.classes, 1):
                if not subset:
                    raise ConfigError(f"scenario.classes[{t - 1}] (model {t}) is empty")
                if len(set(subset)) != len(subset):
                    raise ConfigError(f"scenario.classes[{t - 1}] (model {t}) repeats a class: {subset}")
        if self.fractions is not None:
            if len(self.fractions) != self.steps:
                raise ConfigError(
                    f"scenario.fractions has {len(self.fractions)} values but scenario.steps is {self.steps}")
            for t, frac in enumerate(self.fractions):
                _check_range(f"scenario.fractions[{t}]", frac, 0.0, 1.0, low_open=True)
        if self.test_classes is not None:
            # the upper bound needs the dataset: load_dataset checks it
            if not self.test_classes:
                raise ConfigError("scenario.test_classes is empty: list the held-out classes, or null for a closed set")
            if len(set(self.test_classes)) != len(self.test_classes) or min(self.test_classes) < 0:
                raise ConfigError(f"scenario.test_classes must be distinct class ids >= 0, got {self.test_classes}")
            for t, subset in enumerate(self.classes or [], 1):
                trained = sorted(set(subset) & set(self.test_classes))
                if trained:
                    raise ConfigError(f"scenario.classes[{t - 1}] (model {t}) has test class(es) {trained}: "
                                      "scenario.test_classes are held out of every model's training")


@dataclass
class ModelConfig:
    """The embedding network phi_t = backbone -> embedding -> classifier (the same recipe for every step)."""

    # a name in BACKBONES (bict_ray/core/models.py), torchvision:<architecture> (any torchvision classification
    # model, its head's final Linear dropped) or python (the module model.factory returns)
    backbone: str = "small_cnn"
    embedding_dim: int = 128
    classifier: str = "cosine"  # a kind in CLASSIFIERS: cosine (default, docs/METHOD.md) | linear
    scale: float = 16.0  # cosine classifier logit scale s
    # local backbone state_dict file that initialises every phi_t's backbone; None = random init (no download)
    weights: str | None = None
    factory: str | None = None  # backbone python: "package.module:callable" returning the backbone nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)  # backbone python: the factory's keyword arguments

    def __post_init__(self):
        problem = backbone_problem(self.backbone, self.factory, self.kwargs)
        if problem:
            raise ConfigError(problem)
        _check_choice("model.classifier", self.classifier, CLASSIFIERS)
        if self.embedding_dim < 1:
            raise ConfigError(f"model.embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.scale <= 0:
            raise ConfigError(f"model.scale must be > 0, got {self.scale}")


# The old_model keys each kind requires, and all those it reads: a key set for a kind that does not read it is an
# error, so that a key meant for another kind is never silently ignored
_OLD_MODEL_INPUT = ("image_size", "channels", "mean", "std")
_OLD_MODEL_REQUIRED = {"none": (), "torchscript": ("path", "image_size", "channels"),
                       "torchvision": ("architecture", "weights", "image_size", "channels"),
                       "python": ("factory", "image_size", "channels"), "module": ("image_size", "channels"),
                       "embeddings": ("path",)}
_OLD_MODEL_KEYS = {"none": (), "torchscript": ("path", *_OLD_MODEL_INPUT),
                   "torchvision": ("architecture", "weights", "layer", *_OLD_MODEL_INPUT),
                   "python": ("factory", "kwargs", "weights", *_OLD_MODEL_INPUT),
                   "module": _OLD_MODEL_INPUT,
                   "embeddings": ("path", "id_column", "embedding_column")}


@dataclass
class OldModelConfig:
    """The old model phi_old a service already runs, brought from outside instead of trained (docs/OLD_MODEL.md).

    ``kind``: none (the run trains its own phi_1) | torchscript | torchvision | python (loaded by
    ``bict_ray.core.external.load_old_model``) | module (an nn.Module handed over from Python:
    ``run_sequence(config, out, old_model=module)``) | embeddings (phi_old's embeddings by image id only,
    ``bict_ray.storage.old_embeddings``). Nothing is ever downloaded: every file is local.
    """

    kind: str = "none"
    path: str | None = None  # torchscript: the scripted or traced .pt file; embeddings: the Parquet file
    architecture: str | None = None  # torchvision: a classification model's name (resnet18, resnet50, ...)
    weights: str | None = None  # torchvision (required), python (optional): a local state_dict file
    # torchvision: the graph node whose output is the embedding; None = the input of the head's final Linear
    layer: str | None = None
    factory: str | None = None  # python: "package.module:callable" returning the torch.nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)  # python: the factory's keyword arguments
    id_column: str = "id"  # embeddings: integer ids, matched to the training images' ids
    embedding_column: str = "embedding"  # embeddings: list<float|double>, fixed_size_list or fixed_shape_tensor
    # The input the old model was trained on, made from the project's (N, C, H, W) uint8 images: ``channels`` (1 or
    # 3; 1 -> 3 replicates the gray channel, 3 -> 1 takes the luma), resized (bilinear) to image_size x image_size,
    # then (x / 255 - mean) / std per channel (1 value or one per channel). mean = std = 0.5 is the project's own
    # [-1, 1] mapping; a model trained on ImageNet wants [0.485, 0.456, 0.406] and [0.229, 0.224, 0.225]
    image_size: int | None = None
    channels: int | None = None
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])

    def __post_init__(self):
        _check_choice("old_model.kind", self.kind, OLD_MODEL_KINDS)
        for name in _OLD_MODEL_REQUIRED[self.kind]:
            if getattr(self, name) in (None, ""):
                raise ConfigError(f"old_model.{name} is required for old_model.kind={self.kind}")
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if f.name != "kind" and f.name not in _OLD_MODEL_KEYS[self.kind] and getattr(self, f.name) != default:
                readers = [kind for kind, keys in _OLD_MODEL_KEYS.items() if f.name in keys]
                raise ConfigError(f"old_model.{f.name} is not read by old_model.kind={self.kind} (only by "
                                  f"{', '.join(readers)})")
        if self.kind == "python" and not FACTORY_RE.match(self.factory):
            raise ConfigError(f"old_model.factory must look like package.module:callable, got {self.factory!r}")
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise ConfigError(f"old_model.kwargs must be a mapping of argument names to values, got {self.kwargs!r}")
        if self.kind in INPUT_KINDS:
            if self.image_size < 1:
                raise ConfigError(f"old_model.image_size must be >= 1, got {self.image_size}")
            if self.channels not in (1, 3):
                raise ConfigError(f"old_model.channels must be 1 or 3, got {self.channels}")
            for name in ("mean", "std"):
                values = getattr(self, name)
                if len(values) not in (1, self.channels):
                    raise ConfigError(f"old_model.{name} must have 1 or {self.channels} (old_model.channels) "
                                      f"values, got {values}")
            if min(self.std) <= 0:
                raise ConfigError(f"old_model.std must be > 0, got {self.std}")
        if self.kind == "embeddings" and self.id_column == self.embedding_column:
            raise ConfigError(f"old_model.id_column and old_model.embedding_column are both {self.id_column!r}")


@dataclass
class CompatConfig:
    """Backward compatibility of phi_{t+1} with phi_t: L = CE + lam * L_compat."""

    loss: str = "bct"  # a key of COMPAT_LOSSES (bict_ray/core/losses.py): bct, l2, contrastive, ract, ...
    lam: float = 1.0  # 0 = independent training
    # which old model phi_t is trained compatible with: "previous" (phi_{t-1}: BiCT, and BCT chained) or "first"
    # (phi_1: BCT anchored, the BCT paper's choice for a gallery that is never upgraded)
    reference: str = "previous"
    synthesise_new_classes: bool = True  # bct: pseudo old classifier rows for classes phi_t never saw
    temperature: float = 0.1  # contrastive / ract

    def __post_init__(self):
        _check_choice("compat.loss", self.loss, COMPAT_LOSSES)
        _check_choice("compat.reference", self.reference, ("previous", "first"))
        if self.lam < 0:
            raise ConfigError(f"compat.lam must be >= 0, got {self.lam}")
        if self.temperature <= 0:
            raise ConfigError(f"compat.temperature must be > 0, got {self.temperature}")


@dataclass
class TrainConfig:
    """Optimisation and Ray Train scaling for the embedding models."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_workers: int = 1  # Ray Train workers (DDP)
    # how a stage with one worker runs: "task", one Ray task that checkpoints and retries like Ray Train without a
    # worker group's start-up (seconds per fit); "ray_train", a TorchTrainer like several workers
    single_worker: str = "task"
    # how the training images reach the workers: "memory", the whole split through the object store to every
    # worker; "stream", a Ray Data stream split across the workers, read (and, for data.kind=parquet, decoded from
    # the table) in Ray Data tasks, so no worker holds the split (docs/RAY.md, "Streamed training data")
    ingest: str = "memory"
    shuffle_buffer: int = 4096  # ingest=stream: rows each worker shuffles its stream in (Ray Data's local buffer)
    ingest_cpus: float = 0.5  # ingest=stream: CPUs a Ray Data read or decode task takes beside the workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    storage_path: str | None = None  # Ray Train storage; None = RUN_DIR/ray_results (must be shared across nodes)
    torch_threads: int | None = None  # per worker; None = leave torch's default
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.max_failures < 0:
            raise ConfigError(f"train.max_failures must be >= 0, got {self.max_failures}")
        if self.single_worker not in SINGLE_WORKER:
            raise ConfigError(f"train.single_worker must be one of {', '.join(SINGLE_WORKER)}, "
                              f"got {self.single_worker!r}")
        _check_choice("train.ingest", self.ingest, INGEST)
        if self.shuffle_buffer < 1:
            raise ConfigError(f"train.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.ingest_cpus <= 0:
            raise ConfigError(f"train.ingest_cpus must be > 0, got {self.ingest_cpus}")


@dataclass
class TransformConfig:
    """The upgrade transform psi_{t->t+1}: L = alpha * CE(w_new psi(s), y) + beta * (1 - cos(psi(s), phi_new(x)))."""

    hidden: int = 512
    layers: int = 2
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-5
    alpha: float = 1.0
    beta: float = 1.0
    source: str = "gallery"  # gallery: s(x) as the gallery stores it | model: phi_t(x)
    enabled: bool = True  # False = BCT only: the gallery is never upgraded
    # "sgd": trained on Ray Train with the loss above; "lstsq" / "procrustes": a linear psi (layers: 0) fitted in
    # closed form on the same training pairs (bict_ray.core.closed_form), in seconds
    fit: str = "sgd"
    # psi's training budget in data: this share of each class of phi_t's training images gives the pairs psi learns
    # from (seeded, the same images for every lambda and seed); 1.0 = all of them. The lambda study crosses it
    pair_fraction: float = 1.0

    def __post_init__(self):
        _check_range("transform.pair_fraction", self.pair_fraction, 0.0, 1.0, low_open=True)
        _check_choice("transform.source", self.source, ("gallery", "model"))
        _check_choice("transform.fit", self.fit, ("sgd", *FIT_METHODS))
        if self.fit != "sgd" and self.layers != 0:
            raise ConfigError(f"transform.fit={self.fit} fits a linear psi: set transform.layers=0 "
                              f"(got {self.layers})")
        if self.alpha < 0 or self.beta < 0 or (self.alpha == 0 and self.beta == 0):
            raise ConfigError(
                f"transform.alpha and transform.beta must be >= 0 and not both 0, got {self.alpha}, {self.beta}")
        for name in ("hidden", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transform.{name} must be >= 1, got {getattr(self, name)}")
        if self.layers < 0:
            raise ConfigError(f"transform.layers must be >= 0 (0: a linear psi), got {self.layers}")


@dataclass
class GalleryConfig:
    """Ray Data extraction and upgrade of gallery versions."""

    rows_per_shard: int = 4096
    batch_size: int = 1024
    concurrency: int = 1  # Ray Data tasks at once (each one torch thread)
    cpus_per_task: float = 0.5  # fractional: Ray Data's own work needs a share of the CPUs beside the tasks
    use_gpu: bool = False
    # What psi computes in during an upgrade (bict_ray.core.embed.PRECISIONS): "bfloat16" runs psi much faster on CPUs
    # with AVX512-BF16 or AMX, at a cost in mAP too small to matter on the demo (measured: BENCHMARKS.md, section
    # "Gallery upgrade"); the version's manifest records it.
    upgrade_precision: str = "float32"
    # How a version's embedding column is stored (bict_ray.core.embedding_column.ENCODINGS): "binary" writes and
    # reads several times faster; "tensor" is Arrow's fixed-shape tensor, which pandas, pyarrow and Ray Data read back
    # as arrays without bict-ray (measured: BENCHMARKS.md, section "Gallery I/O")
    embedding_encoding: str = "binary"

    def __post_init__(self):
        for name in ("rows_per_shard", "batch_size", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gallery.{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_task <= 0:
            raise ConfigError(f"gallery.cpus_per_task must be > 0, got {self.cpus_per_task}")
        _check_choice("gallery.upgrade_precision", self.upgrade_precision, PRECISIONS)
        _check_choice("gallery.embedding_encoding", self.embedding_encoding, ENCODINGS)


@dataclass
class EvalConfig:
    """Retrieval evaluation of the test split (docs/PROTOCOL.md). ``protocol``: leave_one_out (the test split is
    both query and gallery, self-matches excluded by id) | query_gallery (separate query and gallery sets)."""

    protocol: str = "leave_one_out"
    # query_gallery on data without query and gallery sets of its own: this share of each test class (seeded by
    # data.seed) is the query set, the rest the gallery. A fifth, as data.test_fraction: the gallery keeps four
    # fifths of the test images, so a query meets nearly the positives and distractors leave-one-out gives it, and
    # a fifth is still 2000 queries on Fashion-MNIST's test split
    query_fraction: float = 0.2
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    map_at: int | None = None  # None = exact mAP over the whole gallery
    # where the query sets (and the validation set) are embedded: "driver", in the run's own process; "tasks", in
    # Ray Data tasks as a gallery is extracted (gallery.concurrency, gallery.use_gpu), the same embeddings. On 2
    # cores the driver was as fast or faster (BENCHMARKS.md, "Query embedding"); tasks pay where the workers have
    # GPUs or more cores than the driver
    embed: str = "driver"
    partial_refresh: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    matrix: bool = True
    # evaluate on the test split; a search's trials run without it (they select on validation) and the chosen
    # configuration is tested once, after the selection
    test: bool = True

    def __post_init__(self):
        _check_choice("eval.protocol", self.protocol, PROTOCOLS)
        _check_choice("eval.embed", self.embed, EMBED_PLACES)
        _check_range("eval.query_fraction", self.query_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"eval.ks must be positive integers, got {self.ks}")
        for frac in self.partial_refresh:
            _check_range("eval.partial_refresh", frac, 0.0, 1.0)


@dataclass
class RayConfig:
    """How to reach Ray. address None = the job's cluster ($RAY_ADDRESS) or else a new local instance;
    "auto" = the cluster started on this machine (`ray start`); "ray://..." or "host:port" = that cluster."""

    address: str | None = None
    num_cpus: int | None = None  # only for a local instance started by this process

    def __post_init__(self):
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"ray.num_cpus must be >= 1, got {self.num_cpus}")


# service.export: what `bict-ray upgrade-service` writes of the upgraded gallery for serving (None: nothing)
SERVICE_EXPORTS = ("faiss", "lance")
# the stages of `bict-ray upgrade-service`, in order (bict_ray.pipeline.service); here so that the command line
# can list them without importing Ray
SERVICE_STAGES = ("sequence", "import", "upgrade", "evaluate", "export", "report")


@dataclass
class ServiceConfig:
    """The service a run upgrades (``bict-ray upgrade-service``, docs/SERVICE.md): the gallery its old model made,
    as the service stores it, and what to hand back.

    gallery: the embeddings (Parquet file, folder or glob; .npz or .npy; a local path or a pyarrow URI) with the
    columns ``id_column``, ``embedding_column`` and, optionally, ``label_column`` (a production gallery has no
    labels: the labelled query and gallery sets of ``data`` are what is scored). normalise: scale rows to unit length
    instead of refusing rows that are not. export: ``faiss`` (``index`` flat or ivf) or ``lance``; None: none.
    """

    gallery: str | None = None
    id_column: str = "id"
    embedding_column: str = "embedding"
    label_column: str | None = None
    normalise: bool = False
    export: str | None = None
    index: str = "flat"  # faiss: flat (exact) | ivf (approximate); bict_ray.storage.export checks it

    def __post_init__(self):
        if self.export is not None:
            _check_choice("service.export", self.export, SERVICE_EXPORTS)
        if self.index != "flat" and self.export != "faiss":
            raise ConfigError(f"service.index={self.index} applies to service.export=faiss only")
        columns = [c for c in (self.id_column, self.embedding_column, self.label_column) if c is not None]
        if len(set(columns)) != len(columns):
            raise ConfigError(f"service.id_column, embedding_column and label_column must differ, got {columns}")


@dataclass
class Config:
    """A whole run. Sections mirror the YAML file."""

    name: str = "bict"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # phi_old from a service instead of a trained phi_1 (kind "none", the default: the run trains its own)
    old_model: OldModelConfig = field(default_factory=OldModelConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    gallery: GalleryConfig = field(default_factory=GalleryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # the service `bict-ray upgrade-service` upgrades: its stored gallery and the export (unused by other commands)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    # arms compared with BiCT in the same run (ARMS), sharing its phi_1, gallery v1 and splits; results.json "arms"
    arms: list[str] = field(default_factory=list)

    def __post_init__(self):
        for name in self.arms:
            _check_choice("arms", name, ARMS)
        if len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"arms lists an arm twice: {self.arms}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, a path or a shipped preset's name (``demo``, ``smoke``; the defaults when ``path`` is None), and apply ``key.sub=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = presets.resolve(path, "config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(Config, raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b=value`` override to a raw config mapping; the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, _, text = item.partition("=")
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {item!r} has an empty key")
    _check_path(Config, keys, dotted)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key} is not a section")
    node[keys[-1]] = value


def from_dict(cls, raw: dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, checking key names and value types recursively."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
            f"valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _coerce(hint, value, key: str):
    """Check ``value`` against the type hint; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {hint}")
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(item_hint, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, str):
            value = _float_or_text(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _float_or_text(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _check_path(cls, keys: list[str], dotted: str) -> None:
    for depth, key in enumerate(keys):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key {dotted}: {'.'.join(keys[:depth])} is not a section")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            where = ".".join(keys[:depth]) or "the top level"
            raise ConfigError(
                f"unknown config key {dotted}; valid keys in {where}: {', '.join(sorted(fields))}")
        cls = typing.get_type_hints(cls)[key]


def _check_choice(key: str, value, choices) -> None:
    """``choices``: the owner's own list or registry (its keys), so a new entry needs no second copy here."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def _check_range(key, value, low, high, low_open=False, high_open=False) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be in {interval}, got {value}")

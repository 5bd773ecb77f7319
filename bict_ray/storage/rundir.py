"""The run directory: the contract that the CLI, the jobs, the tests and the report share (docs/STORAGE.md).

    RUN_DIR/config.yaml                 resolved config
    RUN_DIR/splits/                     the seeded split files
    RUN_DIR/models/phi_<t>/             weights + model.json card
    RUN_DIR/transforms/psi_<s>_<t>/     weights + model.json card
    RUN_DIR/gallery/v<t>/               Parquet shards + manifest.json
    RUN_DIR/results.json                every evaluation
    RUN_DIR/report.md, RUN_DIR/plots/   the human report
    RUN_DIR/service/                    upgrade-service: the service's gallery v1, v2 and its export

RUN_DIR may be a URI of object storage (``s3://bucket/run``): see ``RunDir`` and ``storage/mirror.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from bict_ray.config import Config, ConfigError, save_config
from bict_ray.errors import InputError
from bict_ray.storage.mirror import Mirror

# How a run is executed, not what it computes: these may change between a run and its resumption.
RUNTIME_KEYS = frozenset({
    "ray", "train.num_workers", "train.use_gpu", "train.cpus_per_worker", "train.storage_path",
    "train.single_worker", "train.ingest", "train.ingest_cpus", "train.torch_threads", "train.max_failures",
    "gallery.concurrency", "gallery.cpus_per_task", "gallery.use_gpu", "gallery.batch_size",
    "eval.test",  # what is evaluated, not what is trained: a search's best trial is tested after selection
    "eval.embed",  # where the queries are embedded: the same embeddings either way
    "arms",  # arms run beside the run, each in its own directory: one can be added to a finished run
    "service.export", "service.index",  # what upgrade-service hands back of the upgraded gallery
})


class RunDir:
    """A run directory: a local or shared path, or a URI of object storage (``s3://bucket/run``) worked on through a
    local mirror (``storage/mirror.py``) whose changes ``sync`` uploads. ``path`` is where the files are read and
    written either way; gallery versions and training checkpoints go to the URI itself."""

    def __init__(self, path: str | Path):
        self.uri = str(path).rstrip("/") if "://" in str(path) else None
        self.mirror = Mirror(self.uri) if self.uri else None
        if self.mirror is not None:
            self.mirror.pull()
        # Path("s3://bucket/run") would be the local folder "s3:/bucket/run": a URI is only ever the mirror's
        self.path = self.mirror.local if self.mirror is not None else Path(path)

    @classmethod
    def local(cls, path: str | Path, what: str) -> "RunDir":
        """A run directory for ``what``, which works on local or shared paths only: a URI is refused by name."""
        if "://" in str(path):
            raise InputError(f"run directory {path}: {what} does not take a URI yet; give a local path or a shared "
                             "file system mount (`bict-ray sequence`, `report` and the gallery commands take s3://)")
        return cls(path)

    @classmethod
    def create(cls, path: str | Path, config: Config) -> "RunDir":
        """Open ``path`` for ``config``: a new directory gets config.yaml; an existing one must hold the same config."""
        run_dir = cls(path)
        saved = run_dir.path / "config.yaml"
        if saved.is_file():
            differences = config_differences(yaml.safe_load(saved.read_text()) or {}, config.to_dict(),
                                             Config().to_dict())
            if differences:
                raise ConfigError(
                    f"run directory {run_dir} was made with another config ({'; '.join(differences)}); "
                    "resume it with its own config.yaml, or choose a new --out")
        else:
            run_dir.path.mkdir(parents=True, exist_ok=True)
            save_config(config, saved)
            run_dir.sync()
        return run_dir

    def __str__(self) -> str:
        return self.uri or str(self.path)

    @property
    def identity(self) -> str:
        """What names this run wherever it is opened from: its URI, or its resolved path."""
        return self.uri or str(self.path.resolve())

    def sync(self) -> None:
        """Upload what changed in the mirror (nothing to do for a local run directory)."""
        if self.mirror is not None:
            self.mirror.push()

    def join(self, *parts: str) -> str | Path:
        """A place inside the run directory: a URI when the run is on object storage, else a path."""
        return "/".join([self.uri, *parts]) if self.uri else self.path.joinpath(*parts)

    def training_storage(self, config: Config) -> Config:
        """``config`` with Ray Train's storage in the run's store when the run is on object storage and no
        ``train.storage_path`` is set (a mirror is one machine's disk; checkpoints must outlive it)."""
        if self.uri is None or config.train.storage_path is not None:
            return config
        return dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                     storage_path=self.join("ray_results")))

    def model_dir(self, version: int) -> Path:
        return self.path / "models" / f"phi_{version}"

    def transform_dir(self, source: int, target: int) -> Path:
        return self.path / "transforms" / f"psi_{source}_{target}"

    def gallery_dir(self, version: int) -> str | Path:
        return self.join("gallery", f"v{version}")

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    def write_results(self, results: dict[str, Any]) -> None:
        write_json(self.results_path, results)
        self.sync()


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON at ``path``, replaced in one rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2), encoding="utf-8")
    tmp.replace(path)


def config_differences(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None,
                       prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts, ignoring RUNTIME_KEYS. With ``defaults`` (the config's
    defaults, same shape), a key that ``saved`` lacks and ``current`` holds at its default is no difference: a run
    directory made before the key existed ran what its default does. A key ``current`` lacks is read by nothing."""
    differences = []
    defaults = defaults or {}
    for key in sorted(set(saved) | set(current)):
        dotted = prefix + key
        if dotted in RUNTIME_KEYS:
            continue
        a, b = saved.get(key), current.get(key)
        if key not in current or (key not in saved and key in defaults and b == defaults[key]):
            continue  # a key no longer read, or one added since at the value older runs behaved as
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_differences(a, b, defaults.get(key) if isinstance(defaults.get(key), dict) else {},
                                              dotted + ".")
        elif a != b:
            differences.append(f"{dotted}: {a!r} there, {b!r} now")
    return differences

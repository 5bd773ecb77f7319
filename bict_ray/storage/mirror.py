"""A run directory on object storage, worked on through a local mirror.

Everything in a run directory but its gallery versions and training checkpoints is small (configs, splits, model
folders, results, the report) and is written by the driver alone, through ordinary file code. A run directory given
as a URI (``s3://bucket/run``) keeps those files in a local folder, the mirror, and ``push`` uploads what changed
after every stage; ``pull`` brings the store's copy down first, so that a run resumed on another machine finds its
stages. The big parts never pass through the mirror: gallery versions are written by Ray Data tasks straight to
``URI/gallery/v<t>`` (with their own commit protocol, ``storage/gallery.py``), and training checkpoints to
``URI/ray_results``.

Object stores have no rename, so a file is uploaded whole as one object, and within a folder the files that say a
stage is done go last: a model folder's ``model.json`` after its weights, ``results.json`` after everything else.
A run killed mid-upload leaves at most a folder without its card, which the sequence treats as a stage not done.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from bict_ray.errors import InputError, StorageError, last_line

# never mirrored: written to the store directly, by many processes (at any depth: an arm's run has its own)
REMOTE_ONLY = ("gallery", "ray_results")
# run directories of their own inside this one, each with its own mirror
OWN_RUNS = ("arms",)
# the files that mark a folder (or the run) as done: uploaded after the rest
LAST = ("model.json", "manifest.json", "results.json")
CACHE_ENV = "BICT_CACHE_DIR"


class Mirror:
    """The local mirror of the run directory at ``uri`` (under ``$BICT_CACHE_DIR``, default ~/.cache/bict-ray)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        try:
            self.fs, root = pafs.FileSystem.from_uri(self.uri)
        except Exception as err:  # pyarrow raises ArrowInvalid or ArrowNotImplementedError for a scheme it lacks
            raise InputError(f"run directory {uri}: cannot open its filesystem ({err})") from None
        self.root = root.rstrip("/")
        cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bict-ray")
        name = self.uri.rsplit("/", 1)[-1] or "run"
        self.local = cache / "runs" / f"{name}-{hashlib.sha256(self.uri.encode()).hexdigest()[:12]}"
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) as last uploaded

    def pull(self) -> None:
        """Make the mirror the store's copy: whatever it held before goes (a run the store no longer has must not
        come back from this machine's cache), then the store's files come down."""
        if self.local.exists():
            shutil.rmtree(self.local)
        self.local.mkdir(parents=True)
        self._pushed = {}
        for relative in self._remote_files():
            target = self.local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            # written in place: a pull cut off is redone whole by the next one, which clears the mirror first
            with self._storage("reading", relative), self.fs.open_input_file(f"{self.root}/{relative}") as source:
                target.write_bytes(source.read())
            stat = target.stat()
            self._pushed[relative] = (stat.st_size, stat.st_mtime_ns)

    def push(self) -> int:
        """Upload the mirror's files that are new or changed since the last pull or push; returns how many."""
        changed = []
        for path in self.local.rglob("*"):
            relative = path.relative_to(self.local).as_posix()
            if not path.is_file() or not _mirrored(relative) or path.name.endswith(".tmp"):
                continue
            stat = path.stat()
            if self._pushed.get(relative) != (stat.st_size, stat.st_mtime_ns):
                changed.append((relative, (stat.st_size, stat.st_mtime_ns)))
        # the files that mark something done after the rest; results.json, the run's own mark, after them all
        changed.sort(key=lambda item: (item[0] == "results.json", Path(item[0]).name in LAST, item[0]))
        for relative, stamp in changed:
            key = f"{self.root}/{relative}"
            with self._storage("writing", relative):
                self.fs.create_dir(key.rsplit("/", 1)[0], recursive=True)
                with self.fs.open_output_stream(key) as sink:
                    sink.write((self.local / relative).read_bytes())
            self._pushed[relative] = stamp
        return len(changed)

    def _remote_files(self) -> list[str]:
        """The mirrored files in the store, relative to the run directory."""
        with self._storage("listing", ""):
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        relative = (info.path[len(self.root) + 1:] for info in infos if info.type == pafs.FileType.File)
        return [path for path in relative if _mirrored(path)]

    @contextlib.contextmanager
    def _storage(self, doing: str, relative: str) -> Iterator[None]:
        """The store's OSError as a StorageError naming what was being done to which file."""
        try:
            yield
        except StorageError:
            raise
        except OSError as err:
            raise StorageError(f"{doing} {self.uri}/{relative}".rstrip("/") + f": {last_line(err)}; the run "
                               "directory's files in the mirror are kept, and a rerun uploads them") from err


def _mirrored(relative: str) -> bool:
    parts = relative.split("/")
    return not (set(parts[:-1]) & set(REMOTE_ONLY)) and parts[0] not in OWN_RUNS

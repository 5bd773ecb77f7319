"""One error contract: a problem bict-ray names ends a command with that one line and exit 2, wherever it was raised
(in the driver or inside a Ray task); anything else is a bug and keeps its traceback."""

import os

import numpy as np
import pytest
import torch

from bict_ray.cli import main
from bict_ray.core.models import UpgradeTransform
from bict_ray.errors import BictError, GalleryError, InputError, TrainingError, project_error
from bict_ray.storage.artifacts import ModelCard, save_artifact
from bict_ray.storage.gallery import write_gallery

DIM, ROWS, ROWS_PER_SHARD = 8, 48, 16


class FakeRayTaskError(GalleryError):
    """What Ray raises in the driver for an error in a task: an instance of the error's class whose message is the
    remote traceback, carrying the original error as ``cause``."""

    def __init__(self, cause):
        super().__init__("Traceback (most recent call last):\n  ... 60 lines ...\n" + str(cause))
        self.cause = cause


def test_project_error_finds_the_original_error_inside_a_task_error():
    original = GalleryError("shard part-00001.parquet: sha256 does not match the manifest")
    assert project_error(FakeRayTaskError(original)) is original
    try:
        try:
            raise FakeRayTaskError(original)
        except Exception as err:
            raise RuntimeError("Ray Data: a task failed") from err
    except RuntimeError as wrapped:
        assert project_error(wrapped) is original
    # the outermost of our own errors wins: it says what the command was doing
    outer = TrainingError("training phi_2 failed: NaN loss")
    outer.__cause__ = FakeRayTaskError(InputError("inner detail"))
    assert project_error(outer) is outer
    assert project_error(ZeroDivisionError("a bug")) is None


def test_every_project_error_is_a_bict_error_and_the_builtin_callers_expect():
    assert issubclass(GalleryError, BictError) and issubclass(GalleryError, ValueError)
    assert issubclass(TrainingError, BictError) and issubclass(TrainingError, RuntimeError)


@pytest.fixture
def gallery_and_psi(tmp_path):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    version = write_gallery(str(tmp_path / "v1"), np.arange(ROWS), rng.integers(0, 3, ROWS), embeddings,
                            rows_per_shard=ROWS_PER_SHARD, lineage=["phi_1"], space="phi_1")
    torch.manual_seed(0)
    save_artifact(tmp_path / "psi_1_2", UpgradeTransform(DIM, DIM, hidden=8, layers=1),
                  ModelCard("transform", "psi_1_2", source="phi_1", target="phi_2"))
    return version, tmp_path / "psi_1_2"


def upgrade_args(version, psi, out):
    return ["upgrade", "--gallery", version.path, "--transform", str(psi), "--out", str(out),
            "--set", f"gallery.rows_per_shard={ROWS_PER_SHARD}"]


def one_line_error(capsys) -> str:
    """The command's one error line, its last; Ray's own progress logging may come before it, but no traceback of
    the error: neither Ray's task error nor ours (a traceback names the class, the line does not)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("bict-ray "), err
    assert "RayTaskError" not in err and "GalleryError" not in err and "UserCodeException" not in err, err
    return lines[-1]


def test_a_corrupt_shard_found_inside_a_ray_task_is_one_line_and_exit_2(ray_session, gallery_and_psi, tmp_path,
                                                                        capsys):
    version, psi = gallery_and_psi
    shard = os.path.join(version.path, version.manifest["shards"][1]["file"])
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    assert main(upgrade_args(version, psi, tmp_path / "v2")) == 2
    line = one_line_error(capsys)
    assert line.startswith("bict-ray upgrade: error: ") and "checksum does not match the manifest" in line
    assert "part-00001" in line
    assert not (tmp_path / "v2" / "manifest.json").exists()


def test_a_version_committed_by_another_run_meanwhile_is_one_line_and_exit_2(ray_session, gallery_and_psi, tmp_path,
                                                                             capsys, monkeypatch):
    """Two upgrades started at once on one --out: both pass the driver's check, the first commits, and the second
    finds the committed version in its tasks."""
    from bict_ray.distributed import pipelines

    version, psi = gallery_and_psi
    out = tmp_path / "v2"
    other = write_gallery(str(tmp_path / "other"), np.arange(ROWS), np.zeros(ROWS, np.int64),
                          np.tile(np.eye(DIM, dtype=np.float32)[:1], (ROWS, 1)), rows_per_shard=ROWS_PER_SHARD,
                          lineage=["phi_1", "psi_1_2"],
                          space="phi_2")
    real_map = pipelines.map_shards

    def commit_meanwhile(*args, **kwargs):
        os.rename(other.path, out)  # the first run's commit lands between the driver's check and the tasks
        return real_map(*args, **kwargs)

    monkeypatch.setattr(pipelines, "map_shards", commit_meanwhile)
    assert main(upgrade_args(version, psi, out)) == 2
    line = one_line_error(capsys)
    assert "already holds a committed gallery version" in line and str(out) in line
    assert open(os.path.join(out, "manifest.json")).read()  # the committed version is left as it was


def test_a_bug_keeps_its_traceback(monkeypatch):
    from bict_ray.cli import env

    def broken(args):
        return 1 // 0

    monkeypatch.setattr(env, "run", broken)
    with pytest.raises(ZeroDivisionError):
        main(["env"])

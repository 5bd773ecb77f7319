"""The checkpoints of a stage trained in a Ray task: where they go, which one a resume reads, what is kept."""

import pytest
import torch

from bict_ray.distributed.sessions import CHECKPOINT_FILE, CheckpointStore


def saved(epoch: int) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}, "history": [{"epoch": e} for e in
                                                                                       range(epoch + 1)]}


@pytest.mark.parametrize("uri", [False, True])
def test_the_newest_checkpoint_is_read_and_two_are_kept(tmp_path, uri):
    root = f"file://{tmp_path}" if uri else str(tmp_path)
    store = CheckpointStore(root, "run")
    assert store.latest() is None  # nothing yet: a fresh start
    for epoch in range(12):  # past 10, where a name without padding would sort epoch 10 before epoch 9
        store.save(saved(epoch))
    latest = store.latest()
    assert latest["epoch"] == 11 and torch.equal(latest["model"]["w"], torch.full((2,), 11.0))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint_000010", "checkpoint_000011"]
    assert (tmp_path / "run" / "checkpoint_000011" / CHECKPOINT_FILE).is_file()


def test_a_checkpoint_cut_off_mid_write_is_passed_over(tmp_path):
    store = CheckpointStore(str(tmp_path), "run")
    store.save(saved(3))
    # a worker killed while writing epoch 4 leaves its folder with only the partial file
    cut = tmp_path / "run" / "checkpoint_000004"
    cut.mkdir()
    (cut / (CHECKPOINT_FILE + ".partial")).write_bytes(b"\x80\x02trunc")
    assert store.latest()["epoch"] == 3
    store.save(saved(4))  # the retried epoch writes over it
    assert store.latest()["epoch"] == 4 and not (cut / (CHECKPOINT_FILE + ".partial")).exists()

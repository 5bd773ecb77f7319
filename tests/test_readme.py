"""The README's Python example runs as written: docs that a test executes cannot rot."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_examples(section: str) -> list[str]:
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", body, re.S | re.M)


def test_the_python_api_example_runs(ray_session, tmp_path, monkeypatch, capsys):
    (example,) = python_examples("Python API")
    monkeypatch.chdir(tmp_path)  # the example writes gallery/ where it runs
    exec(compile(example, str(README), "exec"), {})
    assert 0 < float(capsys.readouterr().out.strip().splitlines()[-1]) <= 1
    assert (tmp_path / "gallery" / "v2" / "manifest.json").is_file()


def test_the_api_refuses_a_module_without_the_name_its_lineage_needs(ray_session, tmp_path):
    import numpy as np
    import pytest

    from bict_ray import InputError, UpgradeTransform, upgrade_gallery, write_gallery

    rows = np.eye(4, dtype=np.float32)
    v1 = write_gallery(str(tmp_path / "v1"), np.arange(4), np.arange(4), rows, rows_per_shard=4, lineage=["phi_1"],
                       space="phi_1")
    with pytest.raises(InputError, match="needs target="):
        upgrade_gallery(v1, UpgradeTransform(4, 4), str(tmp_path / "v2"))
    with pytest.raises(InputError, match="expected a transform model folder, Artifact or UpgradeTransform"):
        upgrade_gallery(v1, object(), str(tmp_path / "v2"), target="phi_2")
    assert not (tmp_path / "v2").exists()


def test_every_name_of_the_api_resolves():
    import bict_ray

    missing = [name for name in bict_ray.__all__ if getattr(bict_ray, name, None) is None]
    assert missing == []

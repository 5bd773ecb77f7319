import os
import subprocess
import sys

import pytest

from bict_ray.cli import main


def run_cli(*args):
    """The installed console script, as a user runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "bict-ray")
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=120)


def test_env_reports_versions_and_dataset():
    result = run_cli("env")
    assert result.returncode == 0, result.stderr
    for key in ("python:", "torch:", "ray:", "faiss-cpu:", "pyarrow:", "cpus:", "fashion-mnist:"):
        assert key in result.stdout


@pytest.mark.parametrize("command", ["splits"])
def test_unknown_key_fails_naming_it(command, capsys):
    assert main([command, "--set", "nonexistent.key=1"]) == 2
    err = capsys.readouterr().err
    assert "nonexistent.key" in err and "Traceback" not in err


def test_splits_command_writes_and_protects_the_run_dir(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["splits", "-c", "configs/smoke.yaml", "--out", out]) == 0
    assert "model phi_2: 1080 training images" in capsys.readouterr().out
    assert main(["splits", "-c", "configs/smoke.yaml", "--out", out, "--set", "scenario.seed=5"]) == 2
    assert "another config" in capsys.readouterr().err


def test_train_stage_needs_its_parent(ray_session, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--stage", "new", "--step", "2", "-c", "configs/smoke.yaml", "--out", out]) == 2
    assert "phi_1 is not trained yet" in capsys.readouterr().err
    assert main(["train", "--stage", "upgrade", "--step", "5", "-c", "configs/smoke.yaml", "--out", out]) == 2
    assert "--step must be in 2..2" in capsys.readouterr().err


JOBS = {"append_gallery": "append", "evaluate": "evaluate", "extract": "extract", "import_gallery": "import-gallery", "sequence": "sequence",
        "train": "train", "tune_lambda": "tune", "upgrade_gallery": "upgrade", "upgrade_service": "upgrade-service"}


def test_every_job_is_its_cli_command():
    """`ray job submit ... python -m jobs.<name>` runs the CLI command of that name, with the same arguments."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert sorted(p.stem for p in (root / "jobs").glob("*.py") if p.stem != "__init__") == sorted(JOBS)
    for job, command in JOBS.items():
        result = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], capture_output=True, text=True,
                                timeout=120, cwd=root)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: bict-ray {command} "), (job, result.stdout[:80])


def test_a_preset_is_found_by_name_outside_a_checkout(tmp_path, monkeypatch, capsys):
    """An installed package runs its presets from any directory: `-c smoke`, or `-c configs/smoke.yaml` where the
    working directory has no configs/."""
    monkeypatch.chdir(tmp_path)
    assert main(["splits", "-c", "smoke", "--out", "a"]) == 0
    assert main(["splits", "-c", "configs/smoke.yaml", "--out", "b"]) == 0
    assert (tmp_path / "a" / "config.yaml").read_text() == (tmp_path / "b" / "config.yaml").read_text()
    assert main(["splits", "-c", "no_such_preset", "--out", "c"]) == 2
    err = capsys.readouterr().err
    assert "no_such_preset" in err and "demo" in err and "smoke" in err


def test_a_run_directory_uri_is_opened_in_its_store_or_refused_never_made_a_local_folder(tmp_path, monkeypatch,
                                                                                          capsys):
    # Path("s3://bucket/run") is the local folder "s3:/bucket/run": no command may turn a URI into one
    monkeypatch.chdir(tmp_path)
    assert main(["splits", "-c", "smoke", "--out", "nosuch://bucket/run"]) == 2
    assert "run directory nosuch://bucket/run: cannot open its filesystem" in capsys.readouterr().err
    assert main(["demo", "--out", "s3://bucket/run"]) == 2
    assert "the demo does not take a URI yet" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seeds, message", [
    ("", "--seeds '': no seed given"),
    ("0,,1", "--seeds '0,,1': item 2 is empty"),
    ("0,a", "item 2 'a' is not an integer >= 0"),
    ("1.5", "item 1 '1.5' is not an integer >= 0"),
    ("-1", "item 1 '-1' is not an integer >= 0"),
    ("0,1,0", "seeds must be distinct: 0 given more than once"),
])
def test_sequence_seeds_are_parsed_and_bad_lists_refused_before_anything_runs(seeds, message, tmp_path, capsys):
    from bict_ray.cli.sequence import parse_seeds

    assert parse_seeds(" 2, 0,11") == [2, 0, 11]
    out = tmp_path / "seeds"
    assert main(["sequence", "-c", "smoke", "--seeds", seeds, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bict-ray sequence: error: ") and message in err and "Traceback" not in err
    assert not out.exists()

"""The whole pipeline on the smoke preset: sequence, resume, report, and a 2-trial lambda search on Ray Tune."""

import json
import shutil

import pandas as pd
import pytest
from PIL import Image

from bict_ray.config import ConfigError, load_config
from bict_ray.core.embed import embed_images, upgrade_embeddings
from bict_ray.pipeline.report import write_report
from bict_ray.pipeline.sequence import run_sequence
from bict_ray.retrieval.metrics import retrieval_metrics
from bict_ray.storage.artifacts import load_artifact
from bict_ray.storage.gallery import open_gallery

TESTS = ("old_self", "new_self", "backward", "backward_prev", "forward", "deployed_before")


@pytest.fixture(scope="module")
def smoke_run(ray_session, smoke_config, smoke_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    lines = []
    results = run_sequence(smoke_config, out, log=lines.append, dataset=smoke_data,
                           on_step=lambda t, tests: SELECTING.append((t, tests)))
    return out, results, lines


SELECTING = []  # what the smoke run handed on_step, the hook a search selects through


def test_results_have_every_test_in_range(smoke_run):
    out, results, _ = smoke_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == results["steps"]
    (step,) = saved["steps"]
    assert step["step"] == 2 and set(step["tests"]) == set(TESTS)
    for name, metrics in step["tests"].items():
        for key in ("mAP", "R@1", "R@5", "R@10"):
            assert 0.0 <= metrics[key] <= 1.0, (name, key)
        assert metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"]
    # same query model, same gallery: the two "before the upgrade" tests are the same number
    assert step["tests"]["deployed_before"]["mAP"] == pytest.approx(step["tests"]["old_self"]["mAP"], abs=1e-6)
    matrix = saved["matrix"]
    assert matrix["queries"] == ["phi_1", "phi_2"] and matrix["galleries"] == ["v1", "v2"]
    assert matrix["mAP"][1][1] == pytest.approx(step["tests"]["forward"]["mAP"], abs=1e-6)
    fractions = [p["fraction"] for p in saved["partial_refresh"]]
    assert fractions == [0.0, 0.5, 1.0]
    assert saved["partial_refresh"][-1]["mAP"] == pytest.approx(step["tests"]["forward"]["mAP"], abs=1e-6)


def test_validation_results_come_from_the_validation_images_and_are_what_a_search_sees(smoke_run, smoke_data):
    out, results, _ = smoke_run
    (step,) = results["validation"]["steps"]
    assert step["step"] == 2 and set(step["tests"]) == set(TESTS)
    assert SELECTING == [(2, step["tests"])] and step["tests"] != results["steps"][0]["tests"]
    phi_1, phi_2 = (load_artifact(out / "models" / f"phi_{t}").module for t in (1, 2))
    psi = load_artifact(out / "transforms" / "psi_1_2").module
    val = smoke_data.val
    forward = retrieval_metrics(embed_images(phi_2, val.images), val.labels,
                                upgrade_embeddings([psi], embed_images(phi_1, val.images)), val.labels,
                                query_ids=val.ids, gallery_ids=val.ids)
    assert step["tests"]["forward"]["mAP"] == pytest.approx(forward["mAP"], abs=1e-6)
    assert step["tests"]["forward"]["num_queries"] == len(val)


def test_galleries_keep_ids_and_lineage(smoke_run, smoke_data):
    out, _, _ = smoke_run
    v1, v2 = open_gallery(str(out / "gallery" / "v1")), open_gallery(str(out / "gallery" / "v2"))
    assert v1.lineage == ["phi_1"] and v2.lineage == ["phi_1", "psi_1_2"] and v2.space == "phi_2"
    ids1 = v1.read_all().ids
    ids2 = v2.read_all().ids
    assert sorted(ids1) == sorted(ids2) == sorted(smoke_data.test.ids)


def test_step_tests_equal_the_in_memory_metrics_of_the_same_arrays(smoke_run, smoke_data):
    # the runner evaluates from the versions' shards and query sets cut into shards; read whole and scored in memory,
    # the same models and galleries give the same numbers (exact mAP: up to swaps of rows within one float32 ulp)
    out, results, _ = smoke_run
    test = smoke_data.test
    phi = {t: embed_images(load_artifact(out / "models" / f"phi_{t}").module, test.images) for t in (1, 2)}
    v = {t: open_gallery(str(out / "gallery" / f"v{t}")).read_all() for t in (1, 2)}
    as_gallery = {f"phi_{t}": (phi[t], test.labels, test.ids) for t in phi}
    as_gallery.update({f"v{t}": (g.embeddings, g.labels, g.ids) for t, g in v.items()})
    pairs = {"old_self": (1, "phi_1"), "new_self": (2, "phi_2"), "backward": (2, "v1"), "backward_prev": (2, "phi_1"),
             "forward": (2, "v2"), "deployed_before": (1, "v1")}
    (step,) = results["steps"]
    for name, (query, gallery) in pairs.items():
        embeddings, labels, ids = as_gallery[gallery]
        expected = retrieval_metrics(phi[query], test.labels, embeddings, labels, query_ids=test.ids, gallery_ids=ids)
        assert step["tests"][name] == pytest.approx(expected, abs=1e-5), name


def test_resume_reruns_only_the_removed_stages(smoke_run, smoke_config, smoke_data, tmp_path):
    out, results, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("ray_results"))
    shutil.rmtree(copy / "transforms" / "psi_1_2")
    shutil.rmtree(copy / "gallery" / "v2")
    v1_bytes = (copy / "gallery" / "v1" / "part-00000.parquet").read_bytes()
    lines = []
    rerun = run_sequence(smoke_config, copy, log=lines.append, dataset=smoke_data)
    assert set(rerun["timings"]) >= {"train psi_1_2", "upgrade gallery v2"}
    assert not {"train phi_1", "train phi_2", "extract gallery v1"} & set(rerun["timings"])
    assert any("phi_1: trained already" in line for line in lines)
    assert (copy / "gallery" / "v1" / "part-00000.parquet").read_bytes() == v1_bytes
    # stages that were not rerun give the same numbers
    for name in ("old_self", "new_self", "backward", "backward_prev"):
        assert rerun["steps"][0]["tests"][name] == results["steps"][0]["tests"][name]


def test_another_config_is_refused_in_the_same_run_dir(smoke_run):
    out, _, _ = smoke_run
    with pytest.raises(ConfigError, match="compat.lam"):
        run_sequence(load_config("configs/smoke.yaml", ["compat.lam=3"]), out)


def test_report_renders_with_plots(smoke_run):
    out, _, _ = smoke_run
    report = write_report(out)
    text = report.read_text()
    assert "forward" in text and "backward" in text
    for name in ("steps.png", "matrix.png", "partial_refresh.png"):
        with Image.open(out / "plots" / name) as image:
            assert image.size[0] > 100


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_trial_lambda_search(ray_session, smoke_config, tmp_path, request, monkeypatch, where):
    from bict_ray.pipeline.tune import load_space, run_search
    from bict_ray.storage.rundir import RunDir

    space_file = tmp_path / "space.yaml"
    space_file.write_text("name: t\nparams:\n  compat.lam: {grid: [0.0, 1.0]}\nmax_concurrent_trials: 2\n")
    config = load_config("configs/smoke.yaml", ["train.epochs=1", "transform.epochs=1", "eval.matrix=false",
                                                "eval.partial_refresh=[]", "data.limit_train=400"])
    # on S3 (`bict-ray tune --out s3://…`): Tune's storage, every trial's run directory and the summary live in the
    # bucket; the files are read back below through another machine's mirror
    out = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('bucket')}/search"
    monkeypatch.setenv("BICT_CACHE_DIR", str(tmp_path / "machine-a"))
    summary = run_search(config, load_space(space_file, config), out, log=lambda line: None)
    monkeypatch.setenv("BICT_CACHE_DIR", str(tmp_path / "machine-b"))
    tune_dir = RunDir(out).path / "tune"
    if where == "s3":
        assert summary["best_run_dir"].startswith(out + "/tune/trials/")
        assert not (tmp_path / "out").exists()
    trials = pd.read_csv(tune_dir / "trials.csv")
    assert sorted(trials["lam"]) == [0.0, 1.0]
    assert trials["mean_forward_mAP"].between(0, 1).all() and trials["mean_backward_mAP"].between(0, 1).all()
    assert (tune_dir / "lambda.png").is_file()
    best = json.loads((tune_dir / "best_config.json").read_text())
    assert best["trials"] == 2 and best["selected_on"] == "validation"
    assert best == summary and summary["best_params"]["compat.lam"] in (0.0, 1.0)
    # the trials selected on validation alone: none of them ever extracted, upgraded or evaluated the test gallery
    for trial in trials["trial_id"]:
        if trial == best["best_trial"]:
            continue
        results = json.loads((tune_dir / "trials" / trial / "results.json").read_text())
        assert results["steps"] == [] and len(results["validation"]["steps"]) == 1
        assert not (tune_dir / "trials" / trial / "gallery").exists()
    # the selected one was tested once, after the selection; its validation numbers are the ones it was chosen by
    tested = json.loads((tune_dir / "trials" / best["best_trial"] / "results.json").read_text())
    assert best["test"] == tested["steps"] and len(best["test"]) == 1
    chosen = trials.set_index("trial_id").loc[best["best_trial"], "mean_forward_mAP"]
    assert best["validation"][0]["tests"]["forward"]["mAP"] == pytest.approx(chosen)
    assert best["best_value"] == pytest.approx(max(trials["mean_forward_mAP"]))


def test_a_search_needs_a_validation_set(smoke_config, tmp_path):
    from bict_ray.pipeline.tune import load_space, run_search

    config = load_config("configs/smoke.yaml", ["data.val_fraction=0"])
    with pytest.raises(ConfigError, match="selects on the validation set, and data.val_fraction is 0"):
        run_search(config, load_space("lambda_grid", config), tmp_path / "out", log=lambda line: None)


def test_bad_search_space_is_named(smoke_config, tmp_path):
    from bict_ray.pipeline.tune import load_space

    space_file = tmp_path / "space.yaml"
    space_file.write_text("params:\n  compat.lamda: {grid: [0.0, 1.0]}\n")
    with pytest.raises(ConfigError, match="compat.lamda"):
        load_space(space_file, smoke_config)
    space_file.write_text("params:\n  compat.lam: {grid: [-1.0]}\n")
    with pytest.raises(ConfigError, match="compat.lam must be >= 0"):
        load_space(space_file, smoke_config)
    for shipped in ("lambda_grid", "lambda_loguniform_asha", "lambda_and_loss", "demo_lambda"):
        load_space(f"tune_spaces/{shipped}.yaml", smoke_config)


def test_a_sequence_on_s3_keeps_its_run_directory_in_the_bucket_and_resumes_elsewhere(
        ray_session, smoke_config, smoke_data, smoke_run, bucket, tmp_path, monkeypatch):
    # `--out s3://bucket/run`: every file of the run directory ends up in the bucket (galleries written there by the
    # Ray Data tasks, checkpoints by training), nothing in the working directory; a second machine (another cache)
    # resumes it from the bucket alone, training nothing again; and the report goes to the bucket too
    import boto3

    from bict_ray.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BICT_CACHE_DIR", str(tmp_path / "machine-a"))
    uri = f"s3://{bucket}/run"
    results = run_sequence(smoke_config, uri, dataset=smoke_data, log=lambda line: None)
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="run/", MaxKeys=1000)["Contents"]
    keys = {o["Key"][len("run/"):] for o in listing}
    for key in ("config.yaml", "results.json", "models/phi_1/model.json", "models/phi_2/weights.pt",
                "transforms/psi_1_2/model.json", "gallery/v1/manifest.json", "gallery/v2/manifest.json"):
        assert key in keys, key
    assert any(k.startswith("ray_results/") and k.endswith("checkpoint.pt") for k in keys)
    assert any(k.startswith("splits/") for k in keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["machine-a"]  # no "s3:" folder
    saved = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key="run/results.json")["Body"].read())
    assert saved["steps"] == results["steps"]
    # the same numbers as the same config run on local disk
    assert results["steps"] == smoke_run[1]["steps"]

    monkeypatch.setenv("BICT_CACHE_DIR", str(tmp_path / "machine-b"))
    lines = []
    again = run_sequence(smoke_config, uri, dataset=smoke_data, log=lines.append)
    assert again["steps"] == results["steps"]
    assert not any(line.startswith("[sequence] training") for line in lines), lines
    assert any("trained already" in line for line in lines) and any("committed already" in line for line in lines)

    assert main(["report", uri]) == 0
    body = boto3.client("s3").get_object(Bucket=bucket, Key="run/report.md")["Body"].read().decode()
    assert body.startswith("# BiCT report")

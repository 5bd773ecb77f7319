import pytest
import yaml

from bict_ray.config import Config, ConfigError, load_config, save_config
from bict_ray.storage.rundir import RunDir


def test_presets_load_and_match_their_intent():
    smoke = load_config("configs/smoke.yaml")
    demo = load_config("configs/demo.yaml")
    assert smoke.scenario.steps == 2 and smoke.data.limit_train is not None
    assert demo.scenario.steps == 3 and demo.data.kind == "fashion_mnist" and demo.data.limit_train is None


def test_overrides_are_typed():
    config = load_config(None, ["train.epochs=7", "compat.lam=0.5", "transform.enabled=false",
                                "scenario.classes=[[0, 1], [0, 1, 2]]", "scenario.steps=2", "compat.lam=2",
                                "train.lr=1e-3"])
    assert config.train.lr == 0.001
    assert config.train.epochs == 7
    assert config.compat.lam == 2.0 and isinstance(config.compat.lam, float)
    assert config.transform.enabled is False
    assert config.scenario.classes == [[0, 1], [0, 1, 2]]


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"nonexistent\.key.*valid keys.*compat"):
        load_config(None, ["nonexistent.key=1"])
    with pytest.raises(ConfigError, match=r"train\.epoch\b.*epochs"):
        load_config(None, ["train.epoch=1"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lerning_rate.*valid keys: .*lr"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "train.epochs must be an integer"),
    ("train.epochs=1.5", "train.epochs must be an integer"),
    ("compat.lam=yes", "compat.lam must be a number"),
    ("compat.lam=-1", "compat.lam must be >= 0"),
    ("compat.loss=foo", "compat.loss must be one of"),
    ("data.kind=csv", "data.kind must be one of"),
    ("scenario.steps=1", "scenario.steps must be >= 2"),
    ("scenario.fractions=[0.5, 1.5, 1.0]", r"scenario.fractions\[1\] must be in \(0.0, 1.0\]"),
    ("scenario.fractions=[0.0, 0.5, 1.0]", r"scenario.fractions\[0\] must be in \(0.0, 1.0\]"),
    ("transform.alpha=0", "not both 0"),
    ("data.kind=npz", "data.root is required"),
    ("train", "must look like section.key=value"),
    ("train.single_worker=local", "train.single_worker must be one of task, ray_train, got 'local'"),
    ("gallery.upgrade_precision=float16", "gallery.upgrade_precision must be one of float32, bfloat16, got 'float16'"),
])
def test_bad_values_fail_naming_the_key(override, message):
    overrides = [override]
    if override.startswith("transform.alpha"):
        overrides.append("transform.beta=0")
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_resolved_config_round_trips(tmp_path):
    config = load_config("configs/smoke.yaml", ["compat.loss=ract"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_run_dir_refuses_another_config_and_keeps_its_own(tmp_path):
    RunDir.create(tmp_path / "run", load_config(None, ["train.epochs=3"]))
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train\.epochs: 3 there, 4 now"):
        RunDir.create(tmp_path / "run", load_config(None, ["train.epochs=4"]))
    assert (tmp_path / "run" / "config.yaml").read_text() == before
    # the cluster shape may change between a run and its resumption
    RunDir.create(tmp_path / "run", load_config(None, ["train.epochs=3", "train.num_workers=2"]))
    assert yaml.safe_load(before)["train"]["num_workers"] == 1



def test_a_run_dir_made_before_a_key_existed_resumes_at_its_default_and_only_there(tmp_path):
    run = tmp_path / "run"
    RunDir.create(run, load_config(None))
    older = yaml.safe_load((run / "config.yaml").read_text())
    del older["compat"]["reference"]  # a key this run directory predates
    older["baselines"] = []  # and one the config no longer has
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    RunDir.create(run, load_config(None))
    with pytest.raises(ConfigError, match=r"compat\.reference: None there, 'first' now"):
        RunDir.create(run, load_config(None, ["compat.reference=first"]))

def test_a_choice_registered_by_its_owner_is_valid_in_the_config(monkeypatch):
    """A new compat loss is one registration in core.losses: the config checks against that registry itself."""
    from bict_ray.core import losses

    with pytest.raises(ConfigError, match="compat.loss must be one of bct, l2, contrastive, ract"):
        load_config(None, ["compat.loss=mine"])
    monkeypatch.setitem(losses.COMPAT_LOSSES, "mine", losses.L2Loss)
    assert load_config(None, ["compat.loss=mine"]).compat.loss == "mine"
    assert load_config(None, ["gallery.upgrade_precision=bfloat16"]).gallery.upgrade_precision == "bfloat16"


def test_defaults_are_valid():
    assert Config().model.classifier == "cosine"


def test_the_service_example_loads_as_documented():
    """The example docs/SERVICE.md points users at: a valid config for upgrade-service."""
    from bict_ray.pipeline.service import check_service

    example = load_config("service_example")
    check_service(example)
    assert example.old_model.kind == "torchvision" and example.model.embedding_dim == 2048
    assert example.service.export == "faiss" and example.eval.protocol == "query_gallery"

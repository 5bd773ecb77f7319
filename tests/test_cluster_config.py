"""The Ray cluster launcher configs (cluster.yaml, cluster-local.yaml) and the job command in docs/CLUSTER.md.

Everything here runs offline: Ray's own config preparation and JSON-schema validation (what `ray up` does before it
talks to a cloud), Ray's own `ray start` option parser, `bash -n` on every command, and the project's config loader
on the documented job command. No AWS call is made (boto3 is not even needed).
"""

import copy
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from bict_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("cluster.yaml", "cluster-local.yaml")
SHARED_RUNS = "/mnt/shared/bict-ray"  # the run-directory root that both configs prepare on every node
RAY_PORTS = {6379: "GCS", 8265: "dashboard and job API", 10001: "Ray Client"}
WORLD = {"0.0.0.0/0", "::/0"}
SETUP = "cd ~/bict-ray && bash scripts/setup.sh"


def test_ray_accepts_the_aws_config_with_autoscaling_gpu_workers():
    config = prepared("cluster.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["resources"]["GPU"] >= 1
    assert 0 <= gpu["min_workers"] < gpu["max_workers"] <= config["max_workers"]


def test_ray_accepts_the_onprem_config_with_every_listed_worker():
    raw = load("cluster-local.yaml")
    config = prepared("cluster-local.yaml")
    (node_type,) = config["available_node_types"].values()
    assert raw["provider"]["type"] == "local"
    assert node_type["min_workers"] == node_type["max_workers"] == len(raw["provider"]["worker_ips"])


@pytest.mark.parametrize("name", CONFIGS)
def test_every_ray_start_binds_the_dashboard_to_localhost(name):
    from ray.scripts.scripts import start

    config = prepared(name)
    # Ray's own `ray start` parser: an unknown or misspelt option fails here
    starts = {role: [start.make_context("start", ray_start_args(cmd)).params
                     for cmd in config[f"{role}_start_ray_commands"] if "ray start" in cmd]
              for role in ("head", "worker")}
    assert len(starts["head"]) == len(starts["worker"]) == 1
    for role, commands in starts.items():
        for params in commands:
            assert params["dashboard_host"] == "127.0.0.1", role
            assert params["head"] == (role == "head")
    # without the bootstrap config the head's autoscaler never starts a worker
    assert starts["head"][0]["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    assert not [cmd for cmd in all_commands(config) if "0.0.0.0" in cmd]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_ray_start_sets_the_projects_train_settings(name):
    """A cluster's nodes give Ray Train the settings a local run gets (bict_ray.distributed.cluster), so a fit does
    not idle after its last epoch on a cluster only."""
    from bict_ray.distributed.cluster import TRAIN_ENV_DEFAULTS

    config = prepared(name)
    for role in ("head", "worker"):
        (command,) = [cmd for cmd in config[f"{role}_start_ray_commands"] if "ray start" in cmd]
        words = shlex.split(command.replace(";", " ; ").split("ray start", 1)[0])
        assert {f"{key}={value}" for key, value in TRAIN_ENV_DEFAULTS.items()} <= set(words), (role, command)


def test_security_group_opens_no_ray_port_to_the_world():
    config = prepared("cluster.yaml")
    for node_type in config["available_node_types"].values():
        # a group of one's own would bypass the launcher's SSH-only default group
        assert "SecurityGroupIds" not in node_type["node_config"]
    extra_rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert world_open_ray_ports(extra_rules) == set()


@pytest.mark.parametrize("rule, expected", [
    ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, {8265}),
    ({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, {6379, 8265, 10001}),
    ({"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 7000, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}, {6379}),
    ({"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}, set()),
    ({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, set()),
])
def test_world_open_port_check_catches_what_it_must(rule, expected):
    assert world_open_ray_ports([rule]) == expected


@pytest.mark.parametrize("name", CONFIGS)
def test_token_authentication_on_every_node(name):
    config = prepared(name)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in cmd for cmd in config["initialization_commands"])


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_installs_this_project_on_every_node(name):
    config = prepared(name)
    assert config["file_mounts"]["~/bict-ray"] == "."
    for role in ("head", "worker"):
        assert SETUP in config[f"{role}_setup_commands"]
    assert (REPO / "scripts" / "setup.sh").is_file()
    # the venv that setup.sh makes on the node must not be overwritten by the client's own
    assert ".gitignore" in config["rsync_filter"] and ".venv/" in (REPO / ".gitignore").read_text().split()
    assert any('export PATH="$HOME/bict-ray/.venv/bin:$PATH"' in cmd for cmd in config["initialization_commands"])


@pytest.mark.parametrize("name, prepares", [
    ("cluster.yaml", "sudo mount -t nfs4"),  # EFS, mounted by the setup itself
    ("cluster-local.yaml", "exit 1"),  # an admin's NFS mount, or the node refuses to start
])
def test_every_node_prepares_the_shared_run_storage(name, prepares):
    config = prepared(name)
    for role in ("head", "worker"):
        storage = [cmd for cmd in config[f"{role}_setup_commands"] if SHARED_RUNS in cmd]
        assert len(storage) == 1 and prepares in storage[0]
        commands = config[f"{role}_setup_commands"]
        assert commands.index(storage[0]) < commands.index(SETUP)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_command_is_valid_bash(name):
    for cmd in all_commands(prepared(name)):
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, f"{name}: {cmd!r}: {result.stderr}"


def test_documented_job_command_is_a_valid_cluster_run():
    argv = documented_job_command()
    dash = argv.index("--")
    client, entrypoint = argv[:dash], argv[dash + 1:]
    assert client[:3] == ["ray", "job", "submit"]
    assert option(client, "--address") == "http://127.0.0.1:8265"  # through the SSH tunnel, never a public address
    assert option(client, "--working-dir") == "."
    assert entrypoint[:3] == ["python", "-m", "jobs.sequence"]
    overrides = [entrypoint[i + 1] for i, arg in enumerate(entrypoint) if arg == "--set"]
    config = load_config(REPO / option(entrypoint, "--config"), overrides)  # unknown keys or bad values fail here
    assert config.train.use_gpu and config.gallery.use_gpu
    aws = prepared("cluster.yaml")
    assert 1 < config.train.num_workers <= aws["max_workers"]
    # the run directory on storage every node reaches: the bucket (the default shown), or the shared mount
    out = option(entrypoint, "--out")
    assert out.startswith("s3://") or out.startswith(SHARED_RUNS + "/"), out


def test_docs_cover_connecting_watching_and_onprem():
    text = (REPO / "docs" / "CLUSTER.md").read_text()
    for needed in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ssh -L 8265:localhost:8265",
                   "export RAY_AUTH_MODE=token", "ray get-auth-token --generate", "ray job logs -f",
                   "ray up cluster-local.yaml", "--out", "YOUR_EFS_ID"):
        assert needed in text, needed
    assert "YOUR_EFS_ID.efs." in " ".join(all_commands(prepared("cluster.yaml")))


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def prepared(name: str) -> dict:
    """The config as `ray up` sees it before contacting a provider: defaults filled in, schema-validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load(name)))
    validate_config(config)
    return config


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config[key]]


def ray_start_args(command: str) -> list[str]:
    """The arguments after `ray start` in a shell command such as `ulimit -n 65536; ray start --head ...`."""
    return shlex.split(command.split("ray start", 1)[1])


def world_open_ray_ports(rules: list[dict]) -> set[int]:
    """Ray's ports that EC2 inbound rules (IpPermissions) open to every address, IPv4 or IPv6."""
    opened = set()
    for rule in rules:
        sources = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        sources |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        if not sources & WORLD:
            continue
        if str(rule.get("IpProtocol")) == "-1":  # all protocols, all ports
            opened |= set(RAY_PORTS)
            continue
        opened |= {port for port in RAY_PORTS if rule.get("FromPort", 0) <= port <= rule.get("ToPort", 65535)}
    return opened


def documented_job_command() -> list[str]:
    """The first `ray job submit ... jobs.sequence` command in docs/CLUSTER.md, continuation lines joined."""
    text = (REPO / "docs" / "CLUSTER.md").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip().startswith("ray job submit") and "jobs.sequence" in line:
            return shlex.split(line)
    raise AssertionError("docs/CLUSTER.md has no `ray job submit ... jobs.sequence` command")


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {shlex.join(argv)}"
    return argv[argv.index(name) + 1]

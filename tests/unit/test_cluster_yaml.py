"""Offline checks for the Ray cluster launcher config (``cluster.yaml``).

The config is validated with Ray's own cluster-config schema, exactly as
``ray up`` does it: ``prepare_config`` (merge with the provider defaults) and
then ``validate_config`` (``ray/autoscaler/ray-schema.json`` via jsonschema
plus Ray's extra consistency checks). No cloud access, no Ray cluster.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"

# Ray ports that must never be reachable from the internet:
# GCS, dashboard / Jobs API, Ray Client, Serve HTTP.
SENSITIVE_PORTS = (6379, 8265, 10001, 8000)
SSH_PORT = 22


@pytest.fixture(scope="module")
def raw_config() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        config = yaml.safe_load(f)
    assert isinstance(config, dict)
    return config


@pytest.fixture
def config(raw_config: dict[str, Any]) -> dict[str, Any]:
    """A fresh deep copy per test, so tests may mutate it."""
    return copy.deepcopy(raw_config)


def _validate_like_ray_up(config: dict[str, Any]) -> dict[str, Any]:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _worker_type(config: dict[str, Any]) -> dict[str, Any]:
    head = config["head_node_type"]
    workers = [v for k, v in config["available_node_types"].items() if k != head]
    assert len(workers) == 1, "expected exactly one worker node type"
    return workers[0]


def _ports(rule: dict[str, Any]) -> range:
    """Ports covered by an EC2 IpPermission (protocol -1 means everything)."""
    if str(rule.get("IpProtocol")) == "-1" or rule.get("FromPort", -1) == -1:
        return range(0, 65536)
    return range(int(rule["FromPort"]), int(rule["ToPort"]) + 1)


def _is_internet(cidr: str) -> bool:
    return ipaddress.ip_network(cidr, strict=False).prefixlen == 0


def _cidrs(rule: dict[str, Any]) -> list[str]:
    return [r["CidrIp"] for r in rule.get("IpRanges", [])] + [
        r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])
    ]


# --------------------------------------------------------------------------
# Schema validation with Ray's own validator
# --------------------------------------------------------------------------


def test_cluster_yaml_validates_with_ray_schema(config: dict[str, Any]) -> None:
    prepared = _validate_like_ray_up(config)
    # prepare_config must not have replaced our node types with the defaults.
    assert set(prepared["available_node_types"]) == set(config["available_node_types"])
    assert prepared["head_node_type"] == config["head_node_type"]


def test_raw_file_matches_ray_schema_json(config: dict[str, Any]) -> None:
    # The file as written (before defaults are merged) is already valid.
    validate_config(config)


def _add_unknown_top_level_key(c: dict[str, Any]) -> None:
    c["max_wrokers"] = 4


def _max_workers_wrong_type(c: dict[str, Any]) -> None:
    c["max_workers"] = "four"


def _negative_max_workers(c: dict[str, Any]) -> None:
    c["max_workers"] = -1


def _worker_without_resources(c: dict[str, Any]) -> None:
    _worker_type(c).pop("resources")


def _fractional_gpu_resource(c: dict[str, Any]) -> None:
    _worker_type(c)["resources"]["GPU"] = 0.5


def _unknown_docker_key(c: dict[str, Any]) -> None:
    c["docker"]["imagee"] = c["docker"]["image"]


def _bad_security_group_key(c: dict[str, Any]) -> None:
    c["provider"]["security_group"]["Ingress"] = []


@pytest.mark.parametrize(
    "breakage",
    [
        _add_unknown_top_level_key,
        _max_workers_wrong_type,
        _negative_max_workers,
        _worker_without_resources,
        _fractional_gpu_resource,
        _unknown_docker_key,
        _bad_security_group_key,
    ],
)
def test_broken_copies_fail_schema_validation(config: dict[str, Any], breakage: Any) -> None:
    breakage(config)
    with pytest.raises(jsonschema.ValidationError):
        _validate_like_ray_up(config)


def test_unknown_head_node_type_fails_validation(config: dict[str, Any]) -> None:
    config["head_node_type"] = "no.such.type"
    with pytest.raises(ValueError, match="head_node_type"):
        _validate_like_ray_up(config)


def test_min_workers_above_global_max_fails_validation(
    config: dict[str, Any],
) -> None:
    _worker_type(config)["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        _validate_like_ray_up(config)


# --------------------------------------------------------------------------
# Cluster shape
# --------------------------------------------------------------------------


def test_provider_is_aws_us_west_2(config: dict[str, Any]) -> None:
    assert config["cluster_name"] == "tinyqa"
    provider = config["provider"]
    assert provider["type"] == "aws"
    assert provider["region"] == "us-west-2"
    zones = provider["availability_zone"].split(",")
    assert len(zones) >= 2
    assert all(z.strip().startswith("us-west-2") for z in zones)


def test_head_is_cpu_only(config: dict[str, Any]) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    assert head["resources"]["CPU"] > 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))


def test_gpu_worker_autoscales_from_zero(config: dict[str, Any]) -> None:
    worker = _worker_type(config)
    assert worker["min_workers"] == 0
    assert worker["max_workers"] == 4
    assert worker["resources"]["GPU"] >= 1
    assert worker["node_config"]["InstanceType"] == "g5.xlarge"
    assert config["max_workers"] >= worker["max_workers"]
    assert config["idle_timeout_minutes"] > 0


# --------------------------------------------------------------------------
# Docker image
# --------------------------------------------------------------------------


def test_docker_image_pins_installed_ray_version(config: dict[str, Any]) -> None:
    docker = config["docker"]
    images = [docker["image"]] + [docker[k] for k in ("head_image", "worker_image") if k in docker]
    for image in images:
        repo, _, tag = image.partition(":")
        assert repo == "rayproject/ray", image
        assert tag.split("-")[0] == ray.__version__, (image, ray.__version__)
        assert "gpu" in tag.split("-"), image
    assert docker["container_name"]
    assert docker["pull_before_run"] is True


# --------------------------------------------------------------------------
# Network security
# --------------------------------------------------------------------------


def test_security_group_only_opens_ssh(config: dict[str, Any]) -> None:
    sg = config["provider"]["security_group"]
    assert sg["GroupName"]
    rules = sg["IpPermissions"]
    assert rules, "expected an explicit SSH rule"
    for rule in rules:
        assert rule["IpProtocol"] == "tcp"
        assert rule["FromPort"] == SSH_PORT and rule["ToPort"] == SSH_PORT
        assert not rule.get("UserIdGroupPairs")
        assert not rule.get("PrefixListIds")


def test_no_sensitive_port_open_to_internet(config: dict[str, Any]) -> None:
    for rule in config["provider"]["security_group"]["IpPermissions"]:
        covered = _ports(rule)
        for port in SENSITIVE_PORTS:
            assert port not in covered, (port, rule)
        for cidr in _cidrs(rule):
            assert not _is_internet(cidr), (cidr, rule)


def test_ray_default_security_group_rules_keep_ray_ports_private(
    config: dict[str, Any],
) -> None:
    """Ray merges its own default rules with ours when it creates the group;
    check the effective rule set, not just our extension."""
    pytest.importorskip("boto3")
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    rules = _create_default_inbound_rules(
        {"sg-tinyqa"}, config["provider"]["security_group"]["IpPermissions"]
    )
    for rule in rules:
        internet = any(_is_internet(c) for c in _cidrs(rule))
        if internet:
            assert list(_ports(rule)) == [SSH_PORT], rule
        elif not _cidrs(rule):
            # Intra-cluster rule: sources are security groups only.
            assert rule["UserIdGroupPairs"] == [{"GroupId": "sg-tinyqa"}]


def test_dashboard_binds_to_localhost(config: dict[str, Any]) -> None:
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in start
    assert "--ray-client-server-port" not in start


# --------------------------------------------------------------------------
# Start commands and token authentication
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_start_commands_restart_ray_with_token_auth(config: dict[str, Any], key: str) -> None:
    from ray._private.authentication.authentication_token_setup import (
        AUTH_MODE_ENV_VAR,
    )

    commands = config[key]
    assert commands[0].strip() == "ray stop"
    start = commands[-1]
    assert "ray start" in start
    assert "--object-manager-port=8076" in start
    # The env vars must be exported before `ray start` in the same command.
    env_part = start.split("ray start")[0]
    assert re.search(rf"\bexport\b[^;]*\b{AUTH_MODE_ENV_VAR}=token\b", env_part)
    assert re.search(r"\bRAY_AUTH_TOKEN_PATH=/\S+", env_part)
    if key == "head_start_ray_commands":
        assert "--head" in start
        assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    else:
        assert "--address=$RAY_HEAD_IP:6379" in start


def test_token_and_api_key_come_from_mounted_files(config: dict[str, Any]) -> None:
    text = CLUSTER_YAML.read_text()
    # No literal token / key values anywhere in the file.
    assert not re.search(r"RAY_AUTH_TOKEN=", text)
    assignments = re.findall(r"TINYQA_API_KEY=(.{0,7})", text)
    assert assignments
    for assignment in assignments:
        assert assignment == '"$(cat ', assignment

    token_paths = set(re.findall(r"RAY_AUTH_TOKEN_PATH=(/\S+?);?(?:\s|'|$)", text))
    assert len(token_paths) == 1, token_paths
    token_path = token_paths.pop()
    mounted = [remote for remote in config["file_mounts"] if remote != "/home/ray/tinyqa"]
    assert any(token_path.startswith(remote.rstrip("/") + "/") for remote in mounted)
    api_key_files = re.findall(r'TINYQA_API_KEY="\$\(cat (/\S+)\)"', text)
    assert api_key_files
    for path in api_key_files:
        assert any(path.startswith(remote.rstrip("/") + "/") for remote in mounted)


# --------------------------------------------------------------------------
# Project install and shared storage
# --------------------------------------------------------------------------


def test_project_is_mounted_and_installed(config: dict[str, Any]) -> None:
    assert config["file_mounts"]["/home/ray/tinyqa"] == "."
    assert "pip install -e /home/ray/tinyqa" in config["setup_commands"]


def test_efs_storage_mounted_on_every_node(config: dict[str, Any]) -> None:
    init = " ".join(config["initialization_commands"])
    assert re.search(r"mount -t (nfs4|efs)\b", init)
    assert "fs-XXXXXXXX" in init  # placeholder the user must replace
    assert "/mnt/tinyqa" in init
    assert "-v /mnt/tinyqa:/mnt/tinyqa" in config["docker"]["run_options"]
    assert "storage_path: /mnt/tinyqa" in CLUSTER_YAML.read_text()


# --------------------------------------------------------------------------
# Instance credentials: own scoped profiles, IMDSv2 only
# --------------------------------------------------------------------------

IAM_DIR = CLUSTER_YAML.parent / "docs" / "iam"
PROFILE_ARN = re.compile(r"^arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+$")


def _node_configs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: spec["node_config"] for name, spec in config["available_node_types"].items()}


def _policy(name: str) -> list[dict[str, Any]]:
    import json

    statements = json.loads((IAM_DIR / f"{name}-policy.json").read_text())["Statement"]
    return [
        {**s, "Action": [s["Action"]] if isinstance(s["Action"], str) else s["Action"]}
        for s in statements
    ]


@pytest.mark.parametrize("node", ["head", "worker"])
def test_every_node_type_requires_imdsv2_and_has_its_own_profile(
    config: dict[str, Any], node: str
) -> None:
    import boto3
    from botocore.validate import ParamValidator

    name = (
        config["head_node_type"]
        if node == "head"
        else next(k for k in config["available_node_types"] if k != config["head_node_type"])
    )
    node_config = _node_configs(config)[name]
    assert node_config["MetadataOptions"]["HttpTokens"] == "required"
    assert node_config["MetadataOptions"].get("HttpEndpoint", "enabled") == "enabled"
    # Ray runs in Docker on the instance: one more network hop to the metadata service.
    assert node_config["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    arn = node_config["IamInstanceProfile"]["Arn"]
    assert PROFILE_ARN.match(arn), arn
    assert arn.endswith(f"/tinyqa-ray-{node}")
    # The node config goes to EC2 RunInstances as is: botocore's own model must accept it.
    shape = boto3.session.Session(region_name="us-west-2").client("ec2").meta.service_model
    report = ParamValidator().validate(
        {**node_config, "MinCount": 1, "MaxCount": 1},
        shape.operation_model("RunInstances").input_shape,
    )
    assert not report.has_errors(), report.generate_report()


def test_ray_up_keeps_our_head_profile_instead_of_its_full_access_role(
    config: dict[str, Any],
) -> None:
    """With a profile in the head's node_config, Ray's AWS bootstrap returns before it would
    create (or attach) ray-autoscaler-v1 with EC2 and S3 full access; no AWS call is made."""
    from ray.autoscaler._private.aws import config as aws_config

    prepared = _validate_like_ray_up(config)
    before = copy.deepcopy(prepared)
    aws_config._configure_iam_role(prepared)
    assert prepared == before
    assert aws_config._log_info["head_instance_profile_src"] == "config"


def test_instance_profile_policies_are_scoped() -> None:
    head, worker = _policy("head"), _policy("worker")
    for statements in (head, worker):
        for s in statements:
            assert s["Effect"] == "Allow"
            for action in s["Action"]:
                service, verb = action.split(":")
                assert "*" not in verb, f"wildcard action {action}"
            resources = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
            writes = [a for a in s["Action"] if not a.split(":")[1].startswith("Describe")]
            if writes and "*" in resources:
                raise AssertionError(f"{s['Sid']}: {writes} on every resource")
    # Workers only touch the storage prefix.
    assert {a.split(":")[0] for s in worker for a in s["Action"]} == {"s3"}
    for s in worker:
        resources = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
        assert all(r.startswith("arn:aws:s3:::REPLACE-tinyqa-bucket") for r in resources)
    # The head may terminate / stop only this cluster's instances, and pass only the worker role.
    by_action: dict[str, list[dict[str, Any]]] = {}
    for s in head:
        for action in s["Action"]:
            by_action.setdefault(action, []).append(s)
    for action in ("ec2:TerminateInstances", "ec2:StopInstances"):
        for s in by_action[action]:
            assert s["Condition"]["StringEquals"]["aws:ResourceTag/ray-cluster-name"] == "tinyqa"
    (pass_role,) = by_action["iam:PassRole"]
    assert pass_role["Resource"].endswith(":role/tinyqa-ray-worker")
    # Launches must carry the cluster tag (on the instance resource).
    instance_launch = [
        s for s in by_action["ec2:RunInstances"] if any(":instance/" in r for r in s["Resource"])
    ]
    assert instance_launch and all(
        s["Condition"]["StringEquals"]["aws:RequestTag/ray-cluster-name"] == "tinyqa"
        for s in instance_launch
    )

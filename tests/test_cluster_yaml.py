"""cluster.yaml is valid against Ray's own cluster-launcher schema (no AWS call) and says what the docs promise."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_validates_against_ray_schema(raw):
    prepared = _validate(raw)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head", "cpu_worker", "gpu_train", "gpu_serve"}


def test_node_types_head_cpu_gpu_and_autoscaling_bounds(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # keeps work off the head
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
    assert sum(spec["min_workers"] for spec in workers.values()) <= raw["max_workers"]
    assert types["gpu_train"]["node_config"]["InstanceType"].startswith(("g5.12", "g5.48", "p4d", "p5"))
    assert types["gpu_serve"]["node_config"]["InstanceType"] == "g5.xlarge"
    assert types["cpu_worker"]["node_config"]["InstanceType"].startswith(("m5", "m6", "c5", "c6"))
    for spec in types.values():  # S3 access comes from an instance profile, never from keys
        assert "IamInstanceProfile" in spec["node_config"]


def test_project_is_installed_from_the_mounted_repo_with_token_auth(raw):
    assert raw["file_mounts"]["~/fabdistill"] == "."
    assert any("pip install" in c and "-e ~/fabdistill" in c for c in raw["setup_commands"])
    assert "RAY_AUTH_MODE=token" in " ".join(raw["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in " ".join(raw["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])
    text = (REPO / "cluster.yaml").read_text()
    assert "storage_path=s3://" in text and "AWS_SECRET_ACCESS_KEY" not in text


def test_schema_check_catches_a_broken_config(raw):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_serve"]["resources"] = {"GPU": "one"}  # must be an integer
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))
    too_many = copy.deepcopy(raw)
    too_many["available_node_types"]["cpu_worker"]["min_workers"] = raw["max_workers"] + 1
    with pytest.raises(ValueError):
        validate_config(prepare_config(too_many))

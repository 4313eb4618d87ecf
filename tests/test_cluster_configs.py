"""Cluster configs cannot be applied here (no cloud, no Kubernetes, no Docker engine): check that they parse, carry
the fields their tools require, ask for consistent resources, and name the versions pyproject.toml pins."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RAY_VERSION = re.search(r"ray\[[^\]]*\]==([\d.]+)", " ".join(PROJECT["dependencies"])).group(1)
IMAGE = f"genfarm:{PROJECT['version']}-gpu"


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # engines never land on the head
    assert [c["image"] for c in containers(head["template"])] == [IMAGE]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in containers(group["template"]):
            assert container["image"] == IMAGE
            res = container["resources"]
            gpus = group["rayStartParams"]["num-gpus"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == gpus


def test_raycluster_manifest():
    doc = load("kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    check_cluster_spec(doc["spec"])


def test_rayjob_manifest_runs_a_genfarm_job():
    doc = load("kuberay/rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert doc["spec"]["entrypoint"].startswith("genfarm run /etc/genfarm/job.yaml")
    check_cluster_spec(doc["spec"]["rayClusterSpec"])
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounted = {m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    assert "/etc/genfarm" in mounted and head["volumes"][0]["configMap"]["name"] == "genfarm-job"


def test_launcher_config():
    doc = load("launcher/aws-gpu.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in doc
    assert doc["docker"]["image"] == IMAGE
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types and types[doc["head_node_type"]]["resources"]["CPU"] == 0
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] <= gpu["max_workers"] <= doc["max_workers"]


def test_dockerfile_uses_the_pinned_ray():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in text and "[gpu]" in text


@pytest.mark.parametrize("script", ["local-cluster.sh"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "cluster" / script)]).returncode == 0


def test_rayservice_runs_the_genfarm_serve_app():
    from genfarm.serve.config import ServeSpec
    from genfarm.serve.deploy import IMPORT_PATH, SERVE_ENV, SERVER, app_config

    doc = load("kuberay/rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    spec = doc["spec"]
    check_cluster_spec(spec["rayClusterConfig"])
    serve = yaml.safe_load(spec["serveConfigV2"])
    [app] = serve["applications"]
    assert app["import_path"] == IMPORT_PATH and app["route_prefix"] == "/"
    config = ServeSpec.model_validate(app["args"])  # the args are a valid serve config
    assert config.engine.device == "gpu"
    assert serve["http_options"]["host"] == "0.0.0.0"  # reachable from the Kubernetes service, not loopback only
    # the same shape genfarm serve deploys, so `genfarm serve status/scale` work on it
    assert set(app) >= set(app_config(config)) - {"runtime_env"}
    [server] = app["deployments"]
    assert server["name"] == SERVER
    scaling = server["autoscaling_config"]
    gpus = sum(int(g["maxReplicas"]) * int(g["rayStartParams"]["num-gpus"])
               for g in spec["rayClusterConfig"]["workerGroupSpecs"])
    assert scaling["min_replicas"] <= scaling["max_replicas"] <= gpus  # one GPU per replica at full scale
    workers = spec["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert any(e["name"] == "GENFARM_API_KEYS" for e in workers["env"])
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for container in (head, workers):  # the mode `genfarm serve` uses locally, on every Serve process
        for name, value in SERVE_ENV.items():
            assert {"name": name, "value": value} in container["env"]

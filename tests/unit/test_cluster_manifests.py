"""The cluster manifests, checked without a cluster (fast, CPU only).

Ray 2.60's ServeDeploySchema accepts unknown keys and ignores them (old names
such as `max_concurrent_queries` or `target_num_ongoing_requests_per_replica`
would silently do nothing), so besides validating with Ray's own schema every
key is checked against the schema's fields. The RayService's embedded
serveConfigV2 gets the same checks and must carry the same application as
serve_config.cluster.yaml. Packaging: `pip wheel .` must hold the whole app
and must not pull mmcv/torch (which would rebuild mmcv).
"""
from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import pytest
import yaml
from package_fixtures import build_project_wheel
from ray.serve.config import AutoscalingConfig, BackpressureConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

from deployments.dispatch import IMAGES_PER_BUSY_GROUP, MAX_IMAGES_PER_CALL
from serve_app import AppArgs

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_CONFIG = ROOT / "serve_config.cluster.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DEPLOYMENT_NAMES = {"LabelStudioIngress", "ImageLoader", "Detector", "Postprocess", "JobRunner"}


def _fields(model) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
    return names


def _unknown(data: dict, model, where: str) -> list[str]:
    return [f"{where}.{key}" for key in data if key not in _fields(model)]


def strict_validate(config: dict) -> ServeDeploySchema:
    """Ray's schema, plus: no key that Ray would silently ignore."""
    schema = ServeDeploySchema.model_validate(config)
    unknown = _unknown(config, ServeDeploySchema, "")
    unknown += _unknown(config.get("http_options") or {}, HTTPOptionsSchema, "http_options")
    for app in config["applications"]:
        where = f"applications[{app['name']}]"
        unknown += _unknown(app, ServeApplicationSchema, where)
        unknown += _unknown(app.get("args") or {}, AppArgs, f"{where}.args")
        AppArgs(**(app.get("args") or {}))
        for dep in app.get("deployments") or []:
            dwhere = f"{where}.deployments[{dep['name']}]"
            assert dep["name"] in DEPLOYMENT_NAMES, f"{dwhere}: no such deployment in the graph"
            unknown += _unknown(dep, DeploymentSchema, dwhere)
            unknown += _unknown(dep.get("ray_actor_options") or {}, RayActorOptionsSchema, f"{dwhere}.ray_actor_options")
            if dep.get("autoscaling_config"):
                unknown += _unknown(dep["autoscaling_config"], AutoscalingConfig, f"{dwhere}.autoscaling_config")
                AutoscalingConfig(**dep["autoscaling_config"])  # the dict form is not validated by the schema
            if dep.get("backpressure_config"):
                BackpressureConfig(**dep["backpressure_config"])
    assert not unknown, f"keys Ray 2.60 would silently ignore: {unknown}"
    return schema


def by_name(config: dict) -> dict[str, dict]:
    (app,) = config["applications"]
    return {d["name"]: d for d in app["deployments"]}


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_CONFIG.read_text())


@pytest.fixture(scope="module")
def rayservice() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    return {d["kind"]: d for d in docs}


def ray_version() -> str:
    text = (ROOT / "requirements.txt").read_text()
    return re.search(r"^ray\[serve\]==([0-9.]+)", text, re.M).group(1)


# ------------------------------------------------------------ the schema check itself
def test_strict_validation_catches_keys_ray_silently_ignores():
    old = {"applications": [{"name": "a", "import_path": "serve_app:build_app", "deployments": [
        {"name": "Detector", "max_concurrent_queries": 8,
         "autoscaling_config": {"target_num_ongoing_requests_per_replica": 4, "max_replicas": 2}}]}]}
    ServeDeploySchema.model_validate(old)  # Ray itself accepts this...
    with pytest.raises(AssertionError, match="max_concurrent_queries"):
        strict_validate(old)  # ...we do not.
    with pytest.raises(Exception, match="status_code"):
        BackpressureConfig(status_code=500)


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml", "serve_config.cluster.yaml"])
def test_serve_configs_validate_strictly(name):
    strict_validate(yaml.safe_load((ROOT / name).read_text()))


# ------------------------------------------------------------ serve_config.cluster.yaml
def test_cluster_config_declares_gpu_autoscaling_and_backpressure(cluster_config):
    deps = by_name(cluster_config)
    assert set(deps) == DEPLOYMENT_NAMES
    assert cluster_config["proxy_location"] == "HeadOnly"
    args = cluster_config["applications"][0]["args"]
    assert args.get("device", "auto") in ("auto", "cuda"), "the Detector runs on the GPU it reserves"

    detector = deps["Detector"]
    gpus = detector["ray_actor_options"]["num_gpus"]
    assert 0 < gpus <= 1 and float(1 / gpus).is_integer(), "whole GPUs, or a fraction that packs evenly"
    batch = detector["user_config"]["max_batch_size"]
    scaling = detector["autoscaling_config"]
    # The numbers the YAML comments derive from the batch size B, in calls of
    # IMAGES_PER_BUSY_GROUP images on average (deployments/dispatch.py).
    per_call = IMAGES_PER_BUSY_GROUP
    assert detector["max_ongoing_requests"] * per_call == 2 * batch
    assert detector["max_ongoing_requests"] * MAX_IMAGES_PER_CALL >= batch
    assert scaling["target_ongoing_requests"] * per_call == batch
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
    assert args["max_inflight_images"] >= scaling["max_replicas"] * detector["max_ongoing_requests"] * per_call
    assert detector["max_surge_percent"] > 0, "a model rollout must start new replicas before old ones stop"

    loader = deps["ImageLoader"]
    assert loader["max_replicas_per_node"] >= 1
    assert loader["autoscaling_config"]["target_ongoing_requests"] * per_call == 2 * batch
    assert loader["max_ongoing_requests"] >= loader["autoscaling_config"]["target_ongoing_requests"]
    assert loader["autoscaling_config"]["min_replicas"] >= 2, "loaders on more than one node"

    for name, dep in deps.items():
        if "autoscaling_config" in dep:
            a = dep["autoscaling_config"]
            assert "num_replicas" not in dep, name
            assert a["min_replicas"] <= a["max_replicas"], name
            assert 0 < a["upscale_delay_s"] <= a["downscale_delay_s"], name
            assert a["target_ongoing_requests"] <= dep["max_ongoing_requests"], name

    ingress = deps["LabelStudioIngress"]
    assert ingress["max_queued_requests"] > 0
    assert ingress["backpressure_config"]["status_code"] in (503, 429)
    assert ingress["backpressure_config"]["retry_after_s"] > 0


def test_cluster_config_comments_explain_each_choice():
    lines = CLUSTER_CONFIG.read_text().splitlines()
    for key in ("num_gpus", "target_ongoing_requests", "min_replicas", "max_replicas", "upscale_delay_s",
                "downscale_delay_s", "max_ongoing_requests", "max_queued_requests", "max_replicas_per_node",
                "proxy_location", "retry_after_s", "max_surge_percent"):
        found = [i for i, line in enumerate(lines) if re.search(rf"\b{key}:", line.split("#")[0])]
        assert found, key
        # A comment on the line itself or right above it, at least once per key.
        assert any("#" in lines[i] or lines[i - 1].strip().startswith("#") for i in found), \
            f"{key}: no comment explains it"


# ------------------------------------------------------------ RayService
def test_rayservice_embeds_a_valid_serve_config_equal_to_the_cluster_config(rayservice, cluster_config):
    assert set(rayservice) == {"RayService", "PersistentVolumeClaim"}
    service = rayservice["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    strict_validate(serve_config)
    assert serve_config["applications"] == cluster_config["applications"]
    assert serve_config["proxy_location"] == "EveryNode"  # KubeRay's serve Service balances over ready proxies
    assert serve_config["http_options"]["port"] == 8000


def _containers(spec: dict) -> list[dict]:
    return spec["template"]["spec"]["containers"]


def test_rayservice_cluster_cpu_head_and_autoscaled_gpu_workers(rayservice, cluster_config):
    cluster = rayservice["RayService"]["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray_version()
    import ray

    assert ray.__version__ == ray_version()
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (head_container,) = _containers(head)
    assert "nvidia.com/gpu" not in str(head_container["resources"])
    serve_port = [p for p in head_container["ports"] if p["name"] == "serve"]
    assert serve_port and serve_port[0]["containerPort"] == 8000

    (gpu,) = cluster["workerGroupSpecs"]
    (worker,) = _containers(gpu)
    gpus_per_pod = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus_per_pod >= 1
    detector = by_name(cluster_config)["Detector"]
    per_replica = detector["ray_actor_options"]["num_gpus"]
    scaling = detector["autoscaling_config"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["minReplicas"] * gpus_per_pod >= math.ceil(scaling["min_replicas"] * per_replica)
    # Room for max_replicas plus the surge replicas a model rollout starts before old ones stop.
    surge = math.ceil(detector["max_surge_percent"] * scaling["max_replicas"] / 100)
    assert gpu["maxReplicas"] * gpus_per_pod >= math.ceil((scaling["max_replicas"] + surge) * per_replica)
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] >= scaling["downscale_delay_s"]


def test_rayservice_ships_project_and_checkpoint_to_every_node(rayservice, cluster_config):
    spec = rayservice["RayService"]["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    pods = [g["template"]["spec"] for g in groups]
    images = {c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])}
    assert len(images) == 1, f"one image (the project installed with pip) everywhere: {images}"

    pvc = rayservice["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    # The model is named once, in the pods' environment: the app's args leave it unset.
    assert "checkpoint_file" not in (cluster_config["applications"][0].get("args") or {})
    checkpoints = set()
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"] + pod.get("initContainers", []):
            env = {e["name"]: e.get("value") for e in container["env"]}
            checkpoints.add(env["CHECKPOINT_FILE"])
            cache = env["MODEL_DIR"]
            mounts = [m for m in container["volumeMounts"] if cache.startswith(m["mountPath"])]
            assert mounts, f"{container['name']}: checkpoint cache not on a mounted volume"
            claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim == pvc["metadata"]["name"]
    assert len(checkpoints) == 1, "every pod, the init container included, names the same checkpoint"
    (init,) = spec["workerGroupSpecs"][0]["template"]["spec"]["initContainers"]
    assert 'os.environ["CHECKPOINT_FILE"]' in init["command"][-1], "the init container fetches what the app loads"
    assert "resolve_checkpoint_file" in init["command"][-1], "same cache path as the Detector computes"


def test_dockerfile_uses_the_pinned_ray_and_installs_the_package():
    text = DOCKERFILE.read_text()
    assert f"rayproject/ray:{ray_version()}-" in text
    assert "scripts/install.sh" in text and re.search(r"pip install --no-deps \.", text)
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text()
    for needed in ("pyproject.toml", "serve_app.py", "deployments/", "mmdet_ls/", "scripts/install.sh",
                   "requirements.txt"):
        assert f"!{needed}" in ignore, needed


# ------------------------------------------------------------ packaging
@pytest.mark.timeout(300)
def test_pip_wheel_holds_the_whole_app_and_never_pulls_mmcv(tmp_path):
    wheel = build_project_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    expected = {"serve_app.py"} | {
        str(p.relative_to(ROOT)) for package in ("deployments", "mmdet_ls") for p in (ROOT / package).glob("*.py")
    }
    assert expected <= names, expected - names
    requires = [line.split(":", 1)[1].strip().lower() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if re.match(r"(mmcv|torch|mmdet|mmengine)\b", r)], requires

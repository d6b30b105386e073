"""Start and stop Ray Serve for tests without touching other Ray clusters."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


def wait_ready(url: str, timeout_s: float = 180) -> dict:
    def ready():
        body = requests.get(f"{url}/health", timeout=2).json()
        return body if body.get("ready") else None

    return wait_until(ready, timeout_s, what=f"{url}/health ready")


def start_serve(app, num_cpus: int = 4):
    """ray.init(address='local') + serve on a free port; returns the base URL."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="mmdet-backend", route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}"


def stop_serve():
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_config_for_test(port: int, args: dict, path=None) -> dict:
    """The shipped serve_config.yaml with test args and a test port."""
    from pathlib import Path

    import yaml

    path = path or Path(__file__).resolve().parent.parent / "serve_config.yaml"
    config = yaml.safe_load(Path(path).read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"].update(args)
    return config


def deploy_config(config: dict, timeout_s: float = 300, app_name: str | None = None) -> None:
    """Deploy a serve config the way `serve deploy` does (declaratively), so
    later config changes are applied in place: a changed user_config only
    calls reconfigure() on the running replicas. Waits for `app_name` (the
    first application by default) to run."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.parse_obj(config))
    name = app_name or config["applications"][0]["name"]

    def running():
        app = serve.status().applications.get(name)
        if app is not None and str(getattr(app.status, "value", app.status)) == "DEPLOY_FAILED":
            raise AssertionError(app.message)
        return app is not None and str(getattr(app.status, "value", app.status)) == "RUNNING"

    deadline = time.monotonic() + timeout_s
    while not running():
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {name} not running after {timeout_s}s")
        time.sleep(0.5)


def start_serve_config(config: dict, num_cpus: int = 4) -> str:
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options=config["http_options"])
    deploy_config(config)
    return f"http://{config['http_options']['host']}:{config['http_options']['port']}"


def batch_size_histogram(url: str, auth=None, min_images: int = 1) -> tuple[dict, float] | None:
    """The Detector's batch-size histogram from /metrics, summed over replicas:
    (cumulative count per bucket bound, number of batches), None until the
    batches hold at least min_images images. Metrics are exported every few
    seconds, so an early read can hold only the first batches; the images are
    counted from the buckets (exact up to 4, a lower bound above), since Ray's
    exported _sum is not the sum of the observations."""
    import re

    text = requests.get(f"{url}/metrics", auth=auth, timeout=10).text
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        m = re.match(r'ray_mmdet_ls_model_batch_size_bucket\{.*le="([^"]+)".*\} ([0-9.e+]+)', line)
        if m:
            buckets[float(m.group(1))] = buckets.get(float(m.group(1)), 0) + float(m.group(2))
    count = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("ray_mmdet_ls_model_batch_size_count"))
    images, below, seen = 0.0, 0.0, 0.0  # batches in (below, le] hold at least floor(below) + 1 images each
    for le in sorted(b for b in buckets if b != float("inf")):
        images += (buckets[le] - seen) * (int(below) + 1)
        below, seen = le, buckets[le]
    images += (count - seen) * (int(below) + 1)
    return (buckets, count) if count >= 1 and images >= min_images else None


def replica_actors(deployment: str, app: str = "mmdet-backend") -> dict[str, tuple]:
    """Live replica actors of a deployment -> (actor handle, process id)."""
    import ray

    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry.get("namespace") != "serve" or not name.startswith(f"SERVE_REPLICA::{app}#{deployment}#"):
            continue
        try:
            actor = ray.get_actor(name, namespace="serve")
            found[name] = (actor, ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10))
        except Exception:  # dying or not started: not a live replica
            continue
    return found


def replica_pids(deployment: str, app: str = "mmdet-backend") -> dict[str, int]:
    return {name: pid for name, (_, pid) in replica_actors(deployment, app).items()}

"""The cluster deployment on a real 2-node Ray cluster on this machine.

A CPU-only head and a worker that declares one (fake) GPU, each started with
`ray start --block` in its own session, temp dir and ports, with token auth on.
Both nodes import the project from a wheel built by `pip wheel .` (installed
into a target dir on their PYTHONPATH), never from this source tree. The app
is deployed with the real CLI, `serve deploy --address <dashboard>`, from
serve_config.cluster.yaml with tiny sizes (2 shared cores), and the tests
check: the pending-for-GPU warning in /health while no GPU node exists, the
placement once the GPU node joins, /predict end to end, Detector autoscaling
up to max and back down to min, 503 + Retry-After beyond the queue bound, and
a model rollout (new checkpoint -> new model_version) without failed requests.

Everything is stopped by its own handle: SIGTERM to the `ray start` processes,
then SIGKILL to whatever is left in their sessions. Never `ray stop`.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from model_fixtures import RTMDET_TINY, TOY_CHECKPOINT, TOY_CONFIG, save_random_checkpoint
from package_fixtures import PIP, build_project_wheel
from payloads import predict, task
from serve_fixtures import free_port, wait_until
from toy_detector.scenes import scene_png

from deployments.dispatch import IMAGES_PER_BUSY_GROUP

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_CONFIG = ROOT / "serve_config.cluster.yaml"
VENV_BIN = Path(sys.executable).parent
APP = "mmdet-backend"
TIMINGS: dict[str, float] = {}  # measured times, printed at the end of the module

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------- cluster
def _session_pids(sid: int) -> list[int]:
    """PIDs of processes in session `sid` (a `ray start` we started with setsid)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after "comm)": state ppid pgrp session ...
            pids.append(int(entry))
    return pids


class RayNode:
    """One `ray start --block` process; it and every Ray process it spawns share its session."""

    def __init__(self, args: list[str], env: dict, cwd: Path, log: Path):
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
            env=env, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self, grace_s: float = 10.0) -> None:
        sid = self.proc.pid
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # ray start drains, then stops its processes
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        for pid in _session_pids(sid):  # workers have their own process groups, not their own sessions
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._log_file.close()


class LocalCluster:
    def __init__(self, base: Path, site_dir: Path):
        self.base = base
        self.token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
        self.env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONPATH=str(site_dir),  # the installed wheel, not the source tree
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
            LABEL_STUDIO_URL="", LABEL_STUDIO_API_KEY="",
        )
        self.cwd = base / "cwd"
        self.cwd.mkdir()
        self.nodes: list[RayNode] = []
        self._worker_ports = random.randrange(20000, 32000, 400)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.head_id: str | None = None
        self.gpu_node_id: str | None = None

    def _node_args(self, name: str) -> list[str]:
        # Own ports for everything, so this cluster never meets another one here. Worker
        # ports: a 200-port range per node, between Ray's default range (10002-19999)
        # and the kernel's ephemeral ports (32768+, where free_port() lands).
        low = self._worker_ports + 200 * len(self.nodes)
        temp = self.base / name
        temp.mkdir()
        return [
            "--temp-dir", str(temp),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--min-worker-port", str(low), "--max-worker-port", str(low + 199),
            "--object-store-memory", str(200 * 1024 * 1024),
        ]

    def start_head(self, attempts: int = 3) -> None:
        # A port free_port() found free can be taken (e.g. as another process's
        # outgoing port) before Ray binds it: then the head dies at once
        # ("address already in use"), and is started again on other ports.
        for attempt in range(attempts):
            name = "head" if attempt == 0 else f"head-{attempt}"
            node = RayNode([
                "--head", "--port", str(self.gcs_port), "--num-cpus", "2", "--num-gpus", "0",
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                str(self.dashboard_port), "--ray-client-server-port", str(free_port()), *self._node_args(name),
            ], self.env, self.cwd, self.base / f"{name}.log")
            self.nodes.append(node)
            try:
                nodes = wait_until(lambda node=node: self._alive_nodes(1) if node.alive() else "died", 120, 1,
                                   "the head node")
            except TimeoutError:
                nodes = None
            if nodes != "died" and nodes is not None:
                self.head_id = nodes[0]["node_id"]
                return
            log = node.tail()
            node.stop()
            self.nodes.remove(node)
            if "address already in use" not in log or attempt == attempts - 1:
                raise AssertionError(f"the head node did not start:\n{log}")
            self.gcs_port, self.dashboard_port, self.http_port = free_port(), free_port(), free_port()
            self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
            self.url = f"http://127.0.0.1:{self.http_port}"

    def add_gpu_worker(self) -> None:
        node = RayNode([
            "--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", "2", "--num-gpus", "1",
            *self._node_args("gpu-worker"),
        ], self.env, self.cwd, self.base / "gpu-worker.log")
        self.nodes.append(node)
        nodes = wait_until(lambda: self._alive_nodes(2), 120, 1, "the GPU worker node")
        self.gpu_node_id = next(n["node_id"] for n in nodes if n["resources_total"].get("GPU"))

    def _alive_nodes(self, count: int):
        for node in self.nodes:
            assert node.alive(), node.tail()
        nodes = [n for n in self.api("/api/v0/nodes")["data"]["result"]["result"] if n["state"] == "ALIVE"]
        return nodes if len(nodes) == count else None

    def api(self, path: str, timeout: float = 10) -> dict:
        resp = requests.get(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"},
                            timeout=timeout)
        resp.raise_for_status()
        return resp.json()

    def serve_cli(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run([str(VENV_BIN / "serve"), *args, "--address", self.dashboard], env=self.env,
                             cwd=self.cwd, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"serve {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def deploy(self, config: dict) -> None:
        path = self.base / f"serve_config.{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.serve_cli("deploy", str(path))

    def details(self) -> dict:
        return self.api("/api/serve/applications/")

    def replicas(self, deployment: str, states=("RUNNING",)) -> list[dict]:
        app = self.details()["applications"].get(APP)
        if not app or deployment not in app["deployments"]:
            return []
        return [r for r in app["deployments"][deployment]["replicas"] if r["state"] in states]

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


# --------------------------------------------------------------- fixtures
def _build_wheel_site(tmp: Path) -> Path:
    """`pip wheel .` from a copy of the project, installed into a target dir."""
    wheel = build_project_wheel(tmp)
    site = tmp / "site"
    subprocess.run([*PIP, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    return site


def tiny_config(cluster: LocalCluster, model: dict, image_dir: Path) -> dict:
    """serve_config.cluster.yaml with this machine's sizes; only values change, never keys."""
    config = yaml.safe_load(CLUSTER_CONFIG.read_text())
    assert config["proxy_location"] == "HeadOnly"
    config["http_options"].update(host="127.0.0.1", port=cluster.http_port)
    (app,) = config["applications"]
    app["args"].update(config_file=model["config_file"], checkpoint_file=model["checkpoint_file"],
                       image_dir=str(image_dir), torch_threads=1,
                       allow_cpu_fallback=True)  # the worker's GPU is declared, not real
    deployments = {d["name"]: d for d in app["deployments"]}
    overrides = {
        # 2 running + 3 queued /predict calls, then 503 + Retry-After.
        "LabelStudioIngress": {"max_ongoing_requests": 2, "max_queued_requests": 3,
                               "backpressure_config": {"status_code": 503, "retry_after_s": 2},
                               "ray_actor_options": {"num_cpus": 0.1}},
        # Exactly one loader per node: proves max_replicas_per_node spreads them.
        "ImageLoader": {"max_replicas_per_node": 1, "max_ongoing_requests": 16,
                        "autoscaling_config": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 4},
                        "ray_actor_options": {"num_cpus": 0.1}},
        # B = 2; half a GPU each, so both replicas pack onto the worker's one GPU.
        "Detector": {"max_ongoing_requests": 4,
                     "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                            "upscale_delay_s": 1, "downscale_delay_s": 5},
                     "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.5},
                     "user_config": {"max_batch_size": 2, "batch_wait_timeout_s": 0.05}},
        "Postprocess": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 32},
                        "ray_actor_options": {"num_cpus": 0.1}},
    }
    for name, values in overrides.items():
        for key, value in values.items():
            assert key in deployments[name], f"{name}.{key} is not in serve_config.cluster.yaml"
            if isinstance(value, dict):
                assert set(value) <= set(deployments[name][key]) | {"num_gpus"}, (name, key)
            deployments[name][key] = value
    # docs/cluster.md's rule, so the ingress lets enough calls out for the autoscaler to see
    # (a source has max_inflight_images / IMAGES_PER_BUSY_GROUP calls in flight).
    detector = deployments["Detector"]
    app["args"]["max_inflight_images"] = (detector["autoscaling_config"]["max_replicas"]
                                          * detector["max_ongoing_requests"] * IMAGES_PER_BUSY_GROUP)
    # Test-only: sample load every 0.5 s over 2 s, so scaling reacts in seconds.
    deployments["Detector"]["autoscaling_config"].update(metrics_interval_s=0.5, look_back_period_s=2)
    return config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # Short base path: Ray's unix socket paths must stay under 107 characters.
    base = Path(os.environ.get("MMDET_LS_CLUSTER_TMP", "/tmp")) / f"mlc-{secrets.token_hex(3)}"
    base.mkdir()
    tmp = tmp_path_factory.mktemp("cluster")
    image_dir = tmp / "upload"
    (image_dir / "1").mkdir(parents=True)
    for seed in range(4):
        (image_dir / "1" / f"scene{seed}.png").write_bytes(scene_png(700 + seed))
    if TOY_CHECKPOINT.is_file():
        model = {"config_file": str(TOY_CONFIG), "checkpoint_file": str(TOY_CHECKPOINT), "finds_boxes": True}
    else:  # a random RTMDet finds nothing, but runs the same code
        model = {"config_file": RTMDET_TINY, "finds_boxes": False,
                 "checkpoint_file": str(save_random_checkpoint(RTMDET_TINY, tmp / "rtmdet_tiny.pth"))}
    site = _build_wheel_site(tmp)
    cluster = LocalCluster(base, site)
    try:
        cluster.start_head()
        yield {"cluster": cluster, "model": model, "image_dir": image_dir, "tmp": tmp, "site": site,
               "config": tiny_config(cluster, model, image_dir)}
    finally:
        cluster.shutdown()
        shutil.rmtree(base, ignore_errors=True)
        if TIMINGS:
            print("\ncluster timings (s): " + json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


def health(cluster: LocalCluster) -> dict:
    return requests.get(f"{cluster.url}/health", timeout=3).json()


@pytest.fixture(scope="module")
def deployed(env):
    """Deployed and ready on head + GPU worker (whether or not the pending test ran first)."""
    cluster = env["cluster"]
    if cluster.details().get("applications", {}).get(APP) is None:
        cluster.deploy(env["config"])
    if cluster.gpu_node_id is None:
        started = time.monotonic()
        cluster.add_gpu_worker()
        wait_until(lambda: health(cluster).get("ready"), 180, 1, "/health ready after the GPU node joined")
        TIMINGS["gpu_node_join_to_ready_s"] = time.monotonic() - started
    wait_until(lambda: len(cluster.replicas("ImageLoader")) == 2, 120, 1, "two loaders")
    return env


def scene_task(task_id: int, seed: int) -> dict:
    """A task for one of the four uploads the `env` fixture writes."""
    return task(task_id, f"/data/upload/1/scene{seed % 4}.png")


def _deployment(env: dict, name: str) -> dict:
    return next(d for d in env["config"]["applications"][0]["deployments"] if d["name"] == name)


# ------------------------------------------------------------------ tests
def test_nodes_import_the_installed_package_not_the_source_tree(env):
    cluster = env["cluster"]
    out = subprocess.run([sys.executable, "-c", "import serve_app, deployments, mmdet_ls; print(serve_app.__file__)"],
                         env=cluster.env, cwd=cluster.cwd, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).parent == env["site"], out.stdout


def test_detector_pending_without_gpu_node_is_reported_by_health(env):
    """num_gpus on a cluster with no GPU: /health and the logs say so (not a silent hang)."""
    cluster = env["cluster"]
    if cluster.gpu_node_id is not None:
        pytest.skip("the GPU node already joined")
    started = time.monotonic()
    cluster.deploy(env["config"])

    # Ray 2.60 sets the message once a replica has waited > RAY_SERVE_SLOW_STARTUP_WARNING_S
    # (30 s by default) to be scheduled; until then /health says "starting".
    def warned():
        body = health(cluster)
        return body if "warning" in body else None

    body = wait_until(warned, 120, 1, "/health to warn about pending detector replicas")
    TIMINGS["pending_warning_after_deploy_s"] = time.monotonic() - started
    assert body["ready"] is False and body["status"] == "UP"
    assert "pending for resources" in body["warning"]
    assert "to be scheduled" in body["detail"] and '"GPU": 0.5' in body["detail"], body["detail"]
    assert "RUNNING" not in body["detector_replicas"]
    status = yaml.safe_load(cluster.serve_cli("status"))
    detector = status["applications"][APP]["deployments"]["Detector"]
    assert "taken more than" in detector["message"] and detector["replica_states"].get("RUNNING", 0) == 0
    # The ingress logs it too (its replica log under the head's or worker's session dir).
    logs = "".join(p.read_text(errors="replace") for p in cluster.base.glob("*/session_*/logs/serve/replica_*Ingress*"))
    assert "Detector replicas pending for resources" in logs

    # The cluster autoscaler's job, by hand: a GPU node joins, the replicas start.
    joined = time.monotonic()
    cluster.add_gpu_worker()
    body = wait_until(lambda: (lambda b: b if b.get("ready") else None)(health(cluster)), 180, 1, "/health ready")
    TIMINGS["gpu_node_join_to_ready_s"] = time.monotonic() - joined
    assert "warning" not in body, body


def test_detectors_only_on_the_gpu_node_loaders_on_both_proxy_on_head(deployed):
    cluster = deployed["cluster"]
    details = cluster.details()
    assert details["proxy_location"] == "HeadOnly"
    assert {p["node_id"] for p in details["proxies"].values()} == {cluster.head_id}
    detectors = cluster.replicas("Detector")
    assert detectors and {r["node_id"] for r in detectors} == {cluster.gpu_node_id}
    assert {r["node_id"] for r in cluster.replicas("ImageLoader")} == {cluster.head_id, cluster.gpu_node_id}
    # The same from Ray's state API: the actors themselves, and their GPU share.
    actors = cluster.api("/api/v0/actors?limit=1000&detail=1&filter_keys=state&filter_predicates=%3D"
                         "&filter_values=ALIVE")["data"]["result"]["result"]
    detector_actors = [a for a in actors if a["class_name"] == f"ServeReplica:{APP}:Detector"]
    assert detector_actors and {a["node_id"] for a in detector_actors} == {cluster.gpu_node_id}
    assert all(a["required_resources"].get("GPU") == 0.5 for a in detector_actors), detector_actors


def test_predict_end_to_end_on_the_cluster(deployed):
    cluster = deployed["cluster"]
    resp = predict(cluster.url, [scene_task(1, 0), scene_task(2, 1), task(3, "/data/upload/1/none.png")])
    assert resp.status_code == 200, resp.text
    first, second, missing = resp.json()["results"]
    version = health(cluster)["model_version"]
    for item in (first, second):
        assert "error" not in item and item["model_version"] == version
        if deployed["model"]["finds_boxes"]:
            assert item["result"], "the toy detector finds the scene's objects"
            assert {r["value"]["rectanglelabels"][0] for r in item["result"]} <= {"Vehicle", "Person"}
    assert "result" not in missing and missing["error_reason"] in ("not_found", "no_label_studio_url"), missing


def _load(cluster: LocalCluster, stop: threading.Event, clients: int, results: list,
          tasks_per_call: int = 3) -> list[threading.Thread]:
    """`clients` callers, each sending the next /predict when the last one answered."""
    def client(n: int):
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                resp = predict(cluster.url, [scene_task(n * 1000 + i + k, i + k) for k in range(tasks_per_call)])
                results.append((resp.status_code, time.monotonic() - started, resp))
            except requests.RequestException as exc:
                results.append((type(exc).__name__, time.monotonic() - started, None))
            i += tasks_per_call

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.timeout(240)
def test_detector_autoscales_to_max_under_load_and_back_to_min(deployed):
    cluster = deployed["cluster"]
    scaling = _deployment(deployed, "Detector")["autoscaling_config"]
    low, high = scaling["min_replicas"], scaling["max_replicas"]
    wait_until(lambda: len(cluster.replicas("Detector", ("RUNNING", "STARTING"))) == low, 60, 1, "min replicas")

    stop, results = threading.Event(), []
    started = time.monotonic()
    # Bounded client: 2 callers x 3 tasks keep ~6 images in flight (> target 2 x max 2)
    # and stay within the ingress's 2 running + 3 queued calls (no 503 here).
    threads = _load(cluster, stop, clients=2, results=results)
    try:
        wait_until(lambda: len(cluster.replicas("Detector")) == high, 120, 0.5, f"{high} Detector replicas")
        TIMINGS["scale_up_to_max_s"] = time.monotonic() - started
        served_before = len(results)
        wait_until(lambda: len(results) >= served_before + 2, 60, 0.5, "requests served at max replicas")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    stopped = time.monotonic()
    wait_until(lambda: len(cluster.replicas("Detector", ("RUNNING", "STARTING", "STOPPING"))) == low, 120, 0.5,
               f"back to {low} Detector replica")
    TIMINGS["scale_down_to_min_after_load_s"] = time.monotonic() - stopped
    assert {r["node_id"] for r in cluster.replicas("Detector")} == {cluster.gpu_node_id}
    codes = [code for code, _, _ in results]
    assert codes and set(codes) == {200}, codes
    failed = [item for _, _, r in results for item in r.json()["results"] if "error" in item]
    assert not failed, failed[:3]
    TIMINGS["load_requests"] = len(results)
    TIMINGS["load_mean_latency_s"] = sum(s for _, s, _ in results) / len(results)


def test_backpressure_beyond_the_queue_bound_answers_503_with_retry_after(deployed):
    cluster = deployed["cluster"]
    ingress = _deployment(deployed, "LabelStudioIngress")
    capacity = ingress["max_ongoing_requests"] + ingress["max_queued_requests"]
    burst = capacity * 4
    start_together = threading.Barrier(burst)

    def call(i: int):
        start_together.wait(timeout=30)
        started = time.monotonic()
        resp = predict(cluster.url, [scene_task(5000 + i * 8 + k, k) for k in range(8)], timeout=100)
        return resp.status_code, time.monotonic() - started, resp.headers.get("Retry-After"), resp.text

    with cf.ThreadPoolExecutor(burst) as pool:
        answers = list(pool.map(call, range(burst)))
    rejected = [a for a in answers if a[0] == 503]
    served = [a for a in answers if a[0] == 200]
    assert len(served) + len(rejected) == burst, [a[:2] for a in answers]
    # Up to burst - capacity are rejected: a call that finishes during the burst frees a slot
    # (60-80 % were rejected in practice), and Ray may reject a few more than strictly necessary.
    assert served and len(rejected) >= burst // 4, [a[:2] for a in answers]
    for code, seconds, retry_after, text in rejected:
        assert retry_after == "2" and "backpressure" in text and "max_queued_requests=" in text, (retry_after, text)
        assert seconds < 10, "a rejection is immediate, never a hang"
    TIMINGS["backpressure_rejected_of_burst"] = len(rejected) / burst
    # Still serving right after the burst.
    after = predict(cluster.url, [scene_task(9999, 0)])
    assert after.status_code == 200 and "error" not in after.json()["results"][0]


@pytest.mark.timeout(240)
def test_new_checkpoint_rolls_out_a_new_model_version_without_failed_requests(deployed):
    """`serve deploy` with a new checkpoint: new model_version, every request answered.

    max_surge_percent starts the new Detector before the old one stops; that
    needs a free GPU share, so the rollout starts at min_replicas (1 of the
    GPU's 2 halves used) under light load.
    """
    import torch

    cluster = deployed["cluster"]
    low = _deployment(deployed, "Detector")["autoscaling_config"]["min_replicas"]
    wait_until(lambda: len(cluster.replicas("Detector", ("RUNNING", "STARTING", "STOPPING"))) == low, 120, 1,
               "Detector at min replicas before the rollout")
    old_version = health(cluster)["model_version"]
    old_detectors = {r["replica_id"] for r in cluster.replicas("Detector")}
    # The same weights re-saved with other metadata: another file digest, so another model_version.
    checkpoint = torch.load(deployed["model"]["checkpoint_file"], map_location="cpu", weights_only=False)
    checkpoint.setdefault("meta", {})["rollout"] = "v2"
    new_checkpoint = deployed["tmp"] / "model_v2.pth"
    torch.save(checkpoint, new_checkpoint)
    config = yaml.safe_load(yaml.safe_dump(deployed["config"]))
    config["applications"][0]["args"]["checkpoint_file"] = str(new_checkpoint)

    stop, results = threading.Event(), []
    threads = _load(cluster, stop, clients=1, results=results, tasks_per_call=1)
    overlap = []  # moments when an old and a new Detector both ran
    try:
        wait_until(lambda: results, 60, 0.5, "first request before the rollout")
        started = time.monotonic()
        cluster.deploy(config)

        def rolled_out():
            replicas = cluster.replicas("Detector", ("STARTING", "RUNNING", "STOPPING"))
            running = {r["replica_id"] for r in replicas if r["state"] == "RUNNING"}
            new = {r["replica_id"] for r in replicas if r["state"] in ("STARTING", "RUNNING")} - old_detectors
            if running & old_detectors and new:  # the new one starts while the old one still serves
                overlap.append(time.monotonic() - started)
            app = cluster.details()["applications"][APP]
            return app["status"] == "RUNNING" and running and not running & old_detectors

        try:
            wait_until(rolled_out, 180, 0.5, "only new Detector replicas, app RUNNING")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{cluster.serve_cli('status')}") from None
        TIMINGS["rollout_to_new_version_s"] = time.monotonic() - started
        served_before = len(results)
        wait_until(lambda: len(results) >= served_before + 2, 60, 0.5, "requests after the rollout")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    new_version = health(cluster)["model_version"]
    assert new_version != old_version and new_version.rsplit("-", 1)[0] == old_version.rsplit("-", 1)[0]
    assert overlap, "the new Detector starts before the old one stops (max_surge_percent)"
    codes = [code for code, _, _ in results]
    assert set(codes) == {200}, codes
    items = [item for _, _, r in results for item in r.json()["results"]]
    assert not [i for i in items if "error" in i], [i for i in items if "error" in i][:3]
    assert {i["model_version"] for i in items} == {old_version, new_version}
    assert items[-1]["model_version"] == new_version
    TIMINGS["rollout_max_latency_s"] = max(seconds for _, seconds, _ in results)

"""Shared by every test: the kind markers, the servers tests start, Ray's import path.

Layout (one folder per kind; a test's folder is its marker, so `pytest -m unit`
selects tests/unit):

- tests/unit: in-process only, no Ray and no service (`make test-fast`);
- tests/service: the service running on a local Ray (in-process Serve, `serve run`);
- tests/cluster: a multi-node Ray cluster from the built wheel;
- tests/e2e: a real Label Studio talking to the service.

Helpers importable from any test (pyproject puts tests/ on sys.path):
payloads (LABEL_CONFIG, task, predict), image_server, serve_fixtures,
model_fixtures, package_fixtures, labelstudio_server, toy_detector.
Fixtures: `image_server` and `ray_serve` (below, one per module), `ls` (a Label
Studio, tests/e2e/conftest.py).
"""
import os
from pathlib import Path

import pytest
from image_server import ImageServer
from serve_fixtures import start_serve, start_serve_config, stop_serve, wait_ready

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
KINDS = ("unit", "service", "cluster", "e2e")

# Processes tests start (Ray workers and replicas, `serve run`) import
# `serve_app`, `deployments` and `mmdet_ls` from the checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
# Services tests start run the model eager: compiling at each start would cost
# CI minutes. The tests of acceleration, and the shipped config's default,
# set or clear it themselves.
os.environ.setdefault("MODEL_ACCELERATION", "eager")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            kind = item.path.relative_to(TESTS).parts[0]
        except ValueError:  # not under tests/
            continue
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: a test module belongs in one of tests/{{{','.join(KINDS)}}}/")
        item.add_marker(kind)


@pytest.fixture(scope="module")
def image_server():
    """Start a local HTTP image server for this module:
    `web = image_server(root, host=..., latency_s=...)` (see image_server.ImageServer).
    Every server started is stopped after the module's last test."""
    started: list[ImageServer] = []

    def start(root, **kwargs) -> ImageServer:
        server = ImageServer(root, **kwargs).__enter__()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def ray_serve():
    """Ray Serve on a local Ray (ray.init(address="local")) for this module, one per module:
    `url = ray_serve(app)` runs a built application, `url = ray_serve(config=...)`
    deploys a serve config declaratively as `serve deploy` does (and waits for
    its first application to run). Then waits until /health at the URL says
    ready (unless `wait=False`) and returns the base URL. Serve and Ray are
    shut down after the module's last test."""
    started = False

    def start(app=None, *, config: dict | None = None, num_cpus: int = 4, wait: bool = True) -> str:
        nonlocal started
        assert not started, "one Ray Serve per test module"
        assert (app is None) != (config is None), "an app or a config"
        started = True
        url = start_serve(app, num_cpus=num_cpus) if config is None else start_serve_config(config, num_cpus=num_cpus)
        if wait:
            wait_ready(url)
        return url

    yield start
    if started:
        stop_serve()

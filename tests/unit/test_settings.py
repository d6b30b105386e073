"""One owner per setting: where each lives, precedence, and what refuses (no Ray)."""
import importlib.util
from pathlib import Path

import pytest
import yaml

from mmdet_ls.devices import DeviceError, parse_device, resolve_device
from mmdet_ls.settings import LIVE_SETTINGS, SettingError, check_user_config, score_threshold
from serve_app import AppArgs

ROOT = Path(__file__).resolve().parents[2]
ENV = ("CONFIG_FILE", "CHECKPOINT_FILE", "DEVICE", "IMAGE_DIR", "BASIC_AUTH_USER", "LOG_LEVEL", "SCORE_THRESHOLD")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_precedence_is_explicit_arg_then_environment_then_default(monkeypatch):
    assert AppArgs().config_file == "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
    assert AppArgs().device == "auto"
    monkeypatch.setenv("CONFIG_FILE", "rtmdet/rtmdet_tiny_8xb32-300e_coco.py")
    monkeypatch.setenv("DEVICE", "cuda:1")
    monkeypatch.setenv("IMAGE_DIR", "/data/ls-uploads")
    monkeypatch.setenv("BASIC_AUTH_USER", "env-user")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    from_env = AppArgs()
    assert (from_env.config_file, from_env.device, from_env.image_dir, from_env.basic_auth_user, from_env.log_level) == (
        "rtmdet/rtmdet_tiny_8xb32-300e_coco.py", "cuda:1", "/data/ls-uploads", "env-user", "DEBUG")
    explicit = AppArgs(config_file="mine.py", device="cpu", image_dir="/mine", basic_auth_user="me")
    assert (explicit.config_file, explicit.device, explicit.image_dir, explicit.basic_auth_user) == (
        "mine.py", "cpu", "/mine", "me")
    assert AppArgs(image_dir=None).image_dir == "/data/ls-uploads"  # null in the YAML = unset


@pytest.mark.parametrize("name", sorted(LIVE_SETTINGS))
def test_live_settings_are_not_args_and_say_where_they_live(name):
    with pytest.raises(ValueError, match=f"{name} is a live setting, owned by the {LIVE_SETTINGS[name]} deployment"):
        AppArgs(**{name: 1})


def test_score_threshold_user_config_then_environment_then_default(monkeypatch):
    assert score_threshold(None) == 0.5
    monkeypatch.setenv("SCORE_THRESHOLD", "0.3")
    assert score_threshold(None) == 0.3
    assert score_threshold({"score_threshold": 0.7}) == 0.7
    monkeypatch.setenv("SCORE_THRESHOLD", "high")
    with pytest.raises(SettingError, match="SCORE_THRESHOLD must be a number"):
        score_threshold(None)
    with pytest.raises(SettingError, match="between 0 and 1"):
        score_threshold({"score_threshold": 1.5})


def test_a_misspelt_user_config_key_refuses():
    assert check_user_config("Detector", {"max_batch_size": 8}) == {"max_batch_size": 8}
    with pytest.raises(SettingError, match="unknown setting"):
        check_user_config("Postprocess", {"score_treshold": 0.3})
    with pytest.raises(SettingError, match="unknown setting"):
        check_user_config("Postprocess", {"max_batch_size": 8})  # owned by the Detector


@pytest.mark.parametrize(
    "device, reserved, cuda, fallback, expected",
    [
        ("auto", 0, 0, False, "cpu"),
        ("auto", 0, 2, False, "cpu"),  # a GPU on the node that Ray did not give this replica
        ("auto", 1, 1, False, "cuda:0"),
        ("cuda", 1, 1, False, "cuda:0"),
        ("gpu:3", 1, 1, False, "cuda:0"),  # Ray shows a replica only its own GPUs
        ("cpu", 1, 1, False, "cpu"),
        ("auto", 1, 0, True, "cpu"),
    ],
)
def test_device_follows_the_gpu_ray_reserved(device, reserved, cuda, fallback, expected):
    assert resolve_device(device, reserved, cuda, fallback) == expected


def test_cuda_without_a_reserved_gpu_fails_naming_num_gpus():
    with pytest.raises(DeviceError, match="num_gpus: 1"):
        resolve_device("cuda", 0, 1)
    with pytest.raises(DeviceError, match="allow_cpu_fallback"):
        resolve_device("auto", 1, 0)  # a declared GPU torch cannot see
    with pytest.raises(DeviceError):
        parse_device("tpu")
    with pytest.raises(ValueError):
        AppArgs(device="cpu:1")


def _serve_script():
    """scripts/serve.py as a module (a script, not on sys.path)."""
    spec = importlib.util.spec_from_file_location("serve_script", ROOT / "scripts" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_set_puts_each_key_where_it_is_owned():
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    out = _serve_script().apply_overrides(config, ["score_threshold=0.3", "max_batch_size=2", "device=cpu",
                                                   "image_dir=/x"], port=9999)
    app = out["applications"][0]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert deployments["Postprocess"]["user_config"] == {"score_threshold": 0.3}
    assert deployments["Detector"]["user_config"] == {"max_batch_size": 2}
    assert {"device": "cpu", "image_dir": "/x"}.items() <= app["args"].items()
    assert "score_threshold" not in app["args"] and out["http_options"]["port"] == 9999
    AppArgs(**app["args"])


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml", "serve_config.cluster.yaml"])
def test_shipped_configs_leave_the_environment_settings_unset(name):
    """Structural check of every shipped config (the GPU ones cannot run here):
    valid for Ray, args valid for AppArgs, no application parameter that has
    an environment fallback pinned, every user_config key owned by its deployment."""
    from ray.serve.schema import ServeDeploySchema

    from mmdet_ls.settings import ENV_FALLBACKS

    config = yaml.safe_load((ROOT / name).read_text())
    ServeDeploySchema.parse_obj(config)
    app = config["applications"][0]
    args = app.get("args") or {}
    AppArgs(**args)
    assert not set(args) & (set(ENV_FALLBACKS) | {"label_studio_url"}), args
    for deployment in app["deployments"]:
        check_user_config(deployment["name"], deployment.get("user_config"))
        if deployment["name"] == "Detector" and deployment.get("user_config"):
            # The Detector's own start-up check: calls of up to MAX_IMAGES_PER_CALL images must hold a batch.
            from deployments.dispatch import MAX_IMAGES_PER_CALL

            assert deployment["max_ongoing_requests"] * MAX_IMAGES_PER_CALL >= deployment["user_config"]["max_batch_size"]


@pytest.mark.parametrize("device, cpus, gpus_in_cluster, expected", [
    ("auto", 2, False, (2, 1.0)),    # the shipped CPU config on this machine: two replicas, a core each
    ("cpu", 8, False, (2, 4.0)),
    ("auto", 3, False, (2, 1.0)),    # whole cores only: never more threads than cores
    ("auto", 1, False, (1, 1.0)),
    ("auto", 8, True, (1, 8.0)),     # a GPU in the cluster: one replica (the GPU configs set their own)
    ("cuda:0", 8, False, (1, 8.0)),
])
def test_detector_replicas_share_a_cpu_machine(monkeypatch, device, cpus, gpus_in_cluster, expected):
    import serve_app

    monkeypatch.setattr(serve_app, "this_node_cpus", lambda: float(cpus))
    monkeypatch.setattr(serve_app, "cluster_has_gpus", lambda: gpus_in_cluster)
    options = serve_app.detector_defaults(serve_app.detector_on_cpu(device))
    assert (options["num_replicas"], options["ray_actor_options"]["num_cpus"]) == expected
    assert options["ray_actor_options"]["num_gpus"] == 0  # a GPU comes only from the serve config


@pytest.mark.parametrize("device, gpus_in_cluster, setting, expected", [
    ("auto", False, None, 32),   # CPU: fewer calls per source, so concurrent one-task requests travel together
    ("cpu", True, None, 32),
    ("auto", True, None, 64),    # a GPU needs more in flight to stay fed
    ("cuda", False, None, 64),
    ("auto", False, 100, 100),   # the arg, where set, is the owner
])
def test_images_in_flight_default_follows_where_the_detector_runs(monkeypatch, device, gpus_in_cluster, setting,
                                                                  expected):
    import serve_app
    from tests.model_fixtures import TOY_CHECKPOINT, TOY_CONFIG

    monkeypatch.setattr(serve_app, "cluster_has_gpus", lambda: gpus_in_cluster)
    app = serve_app.build_app({"config_file": str(TOY_CONFIG), "checkpoint_file": str(TOY_CHECKPOINT),
                               "device": device, "max_inflight_images": setting})
    assert app._bound_deployment.init_kwargs["max_inflight_images"] == expected  # the ingress's own argument


def test_shipped_cpu_config_leaves_the_detector_layout_to_the_code():
    """serve_config.yaml must not pin num_replicas / ray_actor_options for the
    Detector, or its replicas would not follow the machine's cores; the other
    configs must pin both (or autoscale), or the code's two CPU replicas would
    apply to them too."""
    configs = {p.name: yaml.safe_load(p.read_text()) for p in ROOT.glob("serve_config*.yaml")}
    for name, config in configs.items():
        for app in config["applications"]:
            detector = next(d for d in app["deployments"] if d["name"] == "Detector")
            if name == "serve_config.yaml":
                assert "num_replicas" not in detector and "ray_actor_options" not in detector
            else:
                assert ("num_replicas" in detector or "autoscaling_config" in detector), name
                assert "num_cpus" in detector["ray_actor_options"], name


def test_the_model_thread_yields_the_cpu_to_request_handling():
    """The model's thread runs below the replica's other threads (which answer
    /health and route requests), so a model that keeps every core busy cannot
    hold /health past Label Studio's 1 s; its OpenMP count is set there too."""
    import threading

    import torch

    from deployments.detector import MODEL_THREAD_NICE, model_thread

    def nice_of(tid: int) -> int:  # field 19 of /proc/<pid>/task/<tid>/stat
        with open(f"/proc/self/task/{tid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[16])

    wanted = torch.get_num_threads()  # this process's own count: the test leaves it as it was
    pool = model_thread(wanted)
    try:
        tid, threads = pool.submit(lambda: (threading.get_native_id(), torch.get_num_threads())).result()
        assert nice_of(tid) == min(19, nice_of(threading.get_native_id()) + MODEL_THREAD_NICE)
        assert threads == wanted
    finally:
        pool.shutdown()

"""Fuzz /predict and /setup of the running service with hypothesis.

Property: whatever the body, the answer is never a 500 and no replica logs
an unhandled exception; a 200 from /predict has one well-formed item per
task, in order. Image values only ever name 127.0.0.1 or carry no scheme,
so no traffic leaves the machine.

Each test counts what its run covered (HTTP statuses; for /predict, how many
bodies reached the task level, i.e. got a 200 with at least one per-task
item, and the outcome of every item), asserts that the run was not vacuous,
and checks the replica logs itself, so it proves the same alone as in the
module. With MMDET_LS_FUZZ_COVERAGE=<file> set, the counts are also written
there (bench/fuzz_coverage.py does that and adds provenance).
"""
import base64
import collections
import io
import json
import os
import string
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from model_fixtures import TOY_CHECKPOINT, TOY_CONFIG
from payloads import LABEL_CONFIG, task
from PIL import Image

from serve_app import AppArgs, build_app

pytestmark = pytest.mark.timeout(900)

TWO_IMAGES = (
    '<View><Image name="a" value="$image"/><Image name="b" value="$img"/>'
    '<RectangleLabels name="la" toName="a" model_score_threshold="0.3"><Label value="Person" predicted_values="person"/>'
    '</RectangleLabels><RectangleLabels name="lb" toName="b"><Label value="Car" predicted_values="car"/>'
    "</RectangleLabels></View>"
)
FUZZ_LIMITS = {"fetch_connect_timeout_s": 1, "fetch_read_timeout_s": 1, "fetch_total_timeout_s": 2,
               "max_image_bytes": 4 << 20}
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
STATE: dict = {}
COVERAGE_ENV = "MMDET_LS_FUZZ_COVERAGE"


class Coverage:
    """What one test's run sent and got back."""

    def __init__(self, name: str):
        self.name = name
        self.bodies = 0
        self.status: collections.Counter = collections.Counter()  # "<path> <status>" -> bodies
        self.reached_tasks = 0  # /predict: a 200 with at least one per-task item
        self.items: collections.Counter = collections.Counter()  # error_reason or "predicted" -> items

    def as_dict(self) -> dict:
        return {"bodies": self.bodies, "status": dict(sorted(self.status.items())),
                "bodies_reaching_task_level": self.reached_tasks,
                "task_items": dict(self.items.most_common())}

    def save(self) -> None:
        """Merge into $MMDET_LS_FUZZ_COVERAGE (one key per test), if set."""
        path = os.environ.get(COVERAGE_ENV)
        if not path:
            return
        data = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        data[self.name] = self.as_dict()
        Path(path).write_text(json.dumps(data, indent=2))


def _jpeg(size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 140, 200)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def svc(tmp_path_factory, image_server, ray_serve):
    tmp = tmp_path_factory.mktemp("fuzz")
    image_dir = tmp / "media" / "upload"
    (image_dir / "1").mkdir(parents=True)
    (image_dir / "1" / "a.jpg").write_bytes(_jpeg())
    web = tmp / "web"
    web.mkdir()
    (web / "a.jpg").write_bytes(_jpeg((64, 80)))
    (web / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    images = image_server(web)
    args = AppArgs(config_file=str(TOY_CONFIG), checkpoint_file=str(TOY_CHECKPOINT), image_dir=str(image_dir),
                   allowed_hosts=["127.0.0.1"], **FUZZ_LIMITS)
    url = ray_serve(build_app(args))
    STATE.update(url=url, images=images)
    return STATE


# ------------------------------------------------------------------ strategies
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def interesting_images():
    return [
        "{base}/a.jpg", "{base}/status/404", "{base}/status/500", "{base}/html", "{base}/redirect-loop",
        "{base}/noise.png", "{base}/huge-declared", "{base}/redirect-to/http://169.254.169.254/",
        "/data/upload/1/a.jpg", "/data/upload/../../etc/passwd", "/data/upload/1/missing.jpg",
        "/data/upload/%2e%2e/x", "/data/upload/", "ftp://127.0.0.1/a.jpg", "file:///etc/passwd",
        "data:image/jpeg;base64," + base64.b64encode(_jpeg((40, 30))).decode(), "data:image/png;base64,!!!",
        "data:,x", "s3://bucket/key.jpg", "gs://b/k", "http://127.0.0.1:1/closed.jpg", "http://127.0.0.1:99999/x",
        "http://[::1/x", "http://", "http:///x", "//127.0.0.1/x", "http://127.0.0.1/\x00", "\t /data/upload/1/a.jpg \n",
        "http://user:pass@127.0.0.1:{port}/a.jpg?token=secret#frag", "HTTP://127.0.0.1:{port}/A.JPG",
    ]


def _local(value: str) -> str:
    port = STATE["images"].port
    return value.replace("{base}", f"http://127.0.0.1:{port}").replace("{port}", str(port))


no_scheme_text = st.text(alphabet=st.characters(blacklist_characters=":", blacklist_categories=("Cs",)),
                         max_size=40)
image_values = st.one_of(
    st.sampled_from(interesting_images()).map(_local),
    no_scheme_text,
    no_scheme_text.map(lambda s: "/data/upload/" + s),
    json_values,
)
tasks_strategy = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"data": st.one_of(st.dictionaries(st.sampled_from(["image", "img", "text"]), image_values, max_size=3),
                               json_values)},
            optional={"id": json_values, "meta": json_values, "annotations": json_values, "predictions": json_values},
        ),
        json_values,
    ),
    max_size=6,
)
xml_fragments = st.lists(
    st.sampled_from(["<View>", "</View>", '<Image name="image" value="$image"/>', '<Image name="i" value="image"/>',
                     '<RectangleLabels name="label" toName="image">', "</RectangleLabels>", '<Label value="Person"/>',
                     '<Label value=""/>', '<RectangleLabels name="x" toName="nope">', "<!DOCTYPE x>", "&lt;", "&x;",
                     '<RectangleLabels name="l" toName="image" model_score_threshold="2">', "<", ">"]),
    max_size=8,
).map("".join)
label_configs = st.one_of(st.just(LABEL_CONFIG), st.just(TWO_IMAGES), xml_fragments, st.text(max_size=40),
                          json_values)
# Well-formed tasks whose image values are fuzzed: these reach the loader and the model.
image_tasks = st.lists(
    st.builds(lambda v, w, i: {"id": i, "data": {"image": v, "img": w}}, image_values, image_values,
              st.one_of(st.integers(0, 10**6), json_values)),
    min_size=1, max_size=6,
)
usable_configs = st.sampled_from([LABEL_CONFIG, TWO_IMAGES])
predict_bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"tasks": st.one_of(tasks_strategy, json_values),
                                        "label_config": label_configs,
                                        "project": st.one_of(st.sampled_from(["1.1", "2", "1", ""]), json_values),
                                        "params": json_values}),
    st.fixed_dictionaries({"tasks": tasks_strategy, "label_config": usable_configs}),
    st.fixed_dictionaries({"tasks": image_tasks, "label_config": usable_configs}),
    st.fixed_dictionaries({"tasks": image_tasks, "label_config": usable_configs, "project": st.just("1.1")}),
    json_values,
)
hostnames = st.one_of(st.sampled_from(["", "not a url", "ftp://127.0.0.1", "http://127.0.0.1:1", "http://[::1"]),
                      st.builds(lambda: f"http://127.0.0.1:{STATE['images'].port}"),
                      st.text(alphabet=string.ascii_letters + "/.", max_size=20), json_values)
setup_bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"project": st.one_of(st.sampled_from(["1.1", "2", "1"]), json_values),
                                        "schema": label_configs, "hostname": hostnames,
                                        "access_token": json_values, "model_version": json_values,
                                        "extra_params": json_values}),
    json_values,
)


def note(text: str) -> None:
    """hypothesis.event inside a property (for --hypothesis-show-statistics); nothing outside one."""
    try:
        event(text)
    except InvalidArgument:
        pass


def check_predict_answer(body, resp, coverage: Coverage):
    coverage.bodies += 1
    coverage.status[f"/predict {resp.status_code}"] += 1
    assert resp.status_code != 500, (body, resp.text[:500])
    assert resp.status_code in (200, 400, 413), (resp.status_code, resp.text[:500])
    answer = resp.json()
    note(f"HTTP {resp.status_code}")
    if resp.status_code != 200:
        assert answer["status"] == "error" and isinstance(answer["error"], str)
        return
    results = answer["results"]
    assert isinstance(body, dict) and isinstance(body.get("tasks"), list)
    assert len(results) == len(body["tasks"])
    coverage.reached_tasks += bool(results)
    for item in results:
        outcome = item.get("error_reason", "predicted")
        coverage.items[outcome] += 1
        note(f"task: {outcome}")
        if "result" in item:
            assert "error" not in item and isinstance(item["result"], list)
            for region in item["result"]:
                v = region["value"]
                assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100 and 0 <= region["score"] <= 1
        else:
            assert set(item) == {"error", "error_reason", "retriable", "model_version"}, item


def post(path, data: bytes):
    return requests.post(f"{STATE['url']}{path}", data=data, headers={"Content-Type": "application/json"},
                         timeout=60)


def assert_no_unhandled_exception_logged():
    """No replica log of this Ray session holds a traceback or an unexpected loader error."""
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None) or ray._private.worker._global_node
    serve_logs = Path(node.get_session_dir_path()) / "logs" / "serve"
    replica_logs = list(serve_logs.glob("replica_*.log"))
    assert {"LabelStudioIngress", "ImageLoader", "Detector", "Postprocess"} <= {
        p.name.split("_")[2] for p in replica_logs if p.name.count("_") >= 3}, [p.name for p in replica_logs]
    for log in replica_logs:
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, f"{log.name}: {text[text.index('Traceback') - 300:][:1500]}"
        assert "unexpected error loading image" not in text, log.name


# ------------------------------------------------------------------ properties
def test_fuzz_predict_never_500(svc):
    coverage = Coverage("predict")

    @settings(max_examples=200, **SETTINGS)
    @given(body=predict_bodies)
    def prop(body):
        resp = post("/predict", json.dumps(body).encode())
        check_predict_answer(body, resp, coverage)

    prop()
    coverage.save()
    print(f"/predict fuzz coverage: {json.dumps(coverage.as_dict())}")
    # Not vacuous: bodies were refused, others reached the tasks, and tasks got
    # both predictions and per-task errors from the loader (not only bad_task).
    assert coverage.status["/predict 400"] and coverage.reached_tasks, coverage.as_dict()
    assert coverage.items["predicted"] and set(coverage.items) - {"predicted", "bad_task"}, coverage.as_dict()
    assert_no_unhandled_exception_logged()


def test_fuzz_setup_never_500(svc):
    coverage = Coverage("setup")

    @settings(max_examples=100, **SETTINGS)
    @given(body=setup_bodies)
    def prop(body):
        resp = post("/setup", json.dumps(body).encode())
        coverage.bodies += 1
        coverage.status[f"/setup {resp.status_code}"] += 1
        assert resp.status_code in (200, 400), (body, resp.status_code, resp.text[:300])
        answer = resp.json()
        assert set(answer) == {"model_version"} if resp.status_code == 200 else answer["status"] == "error"

    prop()
    coverage.save()
    print(f"/setup fuzz coverage: {json.dumps(coverage.as_dict())}")
    assert coverage.status["/setup 200"] and coverage.status["/setup 400"], coverage.as_dict()
    assert_no_unhandled_exception_logged()


def test_fuzz_raw_bodies_never_500(svc):
    coverage = Coverage("raw")

    @settings(max_examples=80, **SETTINGS)
    @given(raw=st.one_of(st.binary(max_size=300),
                         st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
                         predict_bodies.map(lambda b: json.dumps(b).encode()[: len(json.dumps(b)) // 2])))
    def prop(raw):
        coverage.bodies += 1
        for path in ("/predict", "/setup", "/webhook"):
            resp = post(path, raw)
            coverage.status[f"{path} {resp.status_code}"] += 1
            assert resp.status_code in (200, 400), (path, raw[:100], resp.status_code, resp.text[:300])

    prop()
    coverage.save()
    print(f"raw body fuzz coverage: {json.dumps(coverage.as_dict())}")
    assert all(coverage.status[f"{p} 400"] for p in ("/predict", "/setup", "/webhook")), coverage.as_dict()
    assert_no_unhandled_exception_logged()


def test_hostile_image_values_answered_and_nothing_unhandled_logged(svc):
    """Every image value the fuzzers draw from, in one call (so this test alone
    sends them): one well-formed item each, the service still healthy, and no
    replica log with a traceback."""
    values = [_local(v) for v in interesting_images()]
    body = {"tasks": [task(i, v) for i, v in enumerate(values)] + [task(len(values), "/data/upload/1/a.jpg")],
            "label_config": LABEL_CONFIG}
    coverage = Coverage("hostile_values")
    resp = post("/predict", json.dumps(body).encode())
    assert resp.status_code == 200, resp.text[:500]
    check_predict_answer(body, resp, coverage)
    results = resp.json()["results"]
    assert "result" in results[-1], results[-1]
    assert len(coverage.items) >= 6, coverage.as_dict()  # predictions and many distinct error reasons
    assert requests.get(f"{svc['url']}/health", timeout=2).json()["ready"] is True
    assert_no_unhandled_exception_logged()

"""Job logic without Ray or a server (mmdet_ls/jobs.py): claims, progress,
write-back accounting. `LabelStudioInMemory` keeps what the API would store,
so "done" can be checked against what is there; predictions come from a
function of the task (the model is not under test here: tests/e2e/test_jobs.py
runs the same code with the real graph, the toy detector and Label Studio)."""
from __future__ import annotations

import asyncio

import pytest

from mmdet_ls.jobs import Claims, JobRecord, JobRun, TaskQueue, pending_task_pages
from mmdet_ls.label_config import parse_label_config
from mmdet_ls.labelstudio_api import LabelStudioAPIError

pytestmark = pytest.mark.unit

CONFIG = parse_label_config('<View><Image name="image" value="$image"/><RectangleLabels name="label" '
                            'toName="image"><Label value="Car" predicted_values="car"/></RectangleLabels></View>')
VERSION = "toy-v1"


class LabelStudioInMemory:
    """The four calls a job makes, over a dict of stored predictions."""

    def __init__(self, n_tasks: int):
        self.tasks = {i: {"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in range(1, n_tasks + 1)}
        self.stored: dict[int, list[str]] = {}
        self.refuse: int | None = None  # answer imports with this HTTP status
        self.lose_answers = 0  # store, then time out this many imports (the answer never came)
        self.drop_tasks: set[int] = set()  # "validation" drops these silently (strict validation off)
        self.import_calls = 0

    def _pending(self, model_version, task_ids):
        return [t for i, t in sorted(self.tasks.items()) if model_version not in self.stored.get(i, [])
                and (task_ids is None or i in task_ids)]

    def pending_tasks(self, project, model_version, *, after_id=0, page_size=100, task_ids=None):
        return [t for t in self._pending(model_version, task_ids) if t["id"] > after_id][:page_size]

    def count_pending(self, project, model_version, task_ids=None):
        return len(self._pending(model_version, task_ids))

    def tasks_with_prediction(self, project, task_ids, model_version):
        return {i for i in task_ids if model_version in self.stored.get(i, [])}

    def import_predictions(self, project, items):
        self.import_calls += 1
        if self.refuse:
            raise LabelStudioAPIError(f"HTTP {self.refuse} from /api/projects/1/import/predictions",
                                      status=self.refuse, retriable=self.refuse >= 500)
        created = 0
        for item in items:
            if item["task"] in self.drop_tasks:
                continue
            self.stored.setdefault(item["task"], []).append(item["model_version"])
            created += 1
        if self.lose_answers:
            self.lose_answers -= 1
            raise LabelStudioAPIError("timed out reading the answer of /api/projects/1/import/predictions",
                                      retriable=True)
        return created


async def predict(task, config):
    await asyncio.sleep(0)
    if task["id"] % 10 == 0:
        return {"error": "HTTP 404 for the image", "error_reason": "http_404", "retriable": False,
                "model_version": VERSION}
    return {"result": [{"id": "r"}], "score": 0.9, "model_version": VERSION}


def run_job(api, claims=None, **kw) -> tuple[JobRecord, JobRun]:
    record = JobRecord.new("bulk", 1, VERSION)
    claims = claims or Claims()
    job = JobRun(record, api, kw.pop("predict", predict), claims, inflight_tasks=4, write_chunk=7, **kw)

    async def go():
        feed = pending_task_pages(api, record, claims, page_size=9)
        return await job.run(feed, CONFIG)

    asyncio.run(go())
    return record, job


def test_job_writes_each_task_once_and_counts_only_what_is_stored():
    api = LabelStudioInMemory(50)
    record, _ = run_job(api)
    assert record.state == "done"
    assert (record.done, record.failed, record.written) == (45, 5, 45)
    assert {i for i, v in api.stored.items() if v == [VERSION]} == {i for i in api.tasks if i % 10}
    assert [f["task"] for f in record.failures] == [10, 20, 30, 40, 50]
    assert all(f["reason"] == "http_404" for f in record.failures)
    again, _ = run_job(api)  # a re-run finds only the failed ones and writes nothing twice
    assert (again.written, again.failed) == (0, 5)
    assert all(len(v) == 1 for v in api.stored.values())


def test_a_task_that_gained_a_prediction_meanwhile_is_not_written_again():
    api = LabelStudioInMemory(20)

    async def predict_and_race(task, config):
        if task["id"] == 3:  # e.g. an annotator's /predict stored it while the job ran
            api.stored.setdefault(3, []).append(VERSION)
        return {"result": [], "score": None, "model_version": VERSION}

    record, _ = run_job(api, predict=predict_and_race)
    assert (record.state, record.done, record.written) == ("done", 20, 19)
    assert api.stored[3] == [VERSION]


@pytest.mark.parametrize("status, calls", [(401, 1), (500, 4)])
def test_refused_write_back_fails_the_job_and_counts_nothing_done(status, calls, monkeypatch):
    monkeypatch.setattr("mmdet_ls.jobs.asyncio.sleep", _no_sleep)
    api = LabelStudioInMemory(30)
    api.refuse = status
    record, _ = run_job(api)
    assert record.state == "failed" and f"HTTP {status}" in record.message, record
    assert (record.done, record.written) == (0, 0) and not api.stored
    assert api.import_calls == calls  # 500 is retried, 401 is not


def test_an_import_whose_answer_was_lost_is_not_written_twice(monkeypatch):
    monkeypatch.setattr("mmdet_ls.jobs.asyncio.sleep", _no_sleep)
    api = LabelStudioInMemory(30)
    api.lose_answers = 2
    record, _ = run_job(api)
    assert (record.state, record.done) == ("done", 27)
    assert record.written < 27  # the two lost answers' chunks were found stored, not written again
    assert len(api.stored) == 27 and all(v == [VERSION] for v in api.stored.values()), api.stored


def test_a_prediction_label_studio_dropped_silently_is_a_failure_not_done():
    api = LabelStudioInMemory(20)
    api.drop_tasks = {4, 7}
    record, _ = run_job(api)
    assert (record.state, record.done, record.written) == ("done", 16, 16)
    assert sorted(f["task"] for f in record.failures if f["reason"] == "not_stored") == [4, 7]
    assert record.failed == 2 + 2  # tasks 10 and 20 had no image


_real_sleep = asyncio.sleep


async def _no_sleep(seconds, *args):
    await _real_sleep(0)


def test_cancel_stops_the_feed_and_writes_what_is_in_flight():
    api = LabelStudioInMemory(200)
    holder = {}

    async def slow(task, config):
        await asyncio.sleep(0.001)
        if task["id"] == 12:
            holder["job"].cancel()
        return {"result": [], "score": None, "model_version": VERSION}

    record = JobRecord.new("bulk", 1, VERSION)
    claims = Claims()
    job = JobRun(record, api, slow, claims, inflight_tasks=4, write_chunk=50)
    holder["job"] = job
    asyncio.run(job.run(pending_task_pages(api, record, claims, page_size=50), CONFIG))
    assert record.state == "cancelled"
    assert 12 <= record.done < 20 and record.written == len(api.stored) == record.done
    # After the end only the written tasks stay held (for a while, against a late click).
    assert {t for t in api.tasks if claims.holder(1, t)} == set(api.stored)


def test_claims_keep_two_paths_off_one_task():
    now = [0.0]
    claims = Claims(clock=lambda: now[0])
    assert claims.claim(1, [1, 2, 3], "predict-a", lease_s=10) == {}
    assert claims.claim(1, [2, 3, 4], "job-b") == {2: "predict-a", 3: "predict-a"}
    assert claims.claim(2, [2], "job-b") == {}  # another project's task 2
    claims.release(1, [1, 2], "predict-a", linger_s=5)  # answered: held until Label Studio stored it
    now[0] = 4.0
    assert claims.holder(1, 2) == "predict-a"
    assert claims.claim(1, [2], "job-b") == {2: "predict-a"}  # against jobs...
    assert claims.claim(1, [1], "predict-c", lease_s=10, for_predict=True) == {}  # ...not against a /predict
    assert claims.claim(1, [1], "job-b") == {1: "predict-c"}
    now[0] = 6.0
    assert claims.holder(1, 2) is None and claims.claim(1, [2], "job-b") == {}
    assert claims.transfer(1, [3, 4], "predict-a", "job-c") == [3]
    assert claims.holder(1, 3) == "job-c" and claims.holder(1, 4) == "job-b"
    now[0] = 100.0  # a lease runs out even without a release
    claims.claim(1, [99], "x")
    assert claims.holder(1, 3) == "job-c"  # jobs' claims have no lease
    claims.release_owner("job-c")
    assert claims.holder(1, 3) is None
    # A job's written tasks stay held against /predict calls too, past the job's end.
    claims.claim(1, [50, 51], "job-d")
    claims.release(1, [50], "job-d", linger_s=5, against_predicts=True)
    claims.release_owner("job-d")
    assert claims.claim(1, [50, 51], "predict-e", lease_s=10, for_predict=True) == {50: "job-d"}
    now[0] = 106.0
    assert claims.claim(1, [50], "predict-e", lease_s=10, for_predict=True) == {}


def test_pages_skip_tasks_another_path_holds():
    api = LabelStudioInMemory(25)
    claims = Claims()
    claims.claim(1, [5, 6], "predict-x", lease_s=60)
    record = JobRecord.new("bulk", 1, VERSION)

    async def ids():
        return [t["id"] async for t in pending_task_pages(api, record, claims, page_size=10)]

    assert asyncio.run(ids()) == [i for i in range(1, 26) if i not in (5, 6)]
    assert record.skipped == 2


def test_background_queue_takes_more_until_it_ran_dry():
    queue = TaskQueue(max_tasks=3)
    assert queue.add([{"id": 1}, {"id": 2}])
    assert not queue.add([{"id": 3}, {"id": 4}])  # over the bound: refused whole

    async def drain():
        out = []
        async for task in queue:
            out.append(task["id"])
            if task["id"] == 1:
                assert queue.add([{"id": 3}])
        return out

    assert asyncio.run(drain()) == [1, 2, 3]
    assert queue.closed and not queue.add([{"id": 5}])


def test_record_progress_and_lost_message():
    record = JobRecord.new("bulk", 7, VERSION)
    record.total, record.done, record.failed, record.images = 100, 30, 10, 40
    record.started_at = 1000.0
    rate, eta = record.rates(now=1010.0)
    assert rate == 4.0 and eta == 15.0  # 40 tasks in 10 s, 60 left
    record.mark_lost()
    public = record.public()
    assert public["state"] == "lost" and "make annotate PROJECT=7" in public["message"]
    assert JobRecord.from_public(public) == record


def test_heavy_mask_predictions_are_written_in_imports_cut_by_size():
    """Brush masks make a prediction weigh up to megabytes: an import carries
    at most MAX_WRITE_CHUNK_BYTES (one prediction alone may exceed it), so no
    import body grows with the chunk count."""
    from mmdet_ls.jobs import MAX_WRITE_CHUNK_BYTES
    from mmdet_ls.regions import prediction_bytes

    api = LabelStudioInMemory(30)
    sizes: list[int] = []
    real_import = api.import_predictions

    def measuring_import(project, items):
        sizes.append(sum(prediction_bytes(i["result"]) for i in items))
        return real_import(project, items)

    api.import_predictions = measuring_import
    heavy = {"type": "brushlabels", "value": {"format": "rle", "rle": [7] * 1_000_000, "brushlabels": ["Car"]}}
    assert prediction_bytes([heavy]) > MAX_WRITE_CHUNK_BYTES // 5

    async def predict_heavy(task, config):
        return {"result": [heavy], "score": 0.9, "model_version": VERSION}

    record, _ = run_job(api, predict=predict_heavy)
    assert record.state == "done" and record.written == 30 and len(api.stored) == 30
    one = prediction_bytes([heavy])
    assert len(sizes) >= 30 * one // (MAX_WRITE_CHUNK_BYTES + one)
    assert all(size < MAX_WRITE_CHUNK_BYTES + one for size in sizes), sizes

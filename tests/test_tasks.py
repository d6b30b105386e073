from mmdet_ls.failures import TaskFailure
from mmdet_ls.label_config import parse_label_config
from mmdet_ls.regions import ImageResult
from mmdet_ls.tasks import assemble_results, plan_jobs

TWO_IMAGES = parse_label_config(
    '<View><Image name="a" value="$front"/><Image name="b" value="$back"/>'
    '<RectangleLabels name="la" toName="a"><Label value="Car"/></RectangleLabels>'
    '<RectangleLabels name="lb" toName="b"><Label value="Car"/></RectangleLabels></View>'
)


def test_plan_one_job_per_image_and_per_task_failures():
    tasks = [
        {"id": 1, "data": {"front": "http://x/1.png", "back": "http://x/2.png"}},
        {"id": 2, "data": {"front": "http://x/3.png"}},
        {"id": 3, "data": {"front": 5, "back": "x"}},
        "not a task",
        {"id": 5},
    ]
    jobs, failures = plan_jobs(tasks, TWO_IMAGES)
    assert [(j.task_index, j.value, [t.from_name for t in j.targets]) for j in jobs] == [
        (0, "http://x/1.png", ["la"]),
        (0, "http://x/2.png", ["lb"]),
    ]
    assert failures[1].message == 'task data has no "back" key (the label config reads the image from $back)'
    assert "must be an image URL string, got int" in failures[2].message
    assert "JSON object" in failures[3].message and '"data"' in failures[4].message


def test_assemble_keeps_task_order_and_merges_images():
    tasks = [{"id": i, "data": {"front": f"f{i}", "back": f"b{i}"}} for i in range(3)]
    jobs, failures = plan_jobs(tasks, TWO_IMAGES)
    region = lambda s: {"score": s}  # noqa: E731
    outcomes = [
        ImageResult(regions=[region(0.8)]), ImageResult(regions=[region(0.6)]),
        TaskFailure("http_404", "gone"), ImageResult(regions=[region(0.9)]),
        ImageResult(), ImageResult(),
    ]
    items = assemble_results(3, jobs, outcomes, failures, "v1")
    assert items[0]["result"] == [region(0.8), region(0.6)] and items[0]["model_version"] == "v1"
    assert abs(items[0]["score"] - 0.7) < 1e-9
    assert items[1] == {"error": "gone", "error_reason": "http_404", "retriable": False, "model_version": "v1"}
    assert items[2] == {"result": [], "score": 0.0, "model_version": "v1"}

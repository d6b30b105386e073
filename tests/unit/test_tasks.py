import json

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


def test_error_messages_are_bounded():
    from mmdet_ls.tasks import MAX_ERROR_CHARS, failure_item

    assert MAX_ERROR_CHARS == 500
    long_url = "http://127.0.0.3:99999/" + "a" * 70_000
    item = failure_item(TaskFailure("bad_url", f"URL has an invalid port: {long_url}"), "v1")
    assert len(item["error"]) == 500 and item["error"].endswith("...")
    assert item["error"].startswith("URL has an invalid port: http://127.0.0.3:99999/aaa")
    short = failure_item(TaskFailure("http_404", "x" * 500), "v1")
    assert short["error"] == "x" * 500


def test_regions_are_capped_per_response():
    from mmdet_ls.tasks import MAX_REGIONS_PER_RESPONSE

    assert MAX_REGIONS_PER_RESPONSE == 100_000
    config = parse_label_config(
        '<View><Image name="a" value="$image"/><RectangleLabels name="l" toName="a"><Label value="Car"/>'
        "</RectangleLabels></View>"
    )
    tasks = [{"id": i, "data": {"image": f"http://x/{i}.png"}} for i in range(103)]
    jobs, failures = plan_jobs(tasks, config)
    region = {"score": 0.5}
    # 100 tasks x 1000 regions reach the cap; the 101st does not fit, a smaller one later still does.
    outcomes = [ImageResult(regions=[region] * 1000) for _ in range(101)] + [ImageResult(), ImageResult([region])]
    items = assemble_results(103, jobs, outcomes, failures, "v1")
    assert all(len(item["result"]) == 1000 for item in items[:100])
    assert items[100] == {
        "error": "too many regions in one response (at most 100000, and 32 MB of mask data); this task was not "
                 "predicted, ask again for it in a call with fewer tasks",
        "error_reason": "too_many_regions", "retriable": True, "model_version": "v1",
    }
    assert items[101] == {"result": [], "score": 0.0, "model_version": "v1"}
    assert items[102]["error_reason"] == "too_many_regions"  # nothing is left after the 100,000
    assert sum(len(item.get("result", [])) for item in items) == 100_000
    # Any cap, same rule.
    small = assemble_results(3, jobs[:3], [ImageResult([region] * 2)] * 3, {}, "v1", max_regions=5)
    assert [len(i.get("result", [])) for i in small] == [2, 2, 0] and small[2]["error_reason"] == "too_many_regions"


def test_mask_payloads_are_capped_per_response():
    """Brush RLE and polygon points count against their own response budget:
    a task whose masks do not fit gets the retriable error, smaller later ones fit."""
    from mmdet_ls.regions import mask_payload_bytes
    from mmdet_ls.tasks import MAX_MASK_BYTES_PER_RESPONSE

    config = parse_label_config(
        '<View><Image name="a" value="$image"/><BrushLabels name="b" toName="a"><Label value="Car"/>'
        "</BrushLabels></View>")
    jobs, failures = plan_jobs([{"id": i, "data": {"image": f"http://x/{i}.png"}} for i in range(4)], config)
    brush = {"score": 0.9, "type": "brushlabels", "value": {"format": "rle", "rle": [1] * 1000, "brushlabels": ["Car"]}}
    polygon = {"score": 0.9, "type": "polygonlabels", "value": {"points": [[1, 1]] * 10, "polygonlabels": ["Car"]}}
    assert mask_payload_bytes(brush) == 4000 and mask_payload_bytes(polygon) == 180
    outcomes = [ImageResult([brush] * 2), ImageResult([brush] * 2), ImageResult([polygon]), ImageResult([brush])]
    items = assemble_results(4, jobs, outcomes, failures, "v1", max_mask_bytes=12_000)
    assert [len(i.get("result", [])) for i in items] == [2, 0, 1, 0]
    assert items[1]["error_reason"] == "too_many_regions" and items[1]["retriable"] is True
    assert "32 MB of mask data" in assemble_results(1, jobs[:1], [ImageResult([brush] * 9000)], {}, "v1")[0]["error"]
    assert 9000 * 4000 > MAX_MASK_BYTES_PER_RESPONSE


def test_overflow_item_is_compact_and_shaped_like_other_errors():
    from mmdet_ls.tasks import failure_item, too_many_tasks

    item = failure_item(too_many_tasks(1000), "rtmdet_toy-0123456789ab")
    assert item == {"error": "one call takes 1000 tasks; ask again", "error_reason": "too_many_tasks",
                    "retriable": True, "model_version": "rtmdet_toy-0123456789ab"}
    assert len(json.dumps(item, separators=(",", ":"))) < 150

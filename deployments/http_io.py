"""HTTP plumbing of the ingress: JSON bodies in (with caps), JSON answers out."""
from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import JSONResponse

from mmdet_ls.regions import ImageResult
from mmdet_ls.tasks import assemble_results, failure_item, too_many_tasks


def dumps_compact(value) -> bytes:
    """What SafeJSONResponse renders: ASCII only, no spaces."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message that
    quotes a lone surrogate from the request (valid in JSON text, not in
    UTF-8) still renders, instead of failing the whole response."""

    def render(self, content) -> bytes:
        return dumps_compact(content)


def error_response(status: int, message: str, **extra) -> JSONResponse:
    return SafeJSONResponse(status_code=status, content={"status": "error", "error": message, **extra})


def unauthorized_response() -> JSONResponse:
    resp = error_response(401, "authentication required")
    resp.headers["WWW-Authenticate"] = 'Basic realm="mmdet-backend"'
    return resp


# ------------------------------------------------ bounds on one /predict answer
# What one /predict call may cost, whatever it carries:
# - RESPONSE_BYTES_PER_BODY_BYTE, RESPONSE_SLACK_BYTES: tasks past the ones a
#   call predicts (max_tasks_per_request, max_images_per_request) get one
#   compact item each (~150 bytes, one short message shared by all); those
#   items must fit in 4 x the request body + 1 MiB, else the whole request is
#   refused with one 413 saying how many tasks a call may carry. The answer is
#   then at most 4 x body + 1 MiB + the predicted part, which is bounded by
#   max_tasks_per_request error items (messages cut to tasks.MAX_ERROR_CHARS)
#   and by regions (regions.MAX_REGIONS_PER_IMAGE, tasks.MAX_REGIONS_PER_RESPONSE).
# - MAX_BODY_JSON_VALUES: a body with more JSON values than this (commas,
#   "[" and "{" counted in its bytes, before parsing) is refused with a 413:
#   json.loads holds the GIL from start to end, so a thread does not keep a
#   parse of millions of tiny values (32 MiB of "[]," took 2 s) from stalling
#   the event loop that answers /health; 2 million values parse in ~0.2 s.
#   (A 32 MiB body of real Label Studio tasks, ~500 bytes each, has ~1.8 million.)
# - THREAD_PARSE_BYTES: bodies past this size are parsed in a worker thread;
#   answers past THREAD_RENDER_ITEMS items or THREAD_RENDER_REGIONS regions
#   are assembled and rendered in one, so the event loop keeps answering.
RESPONSE_BYTES_PER_BODY_BYTE = 4
RESPONSE_SLACK_BYTES = 1 << 20
MAX_BODY_JSON_VALUES = 2_000_000
THREAD_PARSE_BYTES = 64 << 10
THREAD_RENDER_ITEMS = 100
THREAD_RENDER_REGIONS = 1000


def json_value_count(raw: bytes) -> int:
    """An upper bound on the values in a JSON text, from its bytes alone
    (commas, "[" and "{", also inside strings: an overestimate)."""
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{")


def parse_json_body(raw: bytes, max_values: int = MAX_BODY_JSON_VALUES) -> tuple[object, tuple[int, str] | None]:
    """(body, None) or (None, (status, message)); pure, safe to run in a thread."""
    if json_value_count(raw) > max_values:
        return None, (413, f"request body holds more than {max_values} JSON values")
    try:
        return json.loads(raw), None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, (400, f"request body is not valid JSON: {exc}")
    except (ValueError, RecursionError) as exc:
        # ValueError: an integer past Python's 4300-digit limit; RecursionError: nesting too deep.
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        return None, (400, f"request body is not valid JSON: {detail}")


async def read_json_body(request: Request, max_bytes: int, timeout_s: float, max_tasks: int):
    """(body, body size in bytes, None) or (None, 0, error response): the
    size cap, the time cap, the value cap and bad JSON; big bodies are
    parsed in a thread."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        return None, 0, error_response(413, f"request body is larger than {max_bytes} bytes")
    chunks, size = [], 0

    async def receive() -> bool:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                return False
            chunks.append(chunk)
        return True

    try:
        complete = await asyncio.wait_for(receive(), timeout=timeout_s)
    except asyncio.TimeoutError:  # a client trickling its body holds nothing for long
        return None, 0, error_response(408, f"request body not received within {timeout_s:g} s")
    if not complete:
        return None, 0, error_response(413, f"request body is larger than {max_bytes} bytes")
    if size == 0:
        return None, 0, error_response(400, "request body is empty; send a JSON object")
    raw = b"".join(chunks) if len(chunks) != 1 else chunks[0]
    chunks.clear()
    if size > THREAD_PARSE_BYTES:
        body, error = await asyncio.to_thread(parse_json_body, raw)
    else:
        body, error = parse_json_body(raw)
    if error:
        status, message = error
        if status == 413:
            message += f"; one call may carry at most {max_tasks} tasks: send the rest in later calls"
        return None, 0, error_response(status, message)
    if not isinstance(body, dict):
        return None, 0, error_response(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body, size, None


def plan_overflow(n_tasks: int, limit: int, body_bytes: int, model_version: str):
    """(the item each task past `limit` gets, rendered with its leading ",";
    how many get it; None), or (b"", 0, a 413) when those items would not
    fit in RESPONSE_BYTES_PER_BODY_BYTE x body + RESPONSE_SLACK_BYTES."""
    n_overflow = max(0, n_tasks - limit)
    overflow_item = b"," + dumps_compact(failure_item(too_many_tasks(limit), model_version))
    if n_overflow * len(overflow_item) > RESPONSE_BYTES_PER_BODY_BYTE * body_bytes + RESPONSE_SLACK_BYTES:
        return b"", 0, error_response(
            413, f"too many tasks in one request ({n_tasks}): one call may carry at most {limit} tasks "
                 "with this label config; send the rest in later calls",
        )
    return overflow_item, n_overflow, None


def render_predict_answer(
    n_accepted: int, jobs, outcomes, failures, model_version: str, overflow_item: bytes, n_overflow: int
) -> tuple[bytes, list[dict]]:
    """The /predict answer's bytes (what SafeJSONResponse would render) and the
    items of the predicted part. Item by item, so a thread rendering a big
    answer lets the event loop run between items; the overflow items are one
    rendered item repeated."""
    results = assemble_results(n_accepted, jobs, outcomes, failures, model_version)
    parts = [b'{"results":[', b",".join(dumps_compact(item) for item in results)]
    if n_overflow:
        parts.append(overflow_item * n_overflow)  # each starts with ","; n_accepted >= 1 here
    parts += [b'],"model_version":', dumps_compact(model_version), b"}"]
    return b"".join(parts), results


async def render_predict_answer_off_loop(
    n_accepted: int, jobs, outcomes, failures, model_version: str, overflow_item: bytes, n_overflow: int
) -> tuple[bytes, list[dict]]:
    """render_predict_answer, in a worker thread when the answer is big."""
    args = (n_accepted, jobs, outcomes, failures, model_version, overflow_item, n_overflow)
    n_regions = sum(len(o.regions) for o in outcomes if isinstance(o, ImageResult))
    if n_accepted + n_overflow > THREAD_RENDER_ITEMS or n_regions > THREAD_RENDER_REGIONS:
        return await asyncio.to_thread(render_predict_answer, *args)
    return render_predict_answer(*args)

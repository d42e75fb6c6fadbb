"""Log lines: one JSON object each in production, with the request and organisation they concern."""

import asyncio
import json
import logging

from driftlock_kernel.logs import JsonFormatter, TextFormatter, bind_org, bind_request


def record(message: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("authz_service.test", logging.WARNING, __file__, 1, message, args, exc_info)


def test_a_json_line_has_time_level_logger_message():
    line = json.loads(JsonFormatter().format(record("flush of %d units failed", 3)))
    assert line["level"] == "WARNING" and line["logger"] == "authz_service.test"
    assert line["message"] == "flush of 3 units failed"
    assert line["time"].endswith("Z") and "T" in line["time"]
    assert "request_id" not in line and "org_id" not in line


def test_a_multi_line_message_and_a_traceback_stay_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        text = JsonFormatter().format(record("first\nsecond", exc_info=sys.exc_info()))
    assert "\n" not in text
    line = json.loads(text)
    assert line["message"] == "first\nsecond" and "ValueError: boom" in line["exception"]


async def test_request_and_org_follow_the_task_that_serves_the_request():
    async def serve(request_id: str, org_id: str | None) -> dict:
        bind_request(request_id)
        await asyncio.sleep(0)  # another request runs meanwhile
        bind_org(org_id)
        await asyncio.sleep(0)
        return json.loads(JsonFormatter().format(record("checked")))

    first, second = await asyncio.gather(serve("req-1", "org-1"), serve("req-2", None))
    assert (first["request_id"], first["org_id"]) == ("req-1", "org-1")
    assert second["request_id"] == "req-2" and "org_id" not in second


def test_text_lines_are_for_people():
    bind_request("req-9")
    try:
        text = TextFormatter().format(record("refused"))
    finally:
        bind_request(None)
    assert "WARNING authz_service.test: refused [request_id=req-9]" in text
    assert not text.startswith("{")

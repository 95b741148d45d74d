"""plait.logs: the JSON and text log formats (one object per line, trace ids, context)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from plait.logs import configure_logging

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_one_object_per_line_with_context(restore_root: None) -> None:
    buf = io.StringIO()
    configure_logging("json", "INFO", stream=buf)
    log = logging.getLogger("plait.test.logs")
    log.debug("not at INFO")
    log.info(
        "lease %s\nstarted",
        "l-1",
        extra={"workflow_id": "wf-1", "action_id": "a", "worker_id": "w1", "lease_id": "l-1"},
    )
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    got = lines(buf)
    assert len(got) == 2, buf.getvalue()
    first, second = got
    assert RFC3339_UTC.fullmatch(str(first["ts"])), first["ts"]
    assert first["level"] == "INFO"
    assert first["logger"] == "plait.test.logs"
    assert first["message"] == "lease l-1\nstarted"
    assert first["workflow_id"] == "wf-1"
    assert first["action_id"] == "a"
    assert first["worker_id"] == "w1"
    assert first["lease_id"] == "l-1"
    assert "trace_id" not in first and "exc_info" not in first
    assert second["level"] == "ERROR"
    assert "ValueError: boom" in str(second["exc_info"])
    assert "Traceback" in str(second["exc_info"])


def test_json_trace_ids_from_the_current_span(restore_root: None) -> None:
    buf = io.StringIO()
    configure_logging("json", logging.INFO, stream=buf)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("outer") as span:
        logging.getLogger("plait.test").info("inside")
    logging.getLogger("plait.test").info("outside")
    inside, outside = lines(buf)
    ctx = span.get_span_context()
    assert inside["trace_id"] == f"{ctx.trace_id:032x}"
    assert inside["span_id"] == f"{ctx.span_id:016x}"
    assert "trace_id" not in outside


def test_json_trace_ids_from_extras(restore_root: None) -> None:
    buf = io.StringIO()
    configure_logging("json", "INFO", stream=buf)
    logging.getLogger("plait.test").warning(
        "late", extra={"trace_id": "ab" * 16, "span_id": "cd" * 8}
    )
    (line,) = lines(buf)
    assert line["trace_id"] == "ab" * 16
    assert line["span_id"] == "cd" * 8


def test_text_format_keeps_context_and_reconfiguring_replaces(restore_root: None) -> None:
    first = io.StringIO()
    configure_logging("json", "INFO", stream=first)
    buf = io.StringIO()
    configure_logging("text", "WARNING", stream=buf)
    log = logging.getLogger("plait.test")
    log.info("dropped")
    log.warning("slow %d", 3, extra={"worker_id": "w9"})
    assert first.getvalue() == ""  # the earlier handler was replaced, not kept
    (text,) = buf.getvalue().splitlines()
    assert text.endswith("WARNING plait.test: slow 3 [worker_id=w9]"), text


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="format"):
        configure_logging("xml", "INFO")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        configure_logging("json", "LOUD")


def test_attempt_fields_reach_every_line_inside_and_only_there(restore_root: None) -> None:
    """log_fields (a block), bind_log_fields (a task's own context) and set_process_fields:
    lines logged on behalf of an attempt name it without passing extra= each time."""
    import asyncio
    import threading

    from plait import logs

    buf = io.StringIO()
    configure_logging("json", "INFO", stream=buf)
    log = logging.getLogger("plait.test.fields")
    logs.set_process_fields(worker_id="w9")
    try:
        with logs.log_fields(workflow_id="wf-1", action_id="a", lease_id="wf-1/a/1"):
            log.info("inside")
            log.info("extra wins", extra={"action_id": "b"})
        log.info("outside")

        async def attempt(n: int) -> None:
            logs.bind_log_fields(workflow_id="wf-2", action_id=f"t{n}", lease_id=f"wf-2/t{n}/1")
            await asyncio.sleep(0)
            log.info("in task %d", n)

        async def both() -> None:
            await asyncio.gather(attempt(1), attempt(2))
            log.info("after the tasks")

        asyncio.run(both())

        def in_thread() -> None:
            with logs.log_fields(workflow_id="wf-3", action_id="s", lease_id="wf-3/s/1"):
                log.info("in thread")

        th = threading.Thread(target=in_thread)
        th.start()
        th.join()
    finally:
        logs._PROCESS_FIELDS.clear()
    got = {str(line["message"]): line for line in lines(buf)}
    assert got["inside"]["action_id"] == "a" and got["inside"]["lease_id"] == "wf-1/a/1"
    assert got["extra wins"]["action_id"] == "b"
    assert "action_id" not in got["outside"] and got["outside"]["worker_id"] == "w9"
    assert got["in task 1"]["action_id"] == "t1" and got["in task 2"]["action_id"] == "t2"
    assert "action_id" not in got["after the tasks"]  # a task's fields ended with it
    assert got["in thread"]["workflow_id"] == "wf-3"
    assert all(line["worker_id"] == "w9" for line in got.values())

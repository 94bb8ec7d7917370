"""Log formats: CHAT_LOG_FORMAT=json gives one parseable object per line with the start
line's figures as fields; the text default is unchanged. Real processes: greenchat serve
and gunicorn with gunicorn.conf.py."""

from __future__ import annotations

import json
import logging
import re
import sys

from chat.logs import JsonFormatter
from helpers import greenchat_argv

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", "127.0.0.1:0"]


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_serve_with_json_format_prints_a_parseable_start_line_with_bind_and_backplane(start_server):
    server = start_server(greenchat_argv(), env={"CHAT_LOG_FORMAT": "json"})
    start = json_lines(server.output)[0]  # every line parses, or json.loads raises
    assert start["level"] == "INFO" and start["logger"] == "chat.server"
    assert start["bind"] == f"127.0.0.1:{server.port}"
    assert start["backplane"] == "memory" and start["workers"] == 1
    assert start["pid"] == server.pid and start["max_clients"] > 0 and start["backlog"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", start["time"])
    assert start["message"].startswith(f"greenchat listening on http://127.0.0.1:{server.port}")


def test_serve_prints_the_text_start_line_by_default(start_server):
    server = start_server(greenchat_argv())
    first = server.lines[0]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO chat\.server: greenchat "
                    rf"listening on http://127\.0\.0\.1:{server.port} \(pid {server.pid}, ", first)
    assert "backplane: memory" in first and not first.startswith("{")


def test_gunicorn_with_json_format_logs_every_line_as_json_with_a_worker_start_line(start_server):
    server = start_server(GUNICORN, env={"CHAT_LOG_FORMAT": "json"})
    server.wait_stats(lambda stats: any("ready on" in line for line in server.lines), timeout=20)
    lines = json_lines(server.output)
    assert any(line["logger"] == "gunicorn.error" and "Listening at:" in line["message"]
               for line in lines)
    worker = next(line for line in lines if line["logger"] == "chat.worker")
    assert worker["bind"] == [f"http://127.0.0.1:{server.port}"]
    assert worker["backplane"] == "memory" and worker["workers"] == 1
    assert worker["max_clients"] > 1000  # not gunicorn's default of 1000


def test_gunicorn_keeps_its_text_lines_by_default_and_prints_each_once(start_server):
    server = start_server(GUNICORN)
    server.wait_stats(lambda stats: any("ready on" in line for line in server.lines), timeout=20)
    listening = [line for line in server.lines if "Listening at:" in line]
    assert len(listening) == 1 and re.match(r"\[\d{4}-\d\d-\d\d [\d:]+ [+-]\d{4}\] \[\d+\] \[INFO\] ",
                                            listening[0])
    assert any(f"greenchat worker 1 ready on http://127.0.0.1:{server.port}" in line
               for line in server.lines)


def test_a_json_line_carries_the_extras_and_the_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("chat.hub", logging.ERROR, __file__, 1, "lost %d", (3,),
                                   sys.exc_info())
    record.room = "lobby"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "lost 3" and entry["room"] == "lobby"
    assert entry["level"] == "ERROR" and "ValueError: boom" in entry["exception"]

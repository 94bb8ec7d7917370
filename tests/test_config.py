"""Settings: how the environment is read, and README's table kept equal to the declaration."""

from __future__ import annotations

import os
import subprocess
import urllib.request

import pytest

from chat.config import SETTINGS, from_environ, settings_table
from helpers import ROOT, greenchat_argv


def test_a_string_setting_set_to_digits_in_the_environment_keeps_the_string(start_server):
    # A token of digits used to be read as JSON into an int, and the server refused to start.
    server = start_server(greenchat_argv(), env={"CHAT_PUBLISH_TOKEN": "123456"})
    request = urllib.request.Request(server.url + "/rooms/general/messages", data=b"hello",
                                     headers={"Authorization": "Bearer 123456"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 204


def test_every_string_setting_takes_the_environment_value_as_it_is():
    environ = {"CHAT_REDIS_CHANNEL": "2026", "CHAT_ALLOWED_ORIGINS": "null",
               "CHAT_PUBLISH_TOKEN": '"quoted"'}
    assert from_environ(environ) == environ


def test_other_settings_are_read_as_json_from_the_environment():
    assert from_environ({"CHAT_PAGE": "false", "CHAT_RATE_LIMIT": "2.5", "CHAT_HISTORY": "100",
                         "UNRELATED": "x"}) == {
        "CHAT_PAGE": False, "CHAT_RATE_LIMIT": 2.5, "CHAT_HISTORY": 100}


def test_readme_holds_exactly_the_settings_table_generated_from_the_declaration():
    readme = (ROOT / "README.md").read_text()
    table = settings_table()
    assert table in readme, (
        "README.md's settings table differs from chat/config.py's SETTINGS; replace it with "
        f"the output of `make settings-table`:\n{table}")
    rows = [line for line in readme.splitlines() if line.startswith("| `CHAT_")]
    assert len(rows) == len(SETTINGS), "README.md has settings rows that SETTINGS does not declare"


def test_every_setting_has_a_one_line_doc_that_fits_in_a_table():
    for setting in SETTINGS:
        assert setting.doc and "\n" not in setting.doc and "|" not in setting.doc, setting.name


def test_a_backlog_bound_smaller_than_one_message_is_refused_in_one_line():
    from chat.config import ConfigError, DEFAULTS, validate

    config = {**DEFAULTS, "CHAT_MAX_MESSAGE_SIZE": 100_000, "CHAT_MAX_BACKLOG": 100_009}
    with pytest.raises(ConfigError, match=r"CHAT_MAX_BACKLOG \(100009\) must be at least "
                                          r"CHAT_MAX_MESSAGE_SIZE \+ 10 \(100010\)"):
        validate(config)
    validate({**config, "CHAT_MAX_BACKLOG": 100_010})
    with_history = {**config, "CHAT_MAX_BACKLOG": 100_010, "CHAT_HISTORY": 5,
                    "CHAT_HISTORY_BYTES": 50_000}
    with pytest.raises(ConfigError, match=r"\+ CHAT_HISTORY_BYTES \(150010\)"):
        validate(with_history)


def test_greenchat_serve_refuses_contradicting_limits_with_one_line_and_status_2():
    result = subprocess.run(greenchat_argv(), env={**os.environ, "CHAT_MAX_BACKLOG": "1000"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "CHAT_MAX_BACKLOG (1000) must be at least" in result.stderr

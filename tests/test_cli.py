"""The greenchat command: bad input gets one line and a non-zero exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest


def run_greenchat(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chat", *args], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("args, message", [
    (["serve", "--port", "70000"], "port must be 0-65535, got 70000"),
    (["serve", "--backlog", "0"], "must be a positive integer, got 0"),
    (["serve", "--bogus"], "unrecognized arguments: --bogus"),
    (["serve", "--log-format", "xml"], "invalid choice: 'xml'"),
    (["doctor", "--connections", "-5"], "must be a positive integer, got -5"),
    ([], "the following arguments are required: COMMAND"),
])
def test_a_bad_option_gets_one_line_and_exit_status_2(args, message):
    result = run_greenchat(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_bad_setting_in_the_environment_gets_one_line_and_exit_status_2():
    result = run_greenchat("serve", "--port", "0", env={"CHAT_MAX_MESSAGE_SIZE": "0"})
    assert result.returncode == 2
    assert result.stderr.strip() == "greenchat: CHAT_MAX_MESSAGE_SIZE must be positive, got 0"


def test_a_port_in_use_gets_one_line_and_exit_status_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_greenchat("serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_python_dash_m_chat_and_the_console_script_are_the_same_command():
    script = os.path.join(os.path.dirname(sys.executable), "greenchat")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "serve" in result.stdout

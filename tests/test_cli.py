"""The command line: bad options are one line and exit code 2."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def arservice(*args):
    return subprocess.run([sys.executable, "-m", "arservice", *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args,words", [
    (["--runner", "local", "--max-resources", "{instances: 5"], "--max-resources is not valid JSON"),
    (["--runner", "local", "--max-resources", "[5]"], "must be a JSON object"),
    (["--runner", "local", "--max-resources", '{"instnces": 5}'], "unknown key(s) instnces"),
    (["--runner", "local", "--max-resources", '{"instances": -1}'], "non-negative"),
    (["--runner", "kubernetes"], "unknown runner 'kubernetes'"),
    (["--runner", "local", "--environments", "/nonexistent/presets.json"], "cannot read --environments file"),
    ([], "--runner is required"),
])
def test_bad_options_are_one_line_and_exit_2(args, words):
    result = arservice(*args)
    assert result.returncode == 2
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content,words", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"py": "local"}), "must map preset names"),
    (json.dumps({"py": {"type": "local", "timeout": "x"}}), "preset 'py'"),
    (json.dumps({"py": {"type": "wat"}}), "unknown environment type"),
])
def test_bad_presets_file(tmp_path, content, words):
    path = tmp_path / "presets.json"
    path.write_text(content)
    result = arservice("--runner", "local", "--environments", str(path))
    assert result.returncode == 2 and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_agent_needs_a_broker():
    result = arservice("agent")
    assert result.returncode == 2 and "--broker" in result.stderr


def test_port_in_use_is_a_clear_error():
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = arservice("--runner", "local", "--port", "0", "--zmq-port", str(port))
    assert result.returncode == 2 and "cannot listen" in result.stderr


def test_help_lists_the_options():
    result = arservice("--help")
    assert result.returncode == 0
    for option in ("--runner", "--port", "--max-resources", "--environments", "--token"):
        assert option in result.stdout


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::"])
def test_binding_beyond_loopback_needs_a_token(host):
    result = arservice("--runner", "local", "--host", host)
    assert result.returncode == 2
    assert "set --token" in result.stderr and host in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

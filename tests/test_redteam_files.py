"""Attacks by a hostile instance on the host through the files and mounts it shares with the
agent (issue 12 items 2, 3 and 6, tried again after they were fixed). Each test is one attack
through the real service; it fails while the attack works."""

import os
import shutil
import stat
import subprocess

import pytest
from backends import SPECS, params
from helpers import Service

NOBODY = 65534


@pytest.fixture(scope="module")
def service():
    svc = Service("--runner", "local", "--agents", "1", "--max-resources", '{"instances": 8}').wait_ready()
    yield svc
    assert svc.stop() == 0


@pytest.fixture(scope="module")
def client(service):
    return service.client


@pytest.mark.parametrize("name", params("bubblewrap", "bubblewrap-per-command"))
def test_a_sandbox_cannot_make_read_only_host_binds_writable(client, tmp_path, name):
    """bwrap run by a root agent keeps every capability inside the sandbox, CAP_SYS_ADMIN over
    its own mount namespace included: `mount -o remount,bind,rw` turns the read-only binds of
    the host's /usr and /etc (and of `root`, and of any --ro-bind) into writable ones, and the
    sandbox's root is the host's root."""
    host = tmp_path / "ro"
    host.mkdir()
    (host / "f").write_text("host only\n")
    instance_id = client.start_instance({**SPECS[name], "bwrap_options": ["--ro-bind", str(host), "/ro"]})["instance_id"]
    try:
        # /usr is only checked (`[ -w ]` is false on a read-only mount, even for root), never written.
        output = client.execute(instance_id, "mount -o remount,bind,rw /ro 2>/dev/null; echo sandbox >/ro/f 2>/dev/null; "
                                             "mount -o remount,bind,rw /usr 2>/dev/null; [ -w /usr ] && echo usr-writable; "
                                             "true")["output"]
        assert (host / "f").read_text() == "host only\n", "the sandbox wrote into a host directory bound read-only"
        assert "usr-writable" not in output, "the sandbox made the host's /usr writable"
    finally:
        client.close_instance(instance_id)

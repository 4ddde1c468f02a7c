"""What an instance can do to the host through the files it shares with the agent: races with
symlinks, FIFOs and other special files, filling the host's disk."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from backends import SPECS, params
from helpers import Service, wait_for

from arservice.client import ServiceError

# Runs inside a bubblewrap sandbox with the host's /usr: swaps /work/d (a directory) and
# /work/link (a symlink to a host directory) as fast as it can, so that a check of d on the host
# and the open that follows it may see different things.
SWAPPER = r"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
while True:
    libc.renameat2(AT_FDCWD, b"/work/d", AT_FDCWD, b"/work/link", RENAME_EXCHANGE)
"""
RACE_TRIES = 10_000


@pytest.fixture(scope="module")
def service():
    svc = Service("--runner", "local", "--agents", "1", "--max-resources", '{"instances": 8}').wait_ready()
    yield svc
    assert svc.stop() == 0


@pytest.fixture(scope="module")
def client(service):
    return service.client


@pytest.mark.parametrize("name", params("bubblewrap"))
def test_a_sandbox_racing_symlink_swaps_never_reaches_host_files(client, tmp_path, name):
    """write_file and read_file under /work while the sandbox swaps a directory on the way
    with a symlink to the host: not one try may land on or read from the host."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("host only\n")
    instance_id = client.start_instance(SPECS[name])["instance_id"]
    try:
        client.write_file(instance_id, "/work/swap.py", SWAPPER)
        setup = (f"mkdir /work/d && echo sandbox > /work/d/secret && ln -s {host} /work/link && "
                 "(python3 /work/swap.py </dev/null >/dev/null 2>&1 &)")
        assert client.execute(instance_id, setup)["returncode"] == 0
        wait_for(lambda: client.execute(instance_id, "[ -L /work/d ]")["returncode"] == 0, what="the swapper running")
        outcomes = {"written": 0, "read": 0, "refused": 0}
        leaked = []
        lock = threading.Lock()

        def attempt(i):
            try:
                if i % 2:
                    client.write_file(instance_id, f"d/pwn-{i}", "x")
                    outcome = "written"
                else:
                    content = client.read_file(instance_id, "d/secret")
                    if b"host" in content:
                        leaked.append(content)
                    outcome = "read"
            except ServiceError as exc:
                outcome = "refused" if exc.code in ("invalid_request", "not_found") else exc.code
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(attempt, range(RACE_TRIES)))
        print(f"{RACE_TRIES} tries in {time.monotonic() - started:.1f}s: {outcomes}")
        assert sorted(p.name for p in host.iterdir()) == ["secret"], "a write landed on the host"
        assert (host / "secret").read_text() == "host only\n"
        assert leaked == [], "a read returned a host file"
        assert set(outcomes) == {"written", "read", "refused"}, f"errors other than a refusal: {outcomes}"
        # The race was real: some tries met the directory, some the symlink.
        assert outcomes["refused"] > 0 and outcomes["written"] > 0 and outcomes["read"] > 0, outcomes
    finally:
        client.close_instance(instance_id)

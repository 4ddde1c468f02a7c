import json
import os
import shutil
import tempfile

import pytest

from arservice.client import ServiceError

from backends import SPECS
from helpers import Service

# The core suite (`pytest --core`): every test that needs no system daemon, the set CI runs on each
# Python from 3.10 to 3.13. A test needs a daemon when its module is listed here or when it runs
# on a backend spec (tests/backends.py) other than local. The core run makes the daemons present
# but broken (the docker and podman addresses lead to a file that is no socket; bwrap, docker,
# podman and Slurm's commands exit 97 naming this file), so a test that needs one and is not
# classified here fails there, loudly, even one that first checks whether its daemon is there.
# Modules that need a system component (daemons, Chromium) or an extra the core run leaves out
# (minisweagent). The chaos test drives docker and bubblewrap instances and restarts dockerd.
DAEMON_MODULES = {"test_containers.py", "test_bubblewrap.py", "test_slurm.py", "test_slurm_multinode.py",
                  "test_status_page.py", "test_minisweagent.py", "test_chaos.py", "test_reaper.py"}
BROKEN_COMMANDS = ("bwrap", "docker", "podman", "sbatch", "squeue", "scancel", "sinfo", "srun", "scontrol")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--core", action="store_true",
                     help="run only the tests that need no system daemon (docker, podman, bwrap, Slurm, sshd)")
    # CI runs these beside the core suites (one of them on this Python): the full suite in two parts.
    parser.addoption("--daemons", action="store_true", help="run only the tests that --core leaves out")


def needs_daemon(item: pytest.Item) -> bool:
    if item.path.name in DAEMON_MODULES or item.get_closest_marker("daemon"):
        return True
    params = getattr(item, "callspec", None)
    return params is not None and any(
        isinstance(value, str) and SPECS.get(value, {}).get("type", "local") != "local"
        for value in params.params.values())


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("core") and config.getoption("daemons"):
        raise pytest.UsageError("--core and --daemons each leave out what the other runs: give one")
    if not config.getoption("core"):
        return
    # Environment variables reach the services the tests start, so their agents get the same.
    shims = tempfile.mkdtemp(prefix="arservice-core-shims-")
    config.add_cleanup(lambda: shutil.rmtree(shims, ignore_errors=True))
    no_socket = os.path.join(shims, "engine.sock")
    open(no_socket, "w").close()
    os.environ["DOCKER_HOST"] = os.environ["CONTAINER_HOST"] = f"unix://{no_socket}"
    for name in BROKEN_COMMANDS:
        path = os.path.join(shims, name)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\necho 'tests/conftest.py: {name} is broken on purpose in the core suite (pytest --core); "
                    f"a test that needs it belongs in DAEMON_MODULES' >&2\nexit 97\n")
        os.chmod(path, 0o755)
    os.environ["PATH"] = shims + os.pathsep + os.environ["PATH"]


def pytest_ignore_collect(collection_path, config: pytest.Config) -> bool | None:
    # Not even imported: test_minisweagent.py imports an extra the core venvs leave out.
    return True if config.getoption("core") and collection_path.name in DAEMON_MODULES else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not (config.getoption("core") or config.getoption("daemons")):
        return
    core, daemon = [], []
    for item in items:
        (daemon if needs_daemon(item) else core).append(item)
    if config.getoption("daemons"):
        config.hook.pytest_deselected(items=core)
        items[:] = daemon
        return
    config.hook.pytest_deselected(items=daemon)
    # ARSERVICE_CORE_ROTATE=K/N starts the run at the K-th of N equal parts of the module list:
    # suites run side by side (scripts/test-matrix.sh) then rarely run the same test (its fixed
    # process markers, the agents it kills) at the same moment.
    part, _, parts = os.environ.get("ARSERVICE_CORE_ROTATE", "0/1").partition("/")
    modules = list(dict.fromkeys(item.path for item in core))
    first = modules[len(modules) * int(part) // int(parts)] if core else None
    start = next((i for i, item in enumerate(core) if item.path == first), 0)
    items[:] = core[start:] + core[:start]


MAX_REQUEST_BYTES = 1 << 20

PRESETS = {
    "py": {"type": "local", "cwd": "/tmp", "env": {"PAGER": "cat"}, "timeout": 60},
    "small": {"type": "local", "output_limit": 64},
}


@pytest.fixture(scope="module")
def presets_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("presets") / "presets.json"
    path.write_text(json.dumps(PRESETS))
    return str(path)


@pytest.fixture(scope="module")
def service(presets_file):
    """One service with two agents, shared by a module's tests; each test closes what it starts."""
    svc = Service("--runner", "local", "--agents", "2", "--max-resources", '{"instances": 8}',
                  "--environments", presets_file, "--agent-timeout", "3",
                  "--max-request-bytes", str(MAX_REQUEST_BYTES)).wait_ready(agents=2)
    yield svc
    assert svc.stop() == 0


@pytest.fixture(scope="module")
def one_agent_service():
    """One service with one agent and room for 8 instances, shared by a module's tests."""
    svc = Service("--runner", "local", "--agents", "1", "--max-resources", '{"instances": 8}').wait_ready()
    yield svc
    assert svc.stop() == 0


@pytest.fixture
def instance(service):
    """A fresh local instance on the shared service, closed afterwards."""
    inst = service.client.start_instance({"type": "local"})
    yield inst["instance_id"]
    try:
        service.client.close_instance(inst["instance_id"])
    except ServiceError as exc:
        assert exc.code == "not_found"  # the test closed it itself

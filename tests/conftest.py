import json

import pytest

from arservice.client import ServiceError

from helpers import Service

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


@pytest.fixture
def instance(service):
    """A fresh local instance on the shared service, closed afterwards."""
    inst = service.client.start_instance({"type": "local"})
    yield inst["instance_id"]
    try:
        service.client.close_instance(inst["instance_id"])
    except ServiceError as exc:
        assert exc.code == "not_found"  # the test closed it itself

"""The API's description (GET /openapi.json, GET /api) against a real service: it names every
route, error code and environment spec, and schemathesis checks a real service against it."""

import json
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from arservice import environments, protocol
from arservice.http import openapi
from arservice.schemas import REQUESTS

from helpers import Service

pytestmark = pytest.mark.timeout(300)
TOKEN = "openapi-test-token"


@pytest.fixture(scope="module")
def service():
    svc = Service("--runner", "local", "--max-resources", '{"instances": 4}', token=TOKEN).wait_ready()
    yield svc
    assert svc.stop() == 0


def get(service, path):
    """Without the token: the description holds no data."""
    with urllib.request.urlopen(service.url + path, timeout=30) as response:
        return response.headers["Content-Type"], response.read()


def test_the_served_description_names_every_route_error_code_and_spec(service):
    content_type, body = get(service, "/openapi.json")
    served = json.loads(body)
    assert content_type.startswith("application/json") and served == json.loads(json.dumps(openapi.document()))
    for path, (method, kind) in protocol.ROUTES.items():
        operation = served["paths"][path][method.lower()]
        assert operation["operationId"] == kind
        fields = (operation["requestBody"]["content"]["application/json"]["schema"]["properties"] if method == "POST"
                  else {p["name"]: p for p in operation["parameters"]})
        assert set(REQUESTS[kind].model_fields) <= set(fields), path
        statuses = {int(status) for status in operation["responses"] if status != "200"}
        assert statuses == set(protocol.ERROR_CODES.values()), path
    assert set(openapi.OTHER_ROUTES) <= set(served["paths"])
    assert served["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"] == \
        sorted(protocol.ERROR_CODES)
    for name in environments.BACKENDS:
        spec = served["components"]["schemas"][environments.backend(name).spec_model.__name__]
        assert spec["additionalProperties"] is False and "type" in spec["required"]
    # Every field a request takes is documented; its bounds come with it.
    timeout = served["components"]["schemas"]["Execute"]["properties"]["timeout"]["anyOf"][0]
    assert (timeout["exclusiveMinimum"], timeout["maximum"]) == (0, protocol.MAX_SECONDS)


def test_the_api_page_shows_every_route_and_spec(service):
    content_type, body = get(service, "/api")
    page = body.decode()
    assert content_type.startswith("text/html")
    for path, (method, _) in protocol.ROUTES.items():
        assert f"<code>{method} {path}</code>" in page
    assert "Environment spec: <code>DockerSpec</code>" in page and "container_timeout" in page


schema = schemathesis.openapi.from_dict(openapi.document())


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_service_keeps_to_its_description(case, service):
    """Requests made from the description: no server error, and every answer's status, content type
    and body are ones the description gives."""
    case.call_and_validate(base_url=service.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                           checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance])

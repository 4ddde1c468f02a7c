"""The HTTP API's description: an OpenAPI 3.1 document made from the route table
(protocol.ROUTES) and the request and environment models (schemas.py, each backend's spec
model), served at GET /openapi.json and shown as a page at GET /api. Nothing in it is written
twice: a field's type, bounds and doc are its model's."""

import html
import json
from typing import Any

import falcon
from pydantic.json_schema import models_json_schema

from .. import __version__, environments
from ..protocol import BYTES_IN, BYTES_OUT, ERROR_CODES, ROUTES, STREAMABLE
from ..schemas import REQUESTS

REF = "#/components/schemas/{model}"
# The routes the front end serves besides ROUTES (their own resources).
OTHER_ROUTES = {
    "/metrics": ("text/plain", "The broker's counters, gauges and histograms, as Prometheus text "
                               "(OpenMetrics with Accept: application/openmetrics-text)."),
    "/": ("text/html", "The status page: agents, instances, recent errors (it asks for the token)."),
    "/api": ("text/html", "This description, as a page."),
    "/openapi.json": ("application/json", "This description, as an OpenAPI 3.1 document."),
}
BASE64 = {"type": "boolean", "default": False,
          "description": "Bytes fields (a file's content, a command's output) as base64 instead of UTF-8 text."}


def _error_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"enum": sorted(ERROR_CODES)}, "message": {"type": "string"}}}}}


def _errors() -> dict[str, Any]:
    """Every error status, with the codes that answer with it."""
    statuses: dict[int, list[str]] = {}
    for code, status in ERROR_CODES.items():
        statuses.setdefault(status, []).append(code)
    return {str(status): {"description": ", ".join(codes),
                          "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
            for status, codes in sorted(statuses.items())}


def document() -> dict[str, Any]:
    """The OpenAPI document: each route of ROUTES with its request model (the body of a POST, the
    query of a GET), its result and every error status; the other routes; every spec model."""
    specs = dict.fromkeys(environments.backend(name).spec_model for name in environments.BACKENDS)
    models = [*REQUESTS.values(), *specs]
    _, components = models_json_schema([(model, "validation") for model in models], ref_template=REF)
    schemas = components.get("$defs", {})
    schemas["Error"] = _error_schema()
    errors = _errors()
    paths: dict[str, Any] = {}
    for path, (method, kind) in ROUTES.items():
        model = REQUESTS[kind]
        doc = (model.__doc__ or "").strip()
        operation: dict[str, Any] = {"operationId": kind, "summary": doc.split("\n")[0], "description": doc}
        content = {"application/json": {"schema": {"type": "object"}}}
        if kind in STREAMABLE:
            content["application/x-ndjson"] = {"schema": {"type": "object"}}
        operation["responses"] = {"200": {"description": f"The {kind} result (docs/protocol.md).", "content": content},
                                  **errors}
        schema = schemas[model.__name__]
        if method == "POST":
            body = dict(schema)
            if kind in BYTES_IN or kind in BYTES_OUT:
                body["properties"] = {**schema.get("properties", {}), "base64": BASE64}
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        else:
            required = set(schema.get("required", []))
            operation["parameters"] = [
                {"name": name, "in": "query", "required": name in required, "schema": field,
                 **({"description": field["description"]} if "description" in field else {})}
                for name, field in schema.get("properties", {}).items()]
        paths[path] = {method.lower(): operation}
    for path, (media, description) in OTHER_ROUTES.items():
        paths[path] = {"get": {"summary": description, "responses": {
            "200": {"description": description, "content": {media: {"schema": {
                "type": "object" if media == "application/json" else "string"}}}}, **errors}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "arservice", "version": __version__,
                 "description": "Agent Rollout Service: start environment instances, run shell commands in them, "
                                "close them. With a token, every route but /health, /api, /openapi.json, / and "
                                "/static/ needs `Authorization: Bearer TOKEN`. Environment specs: the *Spec schemas."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
    }


def page(description: dict[str, Any]) -> str:
    """The document as one readable page: each route with its fields, then each environment spec."""
    schemas = description["components"]["schemas"]

    def fields(schema: dict[str, Any]) -> str:
        required = set(schema.get("required", []))
        rows = "".join(
            f"<tr><td><code>{html.escape(name)}</code>{'' if name in required else '?'}</td>"
            f"<td><code>{html.escape(json.dumps({k: v for k, v in field.items() if k not in ('description', 'title')}))}"
            f"</code></td><td>{html.escape(field.get('description', ''))}</td></tr>"
            for name, field in schema.get("properties", {}).items())
        return f"<table><tr><th>field</th><th>schema</th><th>doc</th></tr>{rows}</table>" if rows else "<p>No fields.</p>"

    parts = [f"<h1>arservice API {html.escape(description['info']['version'])}</h1>",
             f"<p>{html.escape(description['info']['description'])} The same as "
             "<a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, methods in description["paths"].items():
        for method, operation in methods.items():
            parts.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                         f"<p>{html.escape(operation.get('description') or operation['summary'])}</p>")
            if "requestBody" in operation:
                parts.append(fields(operation["requestBody"]["content"]["application/json"]["schema"]))
            elif operation.get("parameters"):
                parts.append(fields({"properties": {p["name"]: p["schema"] for p in operation["parameters"]},
                                     "required": [p["name"] for p in operation["parameters"] if p["required"]]}))
    parts.append("<h2>Errors</h2><p>" + html.escape(json.dumps(schemas["Error"])) + "</p>")
    for name, schema in schemas.items():
        if name.endswith("Spec"):
            parts.append(f"<h2>Environment spec: <code>{html.escape(name)}</code></h2>{fields(schema)}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>arservice API</title><style>"
            "body{font-family:sans-serif;max-width:70em;margin:auto}td,th{border-bottom:1px solid #ddd;"
            "padding:4px;text-align:left;vertical-align:top}</style></head><body>" + "".join(parts) + "</body></html>")


class DescriptionResource:
    """GET /openapi.json and GET /api: made once, when the app is."""

    def __init__(self) -> None:
        description = document()
        self.json = json.dumps(description).encode()
        self.html = page(description).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self.json

    def on_get_page(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.data = self.html


def add_routes(app: falcon.App) -> None:
    resource = DescriptionResource()
    app.add_route("/openapi.json", resource)
    app.add_route("/api", resource, suffix="page")

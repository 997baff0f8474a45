"""The OpenAPI document at /openapi.json: valid OpenAPI 3.1, every route in it, and the
server's real responses conform to the schemas it names."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
from openapi_spec_validator import validate

from batchserve.http.bodies import B64_KEYS, IMAGE_KEYS, RequestLimits
from batchserve.http.inputs import ITEM_KEYS, ITEMS_KEYS, SEARCH_KEYS
from batchserve.http.openapi.document import document
from batchserve.http.v1 import BatchserveAPI
from batchserve.http.v2_wire import INPUT_KEYS, OUTPUT_KEYS, REQUEST_KEYS
from batchserve.testing import encode_multipart
from tests.unit.test_api import BLUE, RED, Harness, add


def served(h: Harness) -> dict[str, Any]:
    status, headers, doc = h.request("GET", "/openapi.json")
    assert status == 200 and headers["content-type"] == "application/json"
    return doc  # type: ignore[no-any-return]


FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


def conforms(doc: dict[str, Any], schema: str, body: Any) -> None:
    root = {**doc, "$ref": f"#/components/schemas/{schema}"}
    validator = jsonschema.Draft202012Validator(root, format_checker=FORMATS)
    validator.validate(body)


def test_the_document_is_valid_openapi_3_1_with_the_servers_own_limits() -> None:
    doc = served(Harness())  # the harness limits: 3 images, 200000 bytes
    validate(doc)
    images = doc["paths"]["/v1/embed"]["post"]["requestBody"]["content"]["application/json"]
    assert images["schema"]["properties"]["images"]["maxItems"] == 3
    assert document(RequestLimits()) != doc  # the defaults (64 images) differ


def test_every_route_is_in_the_document_with_its_methods() -> None:
    doc = document(RequestLimits())
    for rule in BatchserveAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule).replace("{item_id}", "{id}")
        assert path in doc["paths"], path
        methods = {m.lower() for m in rule.methods or ()} - {"head", "options"}
        assert methods <= set(doc["paths"][path]), (path, methods)


def test_the_servers_answers_conform_to_the_document() -> None:
    h = Harness()
    doc = served(h)
    status, _, body = h.post_image("/v1/embed", RED)
    assert status == 200
    conforms(doc, "Embeddings", body)
    conforms(doc, "Labels", h.post_image("/v1/classify?k=2", RED)[2])
    assert add(h, "red", RED, label="reds", colour="red")[0] == 200
    conforms(doc, "Matches", h.post_image("/v1/search?k=1", BLUE)[2])
    conforms(doc, "Matches", h.request("GET", "/v1/items/red/similar")[2])
    conforms(doc, "Item", h.request("GET", "/v1/items/red")[2])
    conforms(doc, "Index", h.request("GET", "/v1/index")[2])
    conforms(doc, "Model", h.request("GET", "/v1/model")[2])
    conforms(doc, "Status", h.request("GET", "/readyz")[2])
    conforms(doc, "Deleted", h.request("DELETE", "/v1/items/red")[2])
    body, content_type = encode_multipart([("image", "x.jpg", b"not an image")])
    status, _, error = h.post_image("/v1/embed", body, content_type)
    assert status == 400
    conforms(doc, "Error", error)
    added = h.request("POST", "/v1/items", json={"items": [{"id": "b", "b64": ""}]})
    conforms(doc, "Error", added[2])


def test_json_bodies_in_the_document_take_exactly_the_keys_the_server_reads() -> None:
    doc = document(RequestLimits(max_images=3))
    paths, components = doc["paths"], doc["components"]["schemas"]

    def body(path: str, kind: str = "application/json") -> dict[str, Any]:
        return paths[path]["post"]["requestBody"]["content"][kind]["schema"]  # type: ignore[no-any-return]

    items = body("/v1/items")["properties"]["items"]["items"]
    infer = components["InferRequest"]
    closed = [
        (body("/v1/embed"), IMAGE_KEYS),
        (body("/v1/search"), SEARCH_KEYS),
        (body("/v1/items"), ITEMS_KEYS),
        (items, ITEM_KEYS),
        (components["Base64Image"]["oneOf"][0], B64_KEYS),
        (infer, REQUEST_KEYS),
        (infer["properties"]["inputs"]["items"], INPUT_KEYS),
        (infer["properties"]["outputs"]["items"], OUTPUT_KEYS),
    ]
    for schema, keys in closed:
        assert schema["additionalProperties"] is False and set(schema["properties"]) == keys
    assert "at most 12 parts" in body("/v1/embed", "multipart/form-data")["description"]
    assert "at most 12 parts" in body("/v1/items", "multipart/form-data")["description"]

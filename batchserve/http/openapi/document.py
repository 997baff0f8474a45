"""The API's contract: an OpenAPI 3.1 document of every route, its parameters, the three
encodings of an image body (raw, multipart, base64 JSON), the responses and the error shape.
Served at ``GET /openapi.json``; its bounds come from the same constants and limits the
handlers enforce."""

from __future__ import annotations

from typing import Any

from batchserve.http import web
from batchserve.http.bodies import IMAGE_FIELDS, RequestLimits
from batchserve.http.inputs import (
    DEFAULT_K,
    DEFAULT_PAGE,
    DEFAULT_TOP_K,
    MAX_K,
    MAX_PAGE,
    MAX_TIMEOUT_MS,
    MIN_TIMEOUT_MS,
)
from batchserve.http.openapi.schemas import example_image_b64, ref, schemas
from batchserve.storage.records import MAX_LABEL_CHARS

Doc = dict[str, Any]

#: Statuses a route for the model may answer besides 200, and why.
_ERRORS = {
    "400": "invalid input (undecodable image, bad option, bad JSON, a JSON key it does not take)",
    "401": "a bearer token is required",
    "403": "the token does not grant this",
    "413": "the body, an image, the number of images or of multipart parts is over the limit",
    "415": "the Content-Type is not accepted",
    "503": "the model or the index is loading, the queue is full, or the server is draining",
    "504": "the request's deadline passed",
}

#: The document's version: the HTTP API's (its paths say /v1), not the software's, which
#: would tell an unauthenticated caller which known flaws to try (it is in the start-up log).
API_VERSION = "1"


def _json(schema: Doc) -> Doc:
    return {"application/json": {"schema": schema}}


def _errors(*codes: str) -> Doc:
    return {
        code: {"description": _ERRORS.get(code, "not found"), "content": _json(ref("Error"))}
        for code in codes
    }


def _ok(schema: str, description: str) -> Doc:
    return {"200": {"description": description, "content": _json(ref(schema))}}


def _images_body(limits: RequestLimits, extra_json: Doc | None = None) -> Doc:
    """A request body of one or more images, in any of the three encodings."""
    files = {"type": "array", "items": {"type": "string", "contentMediaType": "image/*"}}
    json_images: Doc = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "images": {
                "type": "array",
                "maxItems": limits.max_images,
                "items": ref("Base64Image"),
            },
            **(extra_json or {}),
        },
    }
    return {
        "required": True,
        "description": f"At most {limits.max_images} images and {limits.max_body_bytes} bytes; "
        f"a multipart body at most {limits.max_parts} parts. A JSON body holds no key but "
        "those listed.",
        "content": {
            "image/*": {"schema": {"type": "string", "contentMediaType": "image/*"}},
            "application/octet-stream": {"schema": {"type": "string"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": "Parts with a filename, or named "
                    + ", ".join(sorted(IMAGE_FIELDS))
                    + f", are images; at most {limits.max_parts} parts; a text field is "
                    "refused (400).",
                    "properties": {"image": files},
                    "additionalProperties": False,
                }
            },
            "application/json": {
                "schema": json_images,
                "example": {"images": [{"b64": example_image_b64()}]},
            },
        },
    }


def _items_body(limits: RequestLimits) -> Doc:
    item = {
        "type": "object",
        "required": ["id", "b64"],
        "additionalProperties": False,
        "properties": {
            "id": ref("ItemId"),
            "label": {"type": "string", "maxLength": MAX_LABEL_CHARS},
            "metadata": {"type": "object"},
            "b64": {"type": "string", "description": "the image, base64 (a data: URL too)"},
        },
    }
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": "One `id` per file; `label` and `metadata` (JSON text) "
                    "once for all files or once per file; at most "
                    f"{limits.max_parts} parts; any other text field is refused (400).",
                    "required": ["image", "id"],
                    "additionalProperties": False,
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string"}},
                        "id": {"type": "array", "items": ref("ItemId")},
                        "label": {"type": "array", "items": {"type": "string"}},
                        "metadata": {"type": "array", "items": {"type": "string"}},
                    },
                }
            },
            "application/json": {
                "example": {
                    "items": [{"id": "example-1", "label": "example", "b64": example_image_b64()}]
                },
                "schema": {
                    "type": "object",
                    "required": ["items"],
                    "additionalProperties": False,
                    "properties": {
                        "items": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": limits.max_images,
                            "items": item,
                        }
                    },
                },
            },
            "image/*": {
                "schema": {
                    "type": "string",
                    "description": "one image; its id (and label, metadata) in the query string",
                }
            },
        },
    }


def _parameter(name: str, schema: Doc, description: str, where: str = "query") -> Doc:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


def _search_parameters() -> list[Doc]:
    return [
        _parameter(
            "k",
            {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_K},
            "matches per query",
        ),
        _parameter(
            "min_score",
            {"type": "number", "minimum": -1, "maximum": 1},
            "least cosine similarity of a match",
        ),
        _parameter("label", {"type": "string"}, "search only items with this label"),
        _parameter(
            "same_class",
            {"type": "boolean", "default": False},
            "search only items whose predicted class is the query's",
        ),
        _parameter(
            "verify",
            {"type": "boolean"},
            "verify the embedding's shortlist (the server's verify_k) by local features: "
            "verified copies first, each match with verified, inliers and transform "
            "(default: the server's --verify); images only, not vectors",
        ),
    ]


_ITEM_ID = {
    **_parameter("id", ref("ItemId"), "the item's id", "path"),
    "example": "sample/cat",  # one of the demo photos
}

_DEADLINE = (
    f"the request's deadline in ms ({MIN_TIMEOUT_MS}-{MAX_TIMEOUT_MS}), capped by the "
    "server's own; 504 when it passes"
)


def _deadline_parameters() -> list[Doc]:
    """The request's own deadline: as a query parameter or as a header."""
    schema = {"type": "integer", "minimum": MIN_TIMEOUT_MS, "maximum": MAX_TIMEOUT_MS}
    return [
        _parameter("timeout_ms", schema, _DEADLINE),
        _parameter("X-Timeout-Ms", schema, _DEADLINE + " (as timeout_ms)", "header"),
    ]


def _model_paths(limits: RequestLimits) -> Doc:
    """The routes whose images go through the model."""
    model_errors = _errors("400", "401", "403", "413", "415", "503", "504")
    vectors: Doc = {
        "vectors": {
            "type": "array",
            "maxItems": limits.max_images,
            "items": {"type": "array", "items": {"type": "number"}},
            "description": "query embeddings of the model's dim (instead of images)",
        },
        **{
            option["name"]: {
                "description": f"{option['description']}: as the query parameter "
                f"{option['name']}, which overrides it"
            }
            for option in _search_parameters()
        },
    }
    return {
        "/v1/embed": {
            "post": {
                "summary": "Embed images",
                "parameters": _deadline_parameters(),
                "requestBody": _images_body(limits),
                "responses": {**_ok("Embeddings", "one embedding per image"), **model_errors},
            }
        },
        "/v1/classify": {
            "post": {
                "summary": "Classify images (models with a classifier head)",
                "parameters": [
                    _parameter(
                        "k",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_K,
                            "default": DEFAULT_TOP_K,
                        },
                        "labels per image",
                    ),
                    *_deadline_parameters(),
                ],
                "requestBody": _images_body(limits),
                "responses": {**_ok("Labels", "the top labels of each image"), **model_errors},
            }
        },
        "/v1/search": {
            "post": {
                "summary": "Find the stored items most similar to images or vectors",
                "parameters": [*_search_parameters(), *_deadline_parameters()],
                "requestBody": _images_body(limits, vectors),
                "responses": {**_ok("Matches", "the matches of each query"), **model_errors},
            }
        },
        "/v1/duplicates": {
            "post": {
                "summary": "Find the stored copies of images, proven by local features",
                "description": "Each image's verified copies among the stored items, those "
                "that hold more of it first, each with its evidence (inliers, transform); an "
                "empty list when it has none. The embedding's top verify_k are verified.",
                "parameters": _deadline_parameters(),
                "requestBody": _images_body(limits),
                "responses": {**_ok("Copies", "the verified copies of each image"), **model_errors},
            }
        },
    }


def _item_paths(limits: RequestLimits) -> Doc:
    model_errors = _errors("400", "401", "403", "413", "415", "503", "504")
    return {
        "/v1/items": {
            "post": {
                "summary": "Add items (an existing id is replaced); durable before the 200",
                "description": "The items of one request are stored atomically, all or none: "
                "they become visible together, in one catalog transaction, once every image "
                "is embedded. A request that fails (an undecodable image, a storage error, "
                "the deadline, the client hanging up) stores none of its items; only a 504 "
                "that comes while they are being committed leaves all of them stored. An "
                "existing id is replaced, so sending a failed request again whole is safe.",
                "parameters": [
                    _parameter("id", ref("ItemId"), "the id of a raw image body"),
                    _parameter("label", {"type": "string"}, "its label"),
                    _parameter("metadata", {"type": "string"}, "its metadata, JSON text"),
                    *_deadline_parameters(),
                ],
                "requestBody": _items_body(limits),
                "responses": {**_ok("Added", "the ids added, in request order"), **model_errors},
            },
            "get": {
                "summary": "List the stored items, newest first, a page at a time",
                "parameters": [
                    _parameter(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                        f"items per page (default {DEFAULT_PAGE})",
                    ),
                    _parameter(
                        "cursor",
                        {"type": "string", "pattern": "^[1-9][0-9]{0,17}$"},
                        "the `next` of the previous page",
                    ),
                ],
                "responses": {
                    **_ok("ItemPage", "a page of items"),
                    **_errors("400", "401", "403", "503"),
                },
            },
        },
        "/v1/items/{id}/thumbnail": {
            "get": {
                "summary": "The item's thumbnail (made when it was added), revalidated by ETag",
                "parameters": [_ITEM_ID],
                "responses": {
                    "200": {
                        "description": "a JPEG at most 256 pixels on its longer side",
                        "content": {"image/jpeg": {"schema": {"type": "string"}}},
                    },
                    "304": {"description": "the copy the client holds (If-None-Match) is current"},
                    **_errors("401", "403", "404", "503"),
                },
            }
        },
        "/v1/items/{id}": {
            "get": {
                "summary": "Read an item",
                "parameters": [_ITEM_ID],
                "responses": {**_ok("Item", "the item"), **_errors("401", "403", "404", "503")},
            },
            "delete": {
                "summary": "Delete an item",
                "parameters": [_ITEM_ID],
                "responses": {
                    **_ok("Deleted", "the item is gone"),
                    **_errors("401", "403", "404", "503"),
                },
            },
        },
        "/v1/items/{id}/similar": {
            "get": {
                "summary": "The stored items most similar to a stored item (itself left out)",
                "parameters": [_ITEM_ID, *_search_parameters()],
                "responses": {
                    **_ok("Matches", "one result"),
                    **_errors("400", "401", "403", "404", "503"),
                },
            }
        },
    }


def _info_paths() -> Doc:
    return {
        "/v1/index": {
            "get": {
                "summary": "What the index holds",
                "responses": {**_ok("Index", "the index"), **_errors("401", "403", "503")},
            }
        },
        "/v1/model": {
            "get": {
                "summary": "The model being served",
                "responses": {**_ok("Model", "the model"), **_errors("401", "403", "503")},
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": _ok("Status", "alive")}},
        "/readyz": {
            "get": {
                "summary": "Readiness: model warm, index open, start-up done",
                "responses": {**_ok("Status", "ready"), **_errors("503")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (404 when served on the metrics address)",
                "responses": {
                    "200": {
                        "description": "the text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors("404"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}
                },
            }
        },
    }


def _v2_errors(*codes: str) -> Doc:
    return {
        code: {"description": _ERRORS.get(code, "not found"), "content": _json(ref("OipError"))}
        for code in codes
    }


def _v2_paths(limits: RequestLimits) -> Doc:
    """The Open Inference Protocol v2 (KServe / Triton REST); {name} is the served model's."""
    name = _parameter("name", {"type": "string"}, "the served model's name (as /v1/model)", "path")
    flag = {"type": "object", "properties": {"live": {"type": "boolean"}}}
    ready = {"type": "object", "properties": {"ready": {"type": "boolean"}}}
    infer_errors = _v2_errors("400", "401", "403", "404", "413", "503", "504")
    return {
        "/v2": {"get": _v2_get("Server metadata", {"type": "object"}, "401", "403")},
        "/v2/health/live": {"get": _v2_get("Liveness", flag)},
        "/v2/health/ready": {
            "get": {
                **_v2_get("Readiness", ready),
                "responses": {
                    "200": {"description": "ready", "content": _json(ready)},
                    "503": {"description": "not ready", "content": _json(ready)},
                },
            }
        },
        "/v2/models/{name}": {
            "get": {
                **_v2_get(
                    "Model metadata: inputs, outputs, classes",
                    {"type": "object"},
                    "401",
                    "403",
                    "404",
                    "503",
                ),
                "parameters": [name],
            }
        },
        "/v2/models/{name}/ready": {
            "get": {
                **_v2_get("Model readiness", ready, "401", "403", "404", "503"),
                "parameters": [name],
            }
        },
        "/v2/models/{name}/infer": {
            "post": {
                "summary": "Inference: IMAGE (BYTES [N], encoded) or PIXELS (UINT8 [N, H, W, 3]) "
                "in; EMBEDDING and PROBABILITIES out. JSON tensors, or the binary tensor "
                "extension (Inference-Header-Content-Length)",
                "parameters": [name, *_deadline_parameters()],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": ref("InferRequest"),
                            "example": {
                                "inputs": [
                                    {
                                        "name": "IMAGE",
                                        "datatype": "BYTES",
                                        "shape": [1],
                                        "data": [example_image_b64()],
                                    }
                                ]
                            },
                        },
                        "application/octet-stream": {"schema": {"type": "string"}},
                    },
                },
                "responses": {**_ok("InferResponse", "the outputs"), **infer_errors},
            }
        },
    }


def _v2_get(summary: str, schema: Doc, *errors: str) -> Doc:
    ok = {"200": {"description": summary, "content": _json(schema)}}
    return {"summary": summary, "responses": {**ok, **_v2_errors(*errors)}}


def _page_paths() -> Doc:
    """What a browser opens."""
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/": {
            "get": {
                "summary": "The search page",
                "responses": {"200": {"description": "the page", "content": html}},
            }
        },
        "/docs": {
            "get": {
                "summary": "This reference, as a page",
                "responses": {"200": {"description": "the page", "content": html}},
            }
        },
        "/web/{name}": {
            "get": {
                "summary": "The search page's script and styles",
                "parameters": [
                    _parameter("name", {"enum": list(web.FILES)}, "a file name", "path")
                ],
                "responses": {
                    "200": {
                        "description": "the file",
                        "content": {
                            "text/javascript": {"schema": {"type": "string"}},
                            "text/css": {"schema": {"type": "string"}},
                        },
                    },
                    **_errors("404"),
                },
            }
        },
    }


def document(limits: RequestLimits) -> Doc:
    """The OpenAPI 3.1 document of the API served with ``limits``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "batchserve",
            "version": API_VERSION,
            "description": "Image embeddings, classification and visual search, batched "
            'onto one model. Every error is {"error": {"code", "message"}}. With '
            "tokens configured, /v1 routes need `Authorization: Bearer <token>`.",
        },
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            **_model_paths(limits),
            **_item_paths(limits),
            **_info_paths(),
            **_v2_paths(limits),
            **_page_paths(),
        },
    }


def query_parameters(document: Doc) -> dict[tuple[str, str], set[str]]:
    """The query parameters each /v1 operation takes, by (method, path): a request with
    any other is refused, naming these."""
    return {
        (method, path): {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        for path, operations in document["paths"].items()
        if path.startswith("/v1/")
        for method, op in operations.items()
    }

"""The API's schemas: what each route answers, the error shape, the pieces of request
bodies, and the small image the document's examples carry."""

from __future__ import annotations

import base64
import io
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from batchserve.models.spec import BACKENDS
from batchserve.serving.timings import STAGES
from batchserve.storage.records import MAX_ID_CHARS

Doc = dict[str, Any]


def ref(name: str) -> Doc:
    """A reference to the schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


@cache
def example_image_b64() -> str:
    """A small JPEG (a colour gradient), base64: the examples' image, which any server
    accepts, so that each example in the document succeeds as it is."""
    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1, None]), -1)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=80)
    return base64.b64encode(out.getvalue()).decode("ascii")


def _results(inner: Doc) -> Doc:
    return {
        "type": "object",
        "required": ["results"],
        "properties": {
            "results": {"type": "array", "items": inner},
            "timings_ms": ref("Timings"),
        },
    }


def schemas() -> Doc:
    return {**_wire_schemas(), **_record_schemas()}


def _wire_schemas() -> Doc:
    """The error shape and the pieces of request bodies."""
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                }
            },
        },
        "ItemId": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_ID_CHARS,
            "description": "printable text; in a URL path, one segment with its '/' and "
            "other reserved characters percent-encoded (a/b is /v1/items/a%2Fb)",
        },
        "Base64Image": {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["b64"],
                    "additionalProperties": False,
                    "properties": {"b64": {"type": "string"}},
                },
                {"type": "string"},
            ]
        },
    }


def _record_schemas() -> Doc:
    """What the routes answer."""
    unit = {"type": "array", "items": {"type": "number"}}
    fields: Doc = {
        "id": {"type": "string"},
        "label": {"type": ["string", "null"]},
        "metadata": {"type": "object"},
        "class": {"type": ["string", "null"], "description": "the model's predicted class"},
    }
    item: Doc = {
        "type": "object",
        "required": ["id", "label", "metadata", "created", "class"],
        "properties": {
            **fields,
            "created": {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"},
        },
    }
    match: Doc = {
        "type": "object",
        "required": ["id", "score", "label", "metadata", "class"],
        "properties": {
            **fields,
            "score": {"type": "number"},
            "verified": {
                "type": ["boolean", "null"],
                "description": "a verified search's verdict: a copy of the query, proven by "
                "its local features (null: the item has none, so it cannot be verified)",
            },
            "inliers": {
                "type": "integer",
                "minimum": 0,
                "description": "matched keypoints that agree on one transform (verified searches)",
            },
            "transform": {
                "type": "string",
                "enum": ["similarity", "mirrored similarity", "none"],
                "description": "the transform that maps the query onto the item (verified "
                "searches)",
            },
        },
    }
    return {
        "Embeddings": {
            "type": "object",
            "required": ["model", "dim", "results"],
            "properties": {
                "model": {"type": "string"},
                "dim": {"type": "integer"},
                "timings_ms": ref("Timings"),
                "results": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"embedding": unit}},
                },
            },
        },
        "Labels": _results(
            {
                "type": "object",
                "properties": {
                    "labels": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "label": {"type": "string"},
                                "score": {"type": "number"},
                            },
                        },
                    }
                },
            }
        ),
        "Matches": _results(
            {"type": "object", "properties": {"matches": {"type": "array", "items": match}}}
        ),
        "Copies": _results(
            {"type": "object", "properties": {"copies": {"type": "array", "items": match}}}
        ),
        "Added": {
            "type": "object",
            "required": ["added"],
            "properties": {
                "added": {"type": "array", "items": {"type": "string"}},
                "timings_ms": ref("Timings"),
            },
        },
        "Item": item,
        "ItemPage": {
            "type": "object",
            "required": ["items", "next"],
            "properties": {
                "items": {"type": "array", "items": item},
                "next": {"type": ["string", "null"], "description": "cursor of the next page"},
            },
        },
        "Timings": {
            "type": "object",
            "description": "milliseconds the request spent reading and decoding its images, "
            "queued, in the model, in the index and verifying its matches (also in the "
            "Server-Timing header)",
            "required": list(STAGES),
            "properties": {stage: {"type": "number", "minimum": 0} for stage in STAGES},
        },
        "Deleted": {
            "type": "object",
            "required": ["deleted"],
            "properties": {"deleted": {"type": "string"}},
        },
        "Index": {
            "type": "object",
            "required": ["kind", "size", "dim", "device"],
            "properties": {
                "size": {"type": "integer", "description": "items in the index"},
                "vectors_per_item": {
                    "type": "integer",
                    "description": "vectors each item holds: 1, plus 5 with crop views and 1 "
                    "with the grey view",
                },
            },
        },
        "Model": {
            "type": "object",
            "required": [
                "name",
                "source",
                "trained_on",
                "input_size",
                "dim",
                "classes",
                "pretrained",
            ],
            "properties": {
                "trained_on": {"type": "string", "description": "what the model learned from"},
                "backend": {
                    "type": "string",
                    "enum": list(BACKENDS),
                    "description": "what runs the model (--backend)",
                },
                "embedding": {
                    "type": "object",
                    "description": "how an image becomes its embedding: pooling, fit, "
                    "trim_borders, and views when items store crop or grey views",
                },
            },
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"type": "string"},
                "catalog": {
                    "type": "string",
                    "enum": ["ok", "unavailable"],
                    "description": "/readyz on a shared (PostgreSQL) catalog: whether this "
                    "replica last found it reachable (reads and searches go on without it)",
                },
                "catalog_reason": {
                    "type": "string",
                    "description": "why it is unavailable, in a few words",
                },
            },
        },
        **_v2_schemas(),
    }


def _v2_schemas() -> Doc:
    """The Open Inference Protocol's error, request and response."""
    tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "additionalProperties": False,
        "properties": {
            "name": {"enum": ["IMAGE", "PIXELS"]},
            "datatype": {"enum": ["BYTES", "UINT8"]},
            "shape": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0},
                "description": "at most as many elements in all as the body may hold bytes",
            },
            "data": {
                "type": "array",
                "description": "base64 strings (IMAGE), JSON integers 0-255 (PIXELS)",
            },
            "parameters": {"type": "object"},
        },
    }
    asked = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"enum": ["EMBEDDING", "PROBABILITIES"]},
            "parameters": {"type": "object"},
        },
    }
    output = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"enum": ["EMBEDDING", "PROBABILITIES"]},
            "datatype": {"const": "FP32"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "data": {"type": "array", "items": {"type": "number"}},
            "parameters": {"type": "object"},
        },
    }
    return {
        "OipError": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string"},
                "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": tensor},
                "outputs": {"type": "array", "minItems": 1, "items": asked},
                "parameters": {"type": "object"},
            },
        },
        "InferResponse": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {"type": "array", "items": output},
            },
        },
    }

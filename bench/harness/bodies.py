"""Request bodies for each route and encoding, built once before the load starts."""

from __future__ import annotations

import base64
import json
import uuid

from bench.harness.client import Target, encode_request

ENCODINGS = ("raw", "multipart", "base64")


def _multipart(images: list[bytes], fields: list[tuple[str, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields
    ]
    for i, image in enumerate(images):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="{i}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
            + image
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


def build_requests(
    url: str,
    route: str,
    images: list[bytes],
    encoding: str = "raw",
    per_request: int = 1,
    count: int = 64,
) -> list[bytes]:
    """``count`` distinct encoded requests for ``route`` (``/v1/items`` gets fresh ids)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}")
    if encoding == "raw" and per_request != 1:
        raise ValueError("a raw body holds one image: use multipart or base64")
    target = Target.parse(url.rstrip("/") + route)
    if route in ("/healthz", "/readyz", "/metrics"):
        # A trivial GET endpoint: for checking the generator's own ceiling against wrk.
        return [encode_request(target, b"", "text/plain", method="GET")]
    requests = []
    for n in range(count):
        chosen = [images[(n * per_request + j) % len(images)] for j in range(per_request)]
        ids = [f"bench-{uuid.uuid4().hex[:12]}" for _ in chosen]
        if encoding == "raw":
            body, ctype = chosen[0], "image/jpeg"
            if route.startswith("/v1/items"):
                sep = "&" if "?" in target.path else "?"
                target = Target(target.host, target.port, f"{target.path}{sep}id={ids[0]}")
        elif encoding == "multipart":
            fields = [("id", i) for i in ids] if route.startswith("/v1/items") else []
            body, ctype = _multipart(chosen, fields)
        else:
            if route.startswith("/v1/items"):
                doc = {
                    "items": [
                        {"id": i, "b64": base64.b64encode(c).decode()}
                        for i, c in zip(ids, chosen, strict=True)
                    ]
                }
            else:
                doc = {"images": [{"b64": base64.b64encode(c).decode()} for c in chosen]}
            body, ctype = json.dumps(doc).encode(), "application/json"
        requests.append(encode_request(target, body, ctype))
        target = Target.parse(url.rstrip("/") + route)
    return requests

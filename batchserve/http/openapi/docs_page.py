"""The API reference served at ``GET /docs``: one HTML page rendered on the server from the
OpenAPI 3.1 document. Rendered here, not by Swagger UI, because the Swagger UI on PyPI (4.15)
cannot read OpenAPI 3.1; and so the page reads offline, with no JavaScript and nothing
fetched but ``/web/docs.css``.

Every string of the document is escaped as text; backticked spans in descriptions (which
OpenAPI says are CommonMark) are shown as code, the only markup honoured.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html import escape
from typing import Any

Doc = dict[str, Any]

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_SCHEMAS = "#/components/schemas/"
_DASH = "\N{EN DASH}"
#: How deep property tables nest (a field of an item of a field); deeper is shown as JSON.
_MAX_DEPTH = 2
#: Keywords that make a schema's type line meaningful; a schema with none is shown as JSON.
_TYPED = frozenset({"type", "$ref", "enum", "const", "items"})
#: Bounds shown as a range: the lower keyword, the upper keyword, the unit.
_RANGES = (
    ("minimum", "maximum", ""),
    ("minLength", "maxLength", " characters"),
    ("minItems", "maxItems", " items"),
)
#: Other keywords shown after the type, and in what words.
_FACETS = (
    ("exclusiveMinimum", "over {}"),
    ("exclusiveMaximum", "under {}"),
    ("format", "format {}"),
    ("contentMediaType", "{}"),
    ("pattern", "matching {}"),
    ("enum", "one of {}"),
    ("const", "always {}"),
    ("default", "default {}"),
)


def render(doc: Doc) -> bytes:
    """The reference page of ``doc``, an OpenAPI 3.1 document: a whole HTML5 page, UTF-8."""
    info = doc.get("info", {})
    ops = list(_operations(doc))
    schemas = doc.get("components", {}).get("schemas", {})
    body = [
        _header(doc),
        _contents(ops, schemas),
        '<main>\n<h2 id="operations">Operations</h2>',
        *(_operation(*op) for op in ops),
        '<h2 id="schemas">Schemas</h2>',
        *(_schema_section(name, schema) for name, schema in schemas.items()),
        "</main>",
    ]
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    return _page(title, "\n".join(body)).encode("utf-8")


def anchor(method: str, path: str) -> str:
    """The id of an operation's section, the same on every render: ``post-v1-search``."""
    slug = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")
    return f"{method.lower()}-{slug or 'root'}"


def _operations(doc: Doc) -> Iterator[tuple[str, str, Doc]]:
    """Each operation as (method, path, operation), in document order; its parameters
    include those its path declares for every method (its own win on name and place)."""
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if method in _METHODS:
                both = [*item.get("parameters", []), *op.get("parameters", [])]
                params = {(p.get("name"), p.get("in"), p.get("$ref")): p for p in both}
                yield method, path, {**op, "parameters": list(params.values())}


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)} — API reference</title>\n"
        '<link rel="icon" href="data:,">\n<link rel="stylesheet" href="/web/docs.css">\n</head>\n'
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _header(doc: Doc) -> str:
    info = doc.get("info", {})
    return (
        '<header>\n<nav class="links"><a href="/">Search page</a> '
        '<a href="/openapi.json">OpenAPI document (JSON)</a></nav>\n'
        f"<h1>{escape(str(info.get('title', 'API')))} "
        f'<span class="version">{escape(str(info.get("version", "")))}</span></h1>\n'
        f"{_para(info.get('description'))}\n{_auth(doc)}\n</header>"
    )


def _auth(doc: Doc) -> str:
    """What credentials the API takes, from its security schemes."""
    schemes = doc.get("components", {}).get("securitySchemes", {})
    if not schemes:
        return ""
    ways = "; ".join(_scheme(name, scheme) for name, scheme in schemes.items())
    # An empty requirement in the top-level list means a request may carry none.
    anonymous = {} in doc.get("security", [])
    note = " Optional: the document also allows requests without credentials." * anonymous
    return f'<p class="auth"><strong>Authentication</strong>: {ways}.{note}</p>'


def _scheme(name: str, scheme: Doc) -> str:
    """One scheme in words: how to send a bearer token, else e.g. ``apiKey header X-Key``."""
    words = " ".join(str(scheme[key]) for key in ("type", "scheme", "in", "name") if key in scheme)
    bearer = words.lower() == "http bearer"
    how = "send <code>Authorization: Bearer &lt;token&gt;</code>" if bearer else escape(words)
    return f"<code>{escape(name)}</code> ({how})"


def _contents(ops: list[tuple[str, str, Doc]], schemas: Doc) -> str:
    entries = [
        f'<li><a href="#{anchor(method, path)}">{_badge(method)} <code>{escape(path)}</code>'
        + (f" — {escape(str(op['summary']))}" if op.get("summary") else "")
        + "</a></li>"
        for method, path, op in ops
    ]
    names = [f'<li><a href="#schema-{escape(n)}">{escape(n)}</a></li>' for n in schemas]
    return (
        '<nav class="toc">\n<h2>Contents</h2>\n<h3><a href="#operations">Operations</a></h3>\n'
        + "<ul>\n{}\n</ul>\n".format("\n".join(entries))
        + '<h3><a href="#schemas">Schemas</a></h3>\n'
        + '<ul class="names">\n{}\n</ul>\n</nav>'.format("\n".join(names))
    )


def _operation(method: str, path: str, op: Doc) -> str:
    parts = [
        f'<section class="operation" id="{anchor(method, path)}">',
        f"<h3>{_badge(method)} <code>{escape(path)}</code></h3>",
        _para(op.get("summary"), "summary"),
        _para(op.get("description")),
        _parameters(op["parameters"]),
        _request_body(op.get("requestBody")),
        _responses(op.get("responses", {})),
        "</section>",
    ]
    return "\n".join(part for part in parts if part)


def _parameters(params: list[Doc]) -> str:
    if not params:
        return ""
    rows = [
        [
            f"<code>{escape(str(p.get('name', p.get('$ref', ''))))}</code>",
            escape(str(p.get("in", ""))),
            _describe(p.get("schema", {})),
            "yes" if p.get("required") else "no",
            _text(p.get("description", "")),
        ]
        for p in params
    ]
    return "<h4>Parameters</h4>\n" + _table(["Name", "In", "Type", "Required", "Description"], rows)


def _request_body(body: Doc | None) -> str:
    if not body:
        return ""
    need = "required" if body.get("required") else "optional"
    parts = [f"<h4>Request body <small>({need})</small></h4>", _para(body.get("description"))]
    for media, content in body.get("content", {}).items():
        title = f"<h5><code>{escape(media)}</code></h5>"
        parts.append(
            f'<div class="media">\n{title}\n{_schema(content.get("schema", {}), 0)}\n</div>'
        )
    return "\n".join(part for part in parts if part)


def _responses(responses: Doc) -> str:
    if not responses:
        return ""
    rows = [
        [
            f'<span class="status status-{escape(str(code)[:1])}">{escape(str(code))}</span>',
            _text(response.get("description", "")),
            _media_types(response.get("content", {})),
        ]
        for code, response in responses.items()
    ]
    return "<h4>Responses</h4>\n" + _table(["Status", "Description", "Content"], rows)


def _media_types(content: Doc) -> str:
    """Each media type of a response and what it holds: a link to a named schema."""
    lines = [
        f"<div><code>{escape(media)}</code>"
        + (f": {_describe(item['schema'])}" if "schema" in item else "")
        + "</div>"
        for media, item in content.items()
    ]
    return "".join(lines) or "—"


def _schema_section(name: str, schema: Any) -> str:
    return (
        f'<section class="schema" id="schema-{escape(name)}">\n<h3>{escape(name)}</h3>\n'
        f"{_schema(schema, 0)}\n</section>"
    )


def _schema(schema: Any, depth: int) -> str:
    """A schema as HTML: its description, then its type line, a table of its fields (or of
    its items'), its alternatives; or compact JSON for what the page cannot show."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return _json(schema)
    fields, options = _fields(schema), schema.get("oneOf") or schema.get("anyOf")
    if fields is None and not options and schema and not _TYPED & schema.keys():
        return _json(schema)
    parts = [_para(schema.get("description"))]
    if fields is not schema and not options:
        parts.append(f'<p class="type">{_describe(schema)}</p>')
    if fields is not None:
        parts.append(_properties(fields, depth))
    if options:
        items = "".join(f"<li>{_schema(option, depth + 1)}</li>" for option in options)
        parts.append(f'<p>One of:</p>\n<ol class="options">{items}</ol>')
    return "\n".join(part for part in parts if part)


def _fields(schema: Doc) -> Doc | None:
    """The object whose fields ``schema`` is shown by: itself, or its items; None if neither."""
    if "properties" in schema or "required" in schema:
        return schema
    items = schema.get("items")
    if isinstance(items, dict) and ("properties" in items or "required" in items):
        return items
    return None


def _properties(schema: Doc, depth: int) -> str:
    """A table of an object's fields, the required ones marked; a field that is an object,
    or an array of them, gets its own table a level deeper."""
    props, required = schema.get("properties", {}), schema.get("required", [])
    rows = [_field(name, props.get(name), name in required, depth) for name in props]
    rows += [_field(name, None, True, depth) for name in required if name not in props]
    return _table(["Field", "Type", "Description"], rows)


def _field(name: str, prop: Any, required: bool, depth: int) -> list[str]:
    mark = ' <span class="required">required</span>' * required
    cell = f"<code>{escape(name)}</code>{mark}"
    if not isinstance(prop, dict):
        return [cell, "any" if prop is None else _describe(prop), ""]
    note = _text(prop.get("description", ""))
    nested = _fields(prop)
    if nested is not None:
        note += _properties(nested, depth + 1) if depth < _MAX_DEPTH else _json(nested)
    return [cell, _describe(prop), note]


def _describe(schema: Any) -> str:
    """One line for a schema: its type, then its bounds, as ``integer, 1-1000, default 10``."""
    if not isinstance(schema, dict):
        return escape(json.dumps(schema))
    return ", ".join([_type(schema), *(escape(facet) for facet in _facets(schema))])


def _type(schema: Doc) -> str:
    """A schema's type as HTML: a link for a ``$ref``; alternatives and type lists joined
    with "or"; an array with the type of its items."""
    ref = str(schema.get("$ref", ""))
    if ref.startswith(_SCHEMAS):
        name = escape(ref.removeprefix(_SCHEMAS))
        return f'<a class="ref" href="#schema-{name}">{name}</a>'
    if ref:
        return f"<code>{escape(ref)}</code>"
    options = schema.get("oneOf") or schema.get("anyOf")
    if options:
        return " or ".join(_describe(option) for option in options)
    kind = schema.get("type", "object" if "properties" in schema else "any")
    text = " or ".join(escape(str(k)) for k in (kind if isinstance(kind, list) else [kind]))
    items = schema.get("items")
    return text + (f" of {_type(items)}" if isinstance(items, dict) else "")


def _facets(schema: Doc) -> list[str]:
    """Bounds and the like in words: ``at most 64 items``, ``default 10``."""
    ranges = [_range(schema, low, high, unit) for low, high, unit in _RANGES]
    words = [form.format(_literal(schema[key])) for key, form in _FACETS if key in schema]
    return [facet for facet in [*ranges, *words] if facet]


def _range(schema: Doc, low: str, high: str, unit: str) -> str:
    least, most = schema.get(low), schema.get(high)
    if least is not None and most is not None:
        between = " to " if f"{least}{most}".count("-") else _DASH  # not "-1" dash "1"
        return f"{_literal(least)}{between}{_literal(most)}{unit}"
    if least is not None:
        return f"at least {_literal(least)}{unit}"
    return "" if most is None else f"at most {_literal(most)}{unit}"


def _literal(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_literal(item) for item in value)
    return value if isinstance(value, str) else json.dumps(value)


def _badge(method: str) -> str:
    return f'<span class="method method-{method}">{method.upper()}</span>'


def _para(text: Any, css_class: str = "") -> str:
    if not text:
        return ""
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<p{attribute}>{_text(text)}</p>"


def _text(text: Any) -> str:
    """``text`` escaped, its `backticked` spans as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(str(text)))


def _json(schema: Any) -> str:
    return f'<pre class="json">{escape(json.dumps(schema, separators=(", ", ": ")))}</pre>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    titles = "".join(f"<th>{title}</th>" for title in head)
    lines = ["<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows]
    body = "\n".join(lines)
    return f"<table>\n<thead><tr>{titles}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"

"""The API reference page at /docs, rendered from the OpenAPI document: every operation,
parameter, body, response and schema of the real document is on it, readably; the
document's text is escaped; the HTML is well formed. What the page must show is derived
from the document, so the tests follow the API as it grows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from html import escape
from html.parser import HTMLParser
from typing import Any

import pytest

from batchserve.http.bodies import RequestLimits
from batchserve.http.openapi.docs_page import anchor, render
from batchserve.http.openapi.document import document

Doc = dict[str, Any]

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
VOID = {"meta", "link", "br", "hr", "img", "input", "wbr", "col", "area", "base", "source"}
SCRIPT = "<script>alert(1)</script>"


class Page(HTMLParser):
    """A rendered page as the tests read it: tags checked for balance as they are parsed,
    the ids and links on it, and the text and links of each ``<section>`` by its id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.html = html
        self.open: list[tuple[str, str | None]] = []  # (tag, id of a section)
        self.unbalanced: list[str] = []
        self.tags: set[str] = set()
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.text: list[str] = []
        self.sections: dict[str, list[str]] = {}
        self.section_hrefs: dict[str, list[str]] = {}
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        named = dict(attrs)
        section_id, href = named.get("id"), named.get("href")
        self.ids += [section_id] if section_id else []
        if href:
            self.hrefs.append(href)
            for section in self._inside():
                self.section_hrefs.setdefault(section, []).append(href)
        if tag not in VOID:
            self.open.append((tag, section_id if tag == "section" else None))

    def handle_endtag(self, tag: str) -> None:
        if self.open and self.open[-1][0] == tag:
            self.open.pop()
        else:
            self.unbalanced.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for section in self._inside():
            self.sections.setdefault(section, []).append(data)

    def _inside(self) -> list[str]:
        return [section for _, section in self.open if section]

    def section(self, section_id: str) -> str:
        return "".join(self.sections[section_id])


def operations(doc: Doc) -> Iterator[tuple[str, str, Doc]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield method, path, op


def schemas_in(content: Doc) -> Iterator[Doc]:
    """The inline schemas of a body's content, and the properties and items in them."""
    stack = [media.get("schema", {}) for media in content.values()]
    while stack:
        schema = stack.pop()
        yield schema
        stack += schema.get("properties", {}).values()
        stack += [schema["items"]] if isinstance(schema.get("items"), dict) else []


def as_text(description: str) -> str:
    """A description as the page's text shows it: its `code` spans without the backticks."""
    return description.replace("`", "")


@pytest.fixture(scope="module")
def doc() -> Doc:
    return document(RequestLimits())


@pytest.fixture(scope="module")
def page(doc: Doc) -> Page:
    return Page(render(doc).decode("utf-8"))


def tiny(summary: str = "Fetch a thing", **operation: Any) -> Doc:
    """A small document of one operation, ``GET /v1/things/{id}``."""
    schemas = operation.pop("schemas", {})
    op = {"summary": summary, "responses": {"200": {"description": "ok"}}, **operation}
    return {
        "openapi": "3.1.0",
        "info": {"title": "things", "version": "1"},
        "paths": {"/v1/things/{id}": {"get": op}},
        "components": {"schemas": schemas},
    }


def test_the_page_is_a_whole_html5_document_with_balanced_tags_and_no_script(page: Page) -> None:
    assert page.html.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in page.html
    assert {"html", "head", "title", "body", "main", "section", "table"} <= page.tags
    assert page.open == [] and page.unbalanced == []
    assert "script" not in page.tags
    assert '<link rel="stylesheet" href="/web/docs.css">' in page.html


def test_the_header_shows_the_title_version_auth_and_links_to_search_and_the_document(
    doc: Doc, page: Page
) -> None:
    text = "".join(page.text)
    assert doc["info"]["title"] in text and doc["info"]["version"] in text
    assert "/" in page.hrefs and "/openapi.json" in page.hrefs
    assert '<p class="auth">' in page.html


def test_the_auth_note_says_how_to_send_each_scheme_and_whether_it_is_optional() -> None:
    doc = tiny()
    doc["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer"},
        "key": {"type": "apiKey", "in": "header", "name": "X-Key"},
    }
    text = "".join(Page(render(doc).decode()).text)
    assert "bearer (send Authorization: Bearer <token>)" in text
    assert "key (apiKey header X-Key)" in text and "Optional" not in text
    doc["security"] = [{}, {"bearer": []}]
    assert "Optional" in "".join(Page(render(doc).decode()).text)


def test_every_operation_has_its_own_section_and_a_contents_entry_with_its_summary(
    doc: Doc, page: Page
) -> None:
    anchors = [anchor(method, path) for method, path, _ in operations(doc)]
    assert len(set(anchors)) == len(anchors) and len(page.ids) == len(set(page.ids))
    for (method, path, op), section in zip(operations(doc), anchors, strict=True):
        assert section in page.ids and f"#{section}" in page.hrefs
        text = page.section(section)
        assert method.upper() in text and path in text and op["summary"] in text


def test_anchors_are_the_method_and_the_path_in_words() -> None:
    assert anchor("post", "/v1/search") == "post-v1-search"
    assert anchor("GET", "/v1/items/{id}/thumbnail") == "get-v1-items-id-thumbnail"
    assert anchor("get", "/") == "get-root"
    page = Page(render(tiny()).decode())
    assert "get-v1-things-id" in page.ids and "#get-v1-things-id" in page.hrefs


def test_every_parameter_of_every_operation_is_in_its_section_with_its_place(
    doc: Doc, page: Page
) -> None:
    for method, path, op in operations(doc):
        text = page.section(anchor(method, path))
        for parameter in op.get("parameters", []):
            assert parameter["name"] in text and parameter["in"] in text
            assert as_text(parameter.get("description", "")) in text


def test_parameter_bounds_and_defaults_are_in_their_section(doc: Doc, page: Page) -> None:
    shown = 0
    for method, path, op in operations(doc):
        text = page.section(anchor(method, path))
        for parameter in op.get("parameters", []):
            for key in ("minimum", "maximum", "default", "maxLength"):
                if key in parameter["schema"]:
                    assert json.dumps(parameter["schema"][key]) in text, (path, key)
                    shown += 1
    assert shown  # the document bounds k, at least


def test_a_parameter_type_reads_as_words_with_its_range_and_default() -> None:
    k = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10}
    score = {"type": "number", "minimum": -1, "maximum": 1}
    parameters = [
        {"name": "k", "in": "query", "schema": k},
        {"name": "min_score", "in": "query", "schema": score},
        {"name": "X-Timeout-Ms", "in": "header", "schema": {"type": "integer", "minimum": 1}},
    ]
    html = render(tiny(parameters=parameters)).decode()
    assert "<td>integer, 1\N{EN DASH}1000, default 10</td>" in html
    assert "<td>number, -1 to 1</td>" in html
    assert "<td><code>X-Timeout-Ms</code></td><td>header</td><td>integer, at least 1</td>" in html


def test_each_request_body_lists_its_content_types_fields_and_limits(doc: Doc, page: Page) -> None:
    for method, path, op in operations(doc):
        if "requestBody" not in op:
            continue
        text = page.section(anchor(method, path))
        content = op["requestBody"]["content"]
        assert all(media in text for media in content)
        for schema in schemas_in(content):
            assert all(name in text for name in schema.get("properties", {}))
            if "maxItems" in schema:
                assert f"{schema['maxItems']} items" in text


def test_responses_show_each_status_and_media_type_and_link_the_schema_returned(
    doc: Doc, page: Page
) -> None:
    for method, path, op in operations(doc):
        section = anchor(method, path)
        text, links = page.section(section), page.section_hrefs.get(section, [])
        for status, response in op["responses"].items():
            assert status in text and as_text(response["description"]) in text
            for media, item in response.get("content", {}).items():
                assert media in text
                ref = item.get("schema", {}).get("$ref", "")
                if ref:
                    assert "#schema-" + ref.rsplit("/", 1)[1] in links


def test_responses_that_are_not_json_show_their_media_type() -> None:
    image = {"description": "the thumbnail", "content": {"image/jpeg": {}}}
    page = Page(render(tiny(responses={"200": image})).decode())
    assert "image/jpeg" in page.section("get-v1-things-id")
    assert "the thumbnail" in page.section("get-v1-things-id")


def test_every_schema_has_a_section_and_every_link_on_the_page_has_a_target(
    doc: Doc, page: Page
) -> None:
    for name, schema in doc["components"]["schemas"].items():
        assert f"schema-{name}" in page.ids and f"#schema-{name}" in page.hrefs
        text = page.section(f"schema-{name}")
        assert all(field in text for field in schema.get("properties", {}))
        assert all(field in text for field in schema.get("required", []))
    targets = [href[1:] for href in page.hrefs if href.startswith("#")]
    assert targets and set(targets) <= set(page.ids)


def test_schemas_of_every_shape_read_as_words_or_fall_back_to_json() -> None:
    schemas = {
        "Name": {"type": "string", "maxLength": 8},
        "Thing": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"$ref": "#/components/schemas/Name"},
                "note": {"type": ["string", "null"], "description": "free text"},
                "parts": {"type": "array", "items": {"properties": {"weight": {}}}},
            },
        },
        "Either": {"oneOf": [{"$ref": "#/components/schemas/Name"}, {"type": "integer"}]},
        "Odd": {"allOf": [{"type": "object"}]},
    }
    page = Page(render(tiny(schemas=schemas)).decode())
    thing = page.section("schema-Thing")
    assert "string or null" in thing and "free text" in thing and "required" in thing
    assert "array of object" in thing and "weight" in thing  # the items' own table
    assert "#schema-Name" in page.section_hrefs["schema-Thing"]
    assert "One of:" in page.section("schema-Either") and "integer" in page.section("schema-Either")
    assert '<pre class="json">{&quot;allOf&quot;' in page.html
    assert "at most 8 characters" in page.section("schema-Name")


def test_the_documents_text_is_escaped_not_taken_as_markup() -> None:
    parameter = {"name": SCRIPT, "in": "query", "description": SCRIPT, "schema": {}}
    schema = {"type": "object", "properties": {"a": {"type": "string", "description": SCRIPT}}}
    doc = tiny(SCRIPT, parameters=[parameter], schemas={"S": schema})
    doc["info"] = {"title": SCRIPT, "version": '"><b>', "description": SCRIPT}
    page = Page(render(doc).decode())
    assert "<script>" not in page.html and "script" not in page.tags and "b" not in page.tags
    assert escape(SCRIPT) in page.html
    assert SCRIPT in page.section("get-v1-things-id")  # shown as text
    assert SCRIPT in page.section("schema-S")
    assert page.open == [] and page.unbalanced == []

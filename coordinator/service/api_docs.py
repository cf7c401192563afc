"""The HTTP API's documentation page at /docs, written from the app's own OpenAPI schema.

FastAPI's Swagger UI and ReDoc pages load their scripts from a CDN and run inline scripts:
a coordinator is often air-gapped, and the API's Content-Security-Policy allows neither. This
page is plain HTML with the dashboard's origin-local stylesheet: every endpoint with its
parameters, whether it needs the token, its answers, and the fields of each answer's schema.
"""

from __future__ import annotations

import html
from typing import Any

METHODS = ("get", "post", "put", "patch", "delete")
# Served by the app but not in the schema (include_in_schema=False or mounted).
UNLISTED = (("GET", "/", "the fleet dashboard (no token: the page asks for it)"),
            ("GET", "/assets/…", "the dashboard's script, styles and vendored chart library"),
            ("GET", "/docs", "this page"),
            ("GET", "/openapi.json", "the OpenAPI schema this page is written from "
                                     "(it needs the token where the others do)"))


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(schema: dict[str, Any]) -> str:
    """A schema's type as one line of HTML: a $ref links to its schema below."""
    if "$ref" in schema:
        name = html.escape(_ref_name(schema["$ref"]))
        return f'<a href="#schema-{name}">{name}</a>'
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(_type(option) for option in schema[key])
    if "enum" in schema:
        return " | ".join(html.escape(repr(value)) for value in schema["enum"])
    if "const" in schema:
        return html.escape(repr(schema["const"]))
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of string to {_type(schema['additionalProperties'])}"
    return html.escape(str(kind))


def _bounds(schema: dict[str, Any]) -> str:
    words = {"minimum": "≥", "maximum": "≤", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    return ", ".join(f"{sign} {schema[key]}" for key, sign in words.items() if key in schema)


def _operation(method: str, path: str, op: dict[str, Any], secured: bool) -> str:
    e = html.escape
    parts = [f'<section class="endpoint" id="{e(method)}-{e(path)}" data-path="{e(path)}">',
             f'<h3><span class="method">{e(method.upper())}</span> <code>{e(path)}</code></h3>',
             f"<p>{e(op.get('summary', ''))}"
             + (' <span class="badge">token</span>' if secured else
                ' <span class="badge open">no token</span>') + "</p>"]
    if op.get("description"):
        parts.append(f"<p class=\"muted\">{e(op['description'])}</p>")
    params = op.get("parameters", [])
    if params:
        parts.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>default</th>"
                     "<th>bounds</th></tr>")
        for p in params:
            schema = p.get("schema", {})
            default = schema.get("default")
            parts.append(f"<tr><td><code>{e(p['name'])}</code>{'' if p.get('required') else ' (optional)'}"
                         f"</td><td>{e(p.get('in', ''))}</td><td>{_type(schema)}</td>"
                         f"<td>{'' if default is None else e(str(default))}</td>"
                         f"<td>{e(_bounds(schema))}</td></tr>")
        parts.append("</table>")
    parts.append("<ul class=\"answers\">")
    for code, answer in op.get("responses", {}).items():
        content = answer.get("content", {})
        kinds = ", ".join(
            f"{e(media)}" + (f": {_type(body['schema'])}" if body.get("schema") else "")
            for media, body in content.items())
        parts.append(f"<li><b>{e(str(code))}</b> {e(answer.get('description', ''))}"
                     + (f" — {kinds}" if kinds else "") + "</li>")
    parts.append("</ul></section>")
    return "\n".join(parts)


def _schema(name: str, schema: dict[str, Any]) -> str:
    e = html.escape
    required = set(schema.get("required", []))
    rows = "".join(
        f"<tr><td><code>{e(field)}</code>{'' if field in required else ' (optional)'}</td>"
        f"<td>{_type(spec)}</td><td>{e(spec.get('description', ''))}</td></tr>"
        for field, spec in schema.get("properties", {}).items())
    return (f'<section class="schema" id="schema-{e(name)}"><h3>{e(name)}</h3>'
            + (f"<p class=\"muted\">{e(schema['description'])}</p>" if schema.get("description") else "")
            + (f"<table><tr><th>field</th><th>type</th><th>meaning</th></tr>{rows}</table>"
               if rows else "") + "</section>")


def render(schema: dict[str, Any]) -> str:
    """The page of `schema` (FastAPI's `app.openapi()`)."""
    e = html.escape
    info = schema.get("info", {})
    operations, toc = [], []
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                op = item[method]
                operations.append(_operation(method, path, op, bool(op.get("security"))))
                toc.append(f'<li><a href="#{e(method)}-{e(path)}"><span class="method">'
                           f"{e(method.upper())}</span> <code>{e(path)}</code></a> "
                           f"{e(op.get('summary', ''))}</li>")
    toc += [f"<li><span class=\"method\">{m}</span> <code>{e(p)}</code> {e(what)}</li>"
            for m, p, what in UNLISTED]
    schemas = [_schema(name, body) for name, body in
               sorted(schema.get("components", {}).get("schemas", {}).items())]
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(info.get('title', 'API'))} API</title>", '<link rel="icon" href="data:,">',
        '<link rel="stylesheet" href="assets/style.css">', "</head>",
        '<body class="docs"><header><h1>' + e(info.get("title", "API"))
        + f' <span>· HTTP API v{e(str(info.get("version", "")))}</span></h1>'
          '<p><a href="./">dashboard</a> · <a href="openapi.json">openapi.json</a></p></header>',
        "<main>", f"<section><p>{e(info.get('description', ''))} A token, where an endpoint needs "
        "one, goes in <code>Authorization: Bearer &lt;token&gt;</code>.</p>",
        '<h2>Endpoints</h2><ul class="toc">', *toc, "</ul></section>",
        "<section><h2>Answers</h2>", *operations, "</section>",
        "<section><h2>Schemas</h2>", *schemas, "</section>", "</main></body></html>", ""])

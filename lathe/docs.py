"""Docs that are true: the tables of docs/API.md and docs/TOOLBOX.md are generated from the OpenAPI schema.

Each doc is hand-written prose with generated blocks between markers:

    <!-- generated:start config optimizer max_grad_norm -->
    (rewritten by `python -m lathe.docs`)
    <!-- generated:end -->

Everything outside the markers is kept as written; what fills a block is named after
`generated:start` (the marker lines themselves are hand-written, so the docs decide the layout):

    endpoints TAG       the operations tagged TAG: method, path, the route's docstring, parameters,
                        error statuses; `endpoints *` renders every tag no other block placed, each
                        under its own `##` heading (nothing when all are placed)
    body SCHEMA         a request schema's fields: type, default, allowed values, description
    object SCHEMA       a response schema's fields: type, description
    config FIELD ...    those fields of TrainingConfig (a job's `config`), nested configs flattened
                        to dotted names; `config *` renders the fields no other block placed,
                        under an `## Other fields` heading (nothing when all are placed)

`python -m lathe.docs` rewrites the docs; `--check` prints a diff and exits 1 when one is stale
(tests/ops/test_docs.py runs the same comparison). The schema is `create_app(settings).openapi()`,
so, like the CLI, this module is a composition root: it imports api lazily.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/API.md", "docs/TOOLBOX.md")
METHODS = ("get", "post", "put", "patch", "delete")
REST = "*"

MARKER = re.compile(r"(<!-- generated:start (?P<args>[^>]*?) -->\n)(?P<body>.*?)(<!-- generated:end -->)", re.S)


class DocsError(Exception):
    """A doc's markers can't be filled (an unknown kind or schema)."""


def openapi_schema() -> dict[str, Any]:
    """The app's OpenAPI schema, built with throwaway settings (no database or broker is touched)."""
    from api.main import create_app
    from lathe.settings import Settings

    with tempfile.TemporaryDirectory(prefix="lathe-docs-") as tmp:
        settings = Settings(data_dir=Path(tmp), database_url=f"sqlite:///{tmp}/docs.db", redis_url=None)
        return create_app(settings).openapi()


# --- reading JSON schema -------------------------------------------------------------------------

def _ref_name(node: dict[str, Any]) -> str | None:
    ref = node.get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


def _branches(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternatives of a property (`anyOf`/`oneOf`, a one-member `allOf`), or the property itself."""
    for key in ("anyOf", "oneOf"):
        if key in node:
            return [b for branch in node[key] for b in _branches(branch)]
    if len(node.get("allOf", ())) == 1:
        return _branches(node["allOf"][0])
    return [node]


def _resolve(node: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    name = _ref_name(node)
    return schemas[name] if name else node


def _is_object_schema(node: dict[str, Any]) -> bool:
    return "properties" in node


def _code(value: Any) -> str:
    text = value if isinstance(value, str) and value else json.dumps(value)
    return f"`{text}`"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _type(node: dict[str, Any], schemas: dict[str, Any], *, link_objects: bool = True) -> str:
    """A property's type as the tables show it: integer or `auto`, list of string, `Hyperparameters` or null."""
    parts: list[str] = []
    branches = _branches(node)
    has_enum = any("enum" in _resolve(b, schemas) for b in branches)
    for branch in branches:
        target = _resolve(branch, schemas)
        name = _ref_name(branch)
        if "const" in target:
            text = "" if has_enum else _code(target["const"])
        elif "enum" in target:
            text = target.get("type", "string")
        elif _is_object_schema(target):
            text = f"`{name}`" if name and link_objects else "object"
        elif target.get("type") == "array":
            text = f"list of {_type(target.get('items', {}), schemas, link_objects=link_objects)}"
        elif target.get("type") == "object" and isinstance(target.get("additionalProperties"), dict) \
                and target["additionalProperties"]:
            text = f"map of {_type(target['additionalProperties'], schemas, link_objects=link_objects)}"
        else:
            text = target.get("type", "any")
        if text and text not in parts:
            parts.append(text)
    if "null" in parts:  # nullable reads last
        parts = [p for p in parts if p != "null"] + ["null"]
    return " or ".join(parts) or "any"


BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")


def _interval(node: dict[str, Any]) -> str:
    """`[1, 100]`, `(0, 1]`, `≥ 1`, ... (an integer's bounds may come as floats: `le=1.0`)."""
    if node.get("type") == "integer":
        node = {k: int(v) if k in BOUNDS and float(v).is_integer() else v for k, v in node.items()}
    lo = ("[", node["minimum"]) if "minimum" in node else ("(", node["exclusiveMinimum"]) \
        if "exclusiveMinimum" in node else None
    hi = ("]", node["maximum"]) if "maximum" in node else (")", node["exclusiveMaximum"]) \
        if "exclusiveMaximum" in node else None
    if lo and hi:
        return f"{lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f"{'≥' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f"{'≤' if hi[0] == ']' else '<'} {hi[1]}"
    return ""


def _allowed(node: dict[str, Any], schemas: dict[str, Any]) -> str:
    """Bounds and choices of one property, gathered over its alternatives."""
    parts: list[str] = []
    branches = _branches(node)
    choices = [v for b in branches for v in _resolve(b, schemas).get("enum", ())]
    if choices:  # a const beside an enum (`"auto"` beside ProblemType's values) is one more choice
        choices += [t["const"] for b in branches if "const" in (t := _resolve(b, schemas))]
        parts.append(", ".join(_code(v) for v in choices))
    for branch in branches:
        target = _resolve(branch, schemas)
        found: list[str] = []
        if pattern := target.get("pattern"):
            alternatives = re.fullmatch(r"\^\(([\w|-]+)\)\$", pattern)
            found.append(", ".join(_code(a) for a in alternatives.group(1).split("|")) if alternatives
                         else f"matches `{pattern}`")
        if interval := _interval(target):
            found.append(interval)
        if "minLength" in target or "maxLength" in target:
            lo, hi = target.get("minLength"), target.get("maxLength")
            found.append(f"length {lo}–{hi}" if lo and hi is not None else f"length ≤ {hi}" if hi is not None
                         else f"length ≥ {lo}")
        if "maxItems" in target:
            found.append(f"≤ {target['maxItems']} items")
        if "maxProperties" in target:
            found.append(f"≤ {target['maxProperties']} entries")
        if target.get("type") == "array" and (items := _allowed(target.get("items", {}), schemas)):
            found.append(f"each {items}")
        extra = target.get("additionalProperties")
        if target.get("type") == "object" and isinstance(extra, dict) and (values := _allowed(extra, schemas)):
            found.append(f"values {values}")
        parts += [f for f in found if f not in parts]
    return "; ".join(parts)


def _description(node: dict[str, Any], schemas: dict[str, Any]) -> str:
    """The property's description, else that of the object it refers to."""
    if node.get("description"):
        return node["description"]
    for branch in _branches(node):
        target = _resolve(branch, schemas)
        if _is_object_schema(target) and target.get("description"):
            return target["description"]
    return ""


def _object_branch(node: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any] | None:
    for branch in _branches(node):
        target = _resolve(branch, schemas)
        if _is_object_schema(target):
            return target
    return None


def _map_values(node: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any] | None:
    """The object schema of a map's values (`config.search.space`: key -> range), if it is one."""
    for branch in _branches(node):
        values = _resolve(branch, schemas).get("additionalProperties")
        if isinstance(values, dict) and _is_object_schema(_resolve(values, schemas)):
            return _resolve(values, schemas)
    return None


def _default(node: dict[str, Any], *, required: bool, fallback: Any = None) -> str:
    if "default" in node:
        return _code(node["default"])
    if required:
        return "required"
    return _code(fallback) if fallback is not None else ""


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) if i else c for i, c in enumerate(row)) + " |" for row in rows]
    return "\n".join(lines)


# --- blocks --------------------------------------------------------------------------------------

def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():  # in the order the routes are declared
            if method in METHODS:
                yield path, method, op


def _parameters(op: dict[str, Any], schemas: dict[str, Any]) -> str:
    out = []
    for p in op.get("parameters", ()):
        if p.get("in") == "path":
            continue
        node = p.get("schema", {})
        bits = [b for b in (_allowed(node, schemas), f"default {_code(node['default'])}" if "default" in node
                            else "") if b]
        where = "header " if p["in"] == "header" else ""
        out.append(f"{where}`{p['name']}`" + (f" ({', '.join(bits)})" if bits else ""))
    return ", ".join(out)


def _endpoints_table(ops: list[tuple[str, str, dict[str, Any]]], schemas: dict[str, Any]) -> str:
    rows = []
    for path, method, op in ops:
        errors = sorted(int(s) for s in op.get("responses", {}) if s.isdigit() and int(s) >= 300)
        rows.append((method.upper(), f"`{path}`", op.get("description") or op.get("summary", ""),
                     _parameters(op, schemas), " ".join(map(str, errors))))
    return _table(("method", "path", "what it does", "query / header", "errors"), rows)


def _tag(op: dict[str, Any]) -> str:
    return (op.get("tags") or ["other"])[0]


def render_endpoints(schema: dict[str, Any], tag: str, placed: set[str]) -> str:
    schemas = schema.get("components", {}).get("schemas", {})
    ops = list(_operations(schema))
    if tag != REST:
        return _endpoints_table([o for o in ops if _tag(o[2]) == tag], schemas)
    rest = sorted({_tag(o[2]) for o in ops} - placed)
    return "\n\n".join(f"## {t}\n\n" + _endpoints_table([o for o in ops if _tag(o[2]) == t], schemas)
                       for t in rest)


def _schema(schema: dict[str, Any], name: str) -> dict[str, Any]:
    try:
        return schema["components"]["schemas"][name]
    except KeyError:
        raise DocsError(f"no schema {name!r} in the OpenAPI components") from None


def render_body(schema: dict[str, Any], name: str) -> str:
    schemas, target = schema["components"]["schemas"], _schema(schema, name)
    required = set(target.get("required", ()))
    rows = [(f"`{field}`", _type(node, schemas), _default(node, required=field in required),
             _allowed(node, schemas), _description(node, schemas))
            for field, node in target.get("properties", {}).items()]
    return _table(("field", "type", "default", "allowed", "description"), rows)


def render_object(schema: dict[str, Any], name: str) -> str:
    schemas, target = schema["components"]["schemas"], _schema(schema, name)
    rows = [(f"`{field}`", _type(node, schemas), _description(node, schemas))
            for field, node in target.get("properties", {}).items()]
    return _table(("field", "type", "description"), rows)


def _config_defaults() -> dict[str, Any]:
    """Every default of TrainingConfig by dotted name: the schema leaves out `default_factory` ones."""
    from core.spec import TrainingConfig

    def walk(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        yield prefix, value
        if isinstance(value, dict) and prefix.count(".") < 8:
            for key, sub in value.items():
                yield from walk(sub, f"{prefix}.{key}" if prefix else key)

    return dict(walk(TrainingConfig().model_dump(mode="json"), ""))


def config_rows(schema: dict[str, Any], fields: list[str]) -> list[tuple[str, ...]]:
    """Table rows of the given top-level TrainingConfig fields, nested configs flattened to dotted names."""
    schemas, defaults = schema["components"]["schemas"], _config_defaults()
    rows: list[tuple[str, ...]] = []

    def add(name: str, node: dict[str, Any], required: bool) -> None:
        nested = _object_branch(node, schemas)
        fallback = defaults.get(name)
        default = _default(node, required=required, fallback=None if nested else fallback)
        if nested is not None and not default:
            default = "fields below"
        rows.append((f"`{name}`", _type(node, schemas, link_objects=False), default, _allowed(node, schemas),
                     _description(node, schemas)))
        # A map's values are documented under the map's name (`search.space.type`: each entry's type).
        nested = nested if nested is not None else _map_values(node, schemas)
        if nested is not None:
            inner_required = set(nested.get("required", ()))
            for key, sub in nested.get("properties", {}).items():
                add(f"{name}.{key}", sub, key in inner_required)

    config = _schema(schema, "TrainingConfig")
    required = set(config.get("required", ()))
    for field in fields:
        add(field, config["properties"][field], field in required)
    return rows


def render_config(schema: dict[str, Any], args: list[str], placed: set[str]) -> str:
    properties = _schema(schema, "TrainingConfig")["properties"]
    if args == [REST]:
        rest = [f for f in properties if f not in placed]
        if not rest:
            return ""
        return ("## Other fields\n\nNot yet placed in a group above.\n\n"
                + _table(("field", "type", "default", "allowed", "description"), config_rows(schema, rest)))
    # A name no longer in the schema is dropped (it is no longer true); its successor shows in `config *`.
    fields = [f for f in args if f in properties]
    return _table(("field", "type", "default", "allowed", "description"), config_rows(schema, fields))


def render(text: str, schema: dict[str, Any]) -> str:
    """`text` with every generated block refilled from `schema`; the rest unchanged."""
    blocks = [m.group("args").split() for m in MARKER.finditer(text)]
    placed_tags = {a[1] for a in blocks if len(a) == 2 and a[0] == "endpoints" and a[1] != REST}
    placed_fields = {f for a in blocks if a and a[0] == "config" for f in a[1:] if f != REST}

    def fill(match: re.Match[str]) -> str:
        kind, *args = match.group("args").split() or [""]
        if kind == "endpoints" and len(args) == 1:
            body = render_endpoints(schema, args[0], placed_tags)
        elif kind == "body" and len(args) == 1:
            body = render_body(schema, args[0])
        elif kind == "object" and len(args) == 1:
            body = render_object(schema, args[0])
        elif kind == "config" and args:
            body = render_config(schema, args, placed_fields)
        else:
            raise DocsError(f"unknown generated block {match.group('args')!r}")
        content = f"\n{body}\n\n" if body else ""
        return match.group(1) + content + match.group(4)

    return MARKER.sub(fill, text)


def expected_docs(root: Path = ROOT, schema: dict[str, Any] | None = None) -> dict[Path, tuple[str, str]]:
    """{path: (committed text, regenerated text)} for every generated doc."""
    schema = schema if schema is not None else openapi_schema()
    out = {}
    for rel in DOCS:
        path = root / rel
        current = path.read_text(encoding="utf-8")
        out[path] = (current, render(current, schema))
    return out


def stale_diff(docs: dict[Path, tuple[str, str]], root: Path = ROOT) -> str:
    diff: list[str] = []
    for path, (current, fresh) in docs.items():
        rel = path.relative_to(root).as_posix()
        diff += difflib.unified_diff(current.splitlines(keepends=True), fresh.splitlines(keepends=True),
                                     fromfile=f"{rel} (committed)", tofile=f"{rel} (generated)")
    return "".join(diff)


def main(argv: list[str] | None = None, *, root: Path = ROOT) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--check"]):
        print("usage: python -m lathe.docs [--check]", file=sys.stderr)
        return 2
    docs = expected_docs(root)
    if argv == ["--check"]:
        diff = stale_diff(docs, root)
        if diff:
            sys.stdout.write(diff)
            print("\nThe docs are stale: run `make docs` (python -m lathe.docs).", file=sys.stderr)
            return 1
        return 0
    for path, (current, fresh) in docs.items():
        if fresh != current:
            path.write_text(fresh, encoding="utf-8")
            print(f"rewrote {path.relative_to(root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

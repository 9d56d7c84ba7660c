"""api/routes/ is HTTP only (../shared/STYLE.md): a route parses the request, calls a lathe service
function and renders its result. No SQL there: no sqlalchemy statement builders, no session
queries or writes. Every route module is checked; none is excluded."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROUTES = sorted((ROOT / "api" / "routes").glob("*.py"))
BUILDERS = {"select", "update", "delete", "insert", "text"}
SESSION_CALLS = {"add", "add_all", "delete", "execute", "scalar", "scalars", "get", "query", "merge"}


def _names_session(node: ast.expr) -> bool:
    """`session`, `db_session`, `self.session`, `request.state.session`, `factory()`... a session."""
    if isinstance(node, ast.Name):
        return "session" in node.id.lower()
    if isinstance(node, ast.Attribute):
        return "session" in node.attr.lower()
    if isinstance(node, ast.Call):  # session_factory().execute(...)
        return _names_session(node.func)
    return False


def sql_in(source: str, filename: str = "<route>") -> list[str]:
    """Each use of SQL in a module's source, as "line N: what"."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    sqlalchemy_modules: set[str] = set()  # local names bound to sqlalchemy (or a submodule)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sqlalchemy":
            for alias in node.names:
                if alias.name in BUILDERS or alias.name == "*":
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sqlalchemy":
                    sqlalchemy_modules.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in BUILDERS:
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in sqlalchemy_modules:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in SESSION_CALLS and _names_session(node.func.value):
                found.append(f"line {node.lineno}: {ast.unparse(node.func)}(...)")
    return found


def test_there_are_routes_to_check():
    assert {p.name for p in ROUTES} >= {"files.py", "health.py", "job_data.py", "jobs.py", "models.py"}


@pytest.mark.parametrize("path", ROUTES, ids=lambda p: p.name)
def test_route_module_has_no_sql(path: Path):
    found = sql_in(path.read_text(), str(path))
    assert not found, f"{path.relative_to(ROOT)} uses SQL; call a lathe service function instead: {found}"


@pytest.mark.parametrize("source", [
    "from sqlalchemy import select\n",
    "from sqlalchemy import text as sql_text\n",
    "from sqlalchemy.sql import update\n",
    "import sqlalchemy as sa\nsa.insert(T)\n",
    "import sqlalchemy\nsqlalchemy.sql.delete(T)\n",
    "def f(session):\n    session.add(row)\n",
    "def f(session):\n    return session.scalar(q)\n",
    "def f(session):\n    return list(session.scalars(q))\n",
    "def f(db_session):\n    db_session.execute(q)\n",
    "def f(request):\n    request.app.state.session_factory().get(T, 1)\n",
    "def f(self):\n    self.session.query(T)\n",
    "def f(session):\n    session.delete(row)\n",
])
def test_the_check_sees_sql(source: str):
    assert sql_in(source)


def test_the_check_leaves_http_alone():
    source = ("from sqlalchemy.orm import Session\n"
              "def f(request, session: Session):\n"
              "    request.headers.get('last-event-id')\n"
              "    upload.fields.get('purpose')\n"
              "    service.delete_file(session, tenant_id='t', file_id='f')\n")
    assert sql_in(source) == []

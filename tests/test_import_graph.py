"""Imports flow one way (../shared/STYLE.md): api -> lathe, core; worker -> lathe, core;
lathe -> core (its CLI, the composition root, starts api and worker); core -> nothing of ours.
Measured from every import statement, including those inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "worker", "lathe", "core")
# The composition root: the `lathe` command wires api and worker into processes (and its docs
# generator reads the API schema).
ROOTS = {"lathe/cli.py", "lathe/stack.py", "lathe/docs.py"}  # docs.py renders the API schema into docs/
ALLOWED = {"api": {"lathe", "core"}, "worker": {"lathe", "core"}, "lathe": {"core"}, "core": set()}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def graph() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the modules where that import happens."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for name in imports_of(path):
                top = name.split(".")[0]
                if top in PACKAGES and top != pkg:
                    edges[(pkg, top)].append(rel)
    return edges


def test_imports_flow_one_way():
    bad = {edge: sorted(set(where) - ROOTS) for edge, where in graph().items() if edge[1] not in ALLOWED[edge[0]]}
    bad = {edge: where for edge, where in bad.items() if where}
    assert not bad, bad


def test_api_and_worker_never_import_each_other():
    edges = graph()
    assert ("api", "worker") not in edges and ("worker", "api") not in edges


def test_lathe_service_layer_imports_only_torch_free_core():
    code = ("import sys, lathe.jobs, lathe.lifecycle, lathe.queue, lathe.model_source, lathe.keys; "
            "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules, "
            "[m for m in ('torch', 'fastapi') if m in sys.modules]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_worker_tasks_import_no_web_stack():
    code = "import sys, worker.tasks, worker.sweeper; assert 'fastapi' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

"""Files a newcomer can hold in their head: no module of the packages over ~400 lines."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 420  # "~400": a docstring's worth of slack, not a second concern


def test_no_module_over_the_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for pkg in ("api", "worker", "lathe", "core") for p in (ROOT / pkg).rglob("*.py")}
    assert not {name: n for name, n in sizes.items() if n > LIMIT}

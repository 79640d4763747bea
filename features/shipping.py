"""Ship the project's code to Spark executors that do not share this process's Python path.

With ``local[*]`` the executors are threads of the driver's JVM and their Python workers are
forked from the driver's, so they import ``features`` like the driver does. On a cluster
(``spark://…``) each executor is its own JVM, started by a worker with the worker's
environment and working folder: nothing there puts the project on its Python path. So the
session (:func:`features.spark.spark_session`) zips the packages that code running inside a
task imports, :data:`SHIPPED_PACKAGES`, and adds the zip with ``SparkContext.addPyFile``:
every executor fetches it into its work folder, and every Python worker puts it on
``sys.path`` ahead of site-packages, so a function pickled by reference
(``features.x.f``) is imported from the zip on the executor.

``features`` is enough: the Spark jobs live there and it imports nothing from the packages
above it (``tests/unit/test_import_direction.py``). The zip is deterministic (sorted entries,
fixed timestamps and modes), named by the digest of its bytes and cached under
``$AFM_HOME/cache/pyfiles/``: the same code gives the same file, and a changed file gives a
new name (Spark refuses to add a different file under a name it already serves).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from features.config import afm_home

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

#: top-level packages the executors need (what tasks import)
SHIPPED_PACKAGES: tuple[str, ...] = ("features",)
#: file kinds in the zip: modules and the package data pyproject declares (feature_repo/*.yaml)
SHIPPED_SUFFIXES = (".py", ".yaml")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def package_dir(name: str) -> Path:
    """The folder a top-level package is imported from."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} to ship to the Spark executors is not importable")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def zip_bytes(packages: tuple[str, ...] = SHIPPED_PACKAGES) -> bytes:
    """A zip of ``packages`` (their modules and YAML files, no caches), the same bytes for the same files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in packages:
            root = package_dir(name)
            files = sorted(
                p
                for p in root.rglob("*")
                if p.is_file() and p.suffix in SHIPPED_SUFFIXES and "__pycache__" not in p.parts
            )
            for path in files:
                info = zipfile.ZipInfo(f"{name}/{path.relative_to(root).as_posix()}", date_time=_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                info.create_system = 3  # unix, whatever machine builds it
                zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def project_zip(cache_dir: Path | None = None, packages: tuple[str, ...] = SHIPPED_PACKAGES) -> Path:
    """The zip of ``packages``, written once per content to ``cache_dir`` (default ``$AFM_HOME/cache/pyfiles``).

    Returns:
        ``<cache_dir>/<packages>-<first 16 hex of the zip's sha256>.zip``.
    """
    data = zip_bytes(packages)
    folder = cache_dir or afm_home() / "cache" / "pyfiles"
    path = folder / f"{'-'.join(packages)}-{hashlib.sha256(data).hexdigest()[:16]}.zip"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # another process writing the same name writes the same bytes
    return path


def ship_project_code(spark: SparkSession, cache_dir: Path | None = None) -> Path:
    """Add the project's zip to ``spark``'s Python files (executors fetch it and import from it).

    Returns:
        The zip's path on this machine.
    """
    path = project_zip(cache_dir)
    spark.sparkContext.addPyFile(str(path))
    return path

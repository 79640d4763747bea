"""Fill the result tables of the experiment write-ups from their JSON-lines files.

A study under ``docs/experiments/`` keeps its figures in ``results/<name>.jsonl``, one JSON
object per run or table row, and its markdown holds a marked block wherever a table of
them goes::

    <!-- table: results/beauty_seeds.jsonl columns=run,seed,ndcg@10,hr@10 -->
    (whatever is here is replaced by the generated table)
    <!-- /table -->

The opening marker names the JSONL file (relative to the markdown file's folder) and the
``columns`` to show, in order, as ``key=value`` words split like a shell line, so a column
whose name has spaces is quoted: ``columns="run,click AUC"``. The header row is the column
names; a row that lacks a column (or has ``null``) gets an empty cell; a column no row has
is an error. Rows keep the file's order. Columns whose cells are all numbers are
right-aligned. Markers inside fenced code blocks are left alone, so a page can show the
syntax.

Numbers are printed exactly as they are written in the JSONL file: the figures are stored
as JSON numbers, and the reader keeps each number's source text, so ``0.0330`` stays
``0.0330`` and ``3e-3`` stays ``3e-3`` (no float formatting). Strings are printed as they
are (markdown inside them works; ``|`` is escaped), so a figure that needs a unit, a
thousands separator or a ``±`` is stored as a string.

Run it from the repository root::

    python -m afm.report docs/experiments          # rewrite every *.md there in place
    python -m afm.report --check docs/experiments  # fail, naming the stale files, without writing
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OPEN = "<!-- table:"
CLOSE = "<!-- /table -->"
MARKER_KEYS = frozenset({"columns"})
DEFAULT_DIR = Path("docs/experiments")


class TableError(ValueError):
    """A marked block cannot be filled: bad marker, missing or unreadable JSONL file, unknown column."""


class StaleTablesError(RuntimeError):
    """``--check`` found markdown files whose tables differ from what their JSONL files give."""

    def __init__(self, stale: Sequence[Path]) -> None:
        self.stale = list(stale)
        names = ", ".join(str(p) for p in self.stale)
        super().__init__(f"tables out of date in {names}: run `python -m afm.report` on their folder")


class Figure(float):
    """A JSON number that remembers its source text, so it renders as it was written.

    Example:
        >>> json.loads('{"ndcg@10": 0.0330}', parse_float=Figure)["ndcg@10"].text
        '0.0330'
    """

    text: str

    def __new__(cls, text: str) -> Figure:
        value = super().__new__(cls, text)
        value.text = text
        return value


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL results file: one JSON object per non-blank line, numbers kept as :class:`Figure`.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        The rows in file order.

    Raises:
        TableError: The file is missing, empty, or a line is not a JSON object (the message names
            the file and line).

    Example:
        >>> read_rows(Path("docs/experiments/results/beauty_seeds.jsonl"))[0]["seed"]  # doctest: +SKIP
        0
    """
    if not path.is_file():
        raise TableError(f"results file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_float=Figure)
        except json.JSONDecodeError as exc:
            raise TableError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise TableError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise TableError(f"results file has no rows: {path}")
    return rows


def _cell(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Figure):
        return value.text
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        if "\n" in value or "\r" in value:
            raise TableError(f"{where}: a table cell cannot hold a line break")
        return value.replace("|", "\\|")
    raise TableError(f"{where}: a table cell must be a number, string, boolean or null, got {type(value).__name__}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], source: str = "rows") -> str:
    """A markdown table of ``rows`` with ``columns`` in order (no trailing newline).

    Args:
        rows: The JSONL rows (see :func:`read_rows`).
        columns: Keys to show, in order; each must be present in at least one row.
        source: What to call the rows in an error message (the file name).

    Returns:
        The header line, the alignment line and one line per row.

    Raises:
        TableError: A column is in no row, or a cell is a list or an object.

    Example:
        >>> print(table([{"run": "a", "ndcg@10": Figure("0.0330")}], ["run", "ndcg@10"]))
        | run | ndcg@10 |
        |---|---:|
        | a | 0.0330 |
    """
    if not columns:
        raise TableError(f"{source}: no columns to show")
    present = {key for row in rows for key in row}
    for column in columns:
        if column not in present:
            known = ", ".join(sorted(present))
            raise TableError(f"{source}: no row has the column {column!r} (its columns: {known})")
    lines = ["| " + " | ".join(_cell(c, source) for c in columns) + " |"]
    align = []
    for column in columns:
        values = [row[column] for row in rows if row.get(column) is not None]
        align.append("---:" if values and all(_is_number(v) for v in values) else "---")
    lines.append("|" + "|".join(align) + "|")
    for number, row in enumerate(rows, start=1):
        cells = [_cell(row.get(column), f"{source} row {number}, column {column!r}") for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_marker(line: str, where: str) -> tuple[str, list[str]]:
    body = line.strip()[len(OPEN) :]
    if not body.endswith("-->"):
        raise TableError(f"{where}: a table marker must end with '-->' on the same line")
    try:
        words = shlex.split(body[: -len("-->")])
    except ValueError as exc:
        raise TableError(f"{where}: cannot read the table marker ({exc})") from exc
    if not words:
        raise TableError(f"{where}: the table marker names no results file")
    path, options = words[0], {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or key not in MARKER_KEYS:
            raise TableError(f"{where}: unknown table marker option {word!r} (known: {', '.join(sorted(MARKER_KEYS))})")
        options[key] = value
    if "columns" not in options:
        raise TableError(f"{where}: the table marker has no columns=…")
    columns = [c.strip() for c in options["columns"].split(",") if c.strip()]
    return path, columns


def _render(md_text: str, base_dir: Path, name: str = "<markdown>") -> tuple[str, int]:
    out: list[str] = []
    lines = md_text.splitlines(keepends=True)
    fence: str | None = None
    count = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        i += 1
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
        elif fence is not None and stripped.startswith(fence):
            fence = None
        if fence is not None or not stripped.startswith(OPEN):
            if fence is None and stripped == CLOSE:
                raise TableError(f"{name}:{i}: '{CLOSE}' without an opening table marker")
            out.append(line)
            continue
        where = f"{name}:{i}"
        path, columns = _parse_marker(stripped, where)
        end = next((j for j in range(i, len(lines)) if lines[j].strip() == CLOSE), None)
        nested = next((j for j in range(i, end or len(lines)) if lines[j].strip().startswith(OPEN)), None)
        if end is None or nested is not None:
            raise TableError(f"{where}: table marker without its '{CLOSE}' line")
        try:
            rendered = table(read_rows(base_dir / path), columns, source=path)
        except TableError as exc:
            raise TableError(f"{where}: {exc}") from exc
        newline = "\n"
        out.append(line if line.endswith("\n") else line + newline)
        out.append(rendered + newline)
        out.append(lines[end])
        count += 1
        i = end + 1
    return "".join(out), count


def render_tables(md_text: str, base_dir: Path) -> str:
    """Fill every marked table block of a markdown text from its JSONL file.

    Args:
        md_text: The markdown, with blocks ``<!-- table: FILE columns=a,b -->`` … ``<!-- /table -->``.
        base_dir: The folder the ``FILE`` paths are relative to (the markdown file's folder).

    Returns:
        The text with each block's content replaced by the generated table; the rest unchanged.

    Raises:
        TableError: A marker is malformed or unclosed, a file is missing, or a column is unknown;
            the message gives the marker's line, the file and the column.

    Example:
        >>> md = "<!-- table: results/x.jsonl columns=run,ndcg@10 -->\\n<!-- /table -->\\n"
        >>> render_tables(md, Path("docs/experiments"))  # doctest: +SKIP
        '<!-- table: … -->\\n| run | ndcg@10 |\\n|---|---:|\\n| a | 0.0330 |\\n<!-- /table -->\\n'
    """
    return _render(md_text, base_dir)[0]


def render_docs(experiments_dir: Path, check: bool = False) -> list[Path]:
    """Regenerate the tables of every ``*.md`` file directly in ``experiments_dir``.

    Args:
        experiments_dir: The folder of the study pages (``docs/experiments``).
        check: Write nothing; raise :class:`StaleTablesError` if any page's tables are not
            what their JSONL files give.

    Returns:
        The pages that were rewritten (an empty list when all were up to date).

    Raises:
        TableError: A page cannot be rendered (the message names the page and line).
        StaleTablesError: With ``check=True``, naming every stale page.

    Example:
        >>> render_docs(Path("docs/experiments"), check=True)  # doctest: +SKIP
        []
    """
    return _write(_pages(experiments_dir), check)


def _write(pages: list[tuple[Path | None, str, int]], check: bool) -> list[Path]:
    changed = [path for path, _, _ in pages if path is not None]
    if check:
        if changed:
            raise StaleTablesError(changed)
        return []
    for path, text, _ in pages:
        if path is not None:
            path.write_text(text, encoding="utf-8")
    return changed


def _pages(experiments_dir: Path) -> list[tuple[Path | None, str, int]]:
    """(path if its text changes else None, new text, number of tables) for each page."""
    if not experiments_dir.is_dir():
        raise TableError(f"not a folder: {experiments_dir}")
    pages = []
    for path in sorted(experiments_dir.glob("*.md")):
        old = path.read_text(encoding="utf-8")
        new, count = _render(old, path.parent, name=str(path))
        pages.append((path if new != old else None, new, count))
    return pages


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m afm.report [--check] [DIR]``: regenerate (or check) the tables; print one line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when ``--check`` finds stale pages or a page cannot be rendered.

    Example:
        >>> main(["--check", "docs/experiments"])  # doctest: +SKIP
        afm.report: docs/experiments: 10 pages, 24 tables, up to date
        0
    """
    parser = argparse.ArgumentParser(
        prog="python -m afm.report", description="Fill the result tables of docs/experiments/*.md from results/*.jsonl."
    )
    parser.add_argument("--check", action="store_true", help="Write nothing; fail if a table is out of date.")
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR, help=f"default: {DEFAULT_DIR}")
    args = parser.parse_args(argv)
    try:
        pages = _pages(args.dir)
        tables = sum(count for _, _, count in pages)
        changed = _write(pages, args.check)
    except (TableError, StaleTablesError) as exc:
        print(f"afm.report: error: {exc}", file=sys.stderr)
        return 1
    state = "up to date" if not changed else f"{len(changed)} rewritten"
    print(f"afm.report: {args.dir}: {len(pages)} pages, {tables} tables, {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

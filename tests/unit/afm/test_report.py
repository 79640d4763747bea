"""afm.report: result tables of docs/experiments generated from their JSONL files."""

from __future__ import annotations

from pathlib import Path

import pytest

from afm.report import StaleTablesError, TableError, main, render_docs, render_tables

REPO = Path(__file__).resolve().parents[3]
EXPERIMENTS = REPO / "docs" / "experiments"

ROWS = (
    '{"run": "default", "seed": 0, "ndcg@10": 0.0330, "hr@10": 0.0557, "note": "a | b"}\n'
    "\n"
    '{"run": "wide", "seed": 1, "ndcg@10": 3.1e-2, "device": "cpu"}\n'
)
PAGE = (
    "# Study\n"
    "\n"
    "<!-- table: results/runs.jsonl columns=run,ndcg@10,hr@10,note -->\n"
    "stale content\n"
    "<!-- /table -->\n"
    "\n"
    "Text after.\n"
)
EXPECTED = (
    "# Study\n"
    "\n"
    "<!-- table: results/runs.jsonl columns=run,ndcg@10,hr@10,note -->\n"
    "| run | ndcg@10 | hr@10 | note |\n"
    "|---|---:|---:|---|\n"
    "| default | 0.0330 | 0.0557 | a \\| b |\n"
    "| wide | 3.1e-2 |  |  |\n"
    "<!-- /table -->\n"
    "\n"
    "Text after.\n"
)


@pytest.fixture
def study(tmp_path: Path) -> Path:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "runs.jsonl").write_text(ROWS, encoding="utf-8")
    (tmp_path / "study.md").write_text(PAGE, encoding="utf-8")
    return tmp_path


def test_render_fills_the_block_with_columns_in_order_and_numbers_as_written(study: Path) -> None:
    assert render_tables(PAGE, study) == EXPECTED


def test_render_is_stable_and_leaves_text_without_markers_alone(study: Path) -> None:
    assert render_tables(EXPECTED, study) == EXPECTED
    plain = "# Notes\n\nno tables here\n"
    assert render_tables(plain, study) == plain


def test_quoted_column_names_may_hold_spaces(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text('{"click AUC": 0.710, "seed": 2}\n', encoding="utf-8")
    md = '<!-- table: r.jsonl columns="seed,click AUC" -->\n<!-- /table -->\n'
    out = render_tables(md, tmp_path)
    assert "| seed | click AUC |\n|---:|---:|\n| 2 | 0.710 |\n" in out


def test_markers_inside_code_fences_are_not_rendered(tmp_path: Path) -> None:
    md = "```markdown\n<!-- table: results/nowhere.jsonl columns=a -->\n<!-- /table -->\n```\n"
    assert render_tables(md, tmp_path) == md


def test_missing_file_error_names_the_file(tmp_path: Path) -> None:
    md = "intro\n<!-- table: results/absent.jsonl columns=run -->\n<!-- /table -->\n"
    with pytest.raises(TableError, match=r"results file not found: .*results/absent\.jsonl") as info:
        render_tables(md, tmp_path)
    assert ":2:" in str(info.value)  # the marker's line


def test_unknown_column_error_names_column_and_file(study: Path) -> None:
    md = "<!-- table: results/runs.jsonl columns=run,mrr -->\n<!-- /table -->\n"
    with pytest.raises(TableError, match=r"results/runs\.jsonl: no row has the column 'mrr'"):
        render_tables(md, study)


@pytest.mark.parametrize(
    ("md", "message"),
    [
        ("<!-- table: results/runs.jsonl columns=run -->\nno end\n", "without its '<!-- /table -->'"),
        ("<!-- table: results/runs.jsonl -->\n<!-- /table -->\n", "no columns="),
        ("<!-- table: results/runs.jsonl columns=run sort=seed -->\n<!-- /table -->\n", "unknown table marker option"),
        ("<!-- /table -->\n", "without an opening table marker"),
    ],
)
def test_malformed_markers_are_errors(study: Path, md: str, message: str) -> None:
    with pytest.raises(TableError, match=message):
        render_tables(md, study)


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text('{"a": 1}\n{"a": 0.03,}\n', encoding="utf-8")
    with pytest.raises(TableError, match=r"r\.jsonl:2: not valid JSON"):
        render_tables("<!-- table: r.jsonl columns=a -->\n<!-- /table -->\n", tmp_path)


def test_render_docs_rewrites_stale_pages_and_check_then_passes(study: Path) -> None:
    assert render_docs(study) == [study / "study.md"]
    assert (study / "study.md").read_text(encoding="utf-8") == EXPECTED
    assert render_docs(study, check=True) == []
    assert render_docs(study) == []


def test_check_detects_a_stale_table_without_writing(study: Path) -> None:
    render_docs(study)
    (study / "results" / "runs.jsonl").write_text(ROWS.replace("0.0330", "0.0331"), encoding="utf-8")
    with pytest.raises(StaleTablesError, match=r"study\.md") as info:
        render_docs(study, check=True)
    assert info.value.stale == [study / "study.md"]
    assert "0.0330" in (study / "study.md").read_text(encoding="utf-8")  # untouched


def test_main_check_exit_code_and_summary(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check", str(study)]) == 1
    assert "tables out of date" in capsys.readouterr().err
    assert main([str(study)]) == 0
    assert "1 pages, 1 tables, 1 rewritten" in capsys.readouterr().out
    assert main(["--check", str(study)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_repository_experiment_tables_are_up_to_date() -> None:
    pages = sorted(EXPERIMENTS.glob("*.md"))
    assert len(pages) >= 5, f"expected the study pages under {EXPERIMENTS}"
    assert any("<!-- table:" in page.read_text(encoding="utf-8") for page in pages)
    render_docs(EXPERIMENTS, check=True)  # raises StaleTablesError naming the pages to regenerate

"""afm model export: a ranker version → a new version with quantized item tables (tiny world, tiny ranker)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from features.config import Layout
from training.cli import model as model_group
from training.jobs.export import (
    EvalDay,
    ExportError,
    export_quantized,
    predict_with_user_format,
    quantized_ranker,
    ranker_of,
)
from training.jobs.finetune import FinetuneConfig, finetune, predict
from training.jobs.registry import RegistryError, current_version, list_versions, load_artifact
from training.model.backbone import PinFMConfig
from training.model.quantize import QuantizedEmbedding, item_tables

FT = FinetuneConfig(model="tiny", epochs=1, batch_size=128, device="cpu")
_TINY = PinFMConfig.preset("tiny")
FT_BUCKETS, FT_WIDTH = _TINY.hash_buckets, _TINY.d_model // _TINY.n_hash_tables

#: largest |p_int - p_fp32| of any impression's probability on the tiny world's eval day
PROB_TOLERANCE = {"int8": 0.002, "int4": 0.02}
#: largest |AUC_int - AUC_fp32| of any action on that day
AUC_TOLERANCE = {"int8": 0.001, "int4": 0.01}


@pytest.fixture(scope="module")
def source(world: Layout) -> str:
    """A fine-tuned tiny ranker, promoted (CURRENT)."""
    out = finetune(world, FT, backbone="none")
    assert out["promoted"]
    return out["version"]


def _digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_export_writes_a_smaller_new_version_and_leaves_the_source_and_current_alone(
    world: Layout, source: str, fmt: str
) -> None:
    src_dir = load_artifact(world, "ranker", source)["path"]
    before = _digest(src_dir)
    out = export_quantized(world, quantize=fmt)  # default source: CURRENT
    assert out["source_version"] == source and out["version"] != source and out["promoted"] is False
    assert current_version(world) == source  # not promoted
    assert _digest(src_dir) == before  # the source folder is byte for byte as it was
    art = load_artifact(world, "ranker", out["version"])
    quant = art["config"]["quantization"]
    assert quant["item_tables"] == fmt and quant["bits"] == {"int8": 8, "int4": 4}[fmt]
    assert quant["source_version"] == source and quant["user_embeddings"] == "int8"
    assert quant["tables"] == ["backbone.items.tables.0", "backbone.items.tables.1"]
    assert art["config"]["ranker"] == load_artifact(world, "ranker", source)["config"]["ranker"]
    record = json.loads((art["path"] / "quantization.json").read_text())
    rows, width = 2 * FT_BUCKETS, FT_WIDTH  # 2 sub-tables of the tiny preset
    per_row = {"int8": width + 4, "int4": width // 2 + 8}[fmt]  # codes + float32 scale (+ float32 offset)
    assert record["table_bytes_before"] == rows * width * 4 and record["table_bytes_after"] == rows * per_row
    size = (art["path"] / "model.pt").stat().st_size
    assert record["model_pt_bytes_after"] == size < (src_dir / "model.pt").stat().st_size
    assert record["model_pt_bytes_before"] == (src_dir / "model.pt").stat().st_size
    assert 0 < record["max_abs_error"] < 0.05
    # the state dict holds the quantized buffers, not the float tables
    assert "backbone.items.tables.0.weight" not in art["state_dict"]
    assert art["state_dict"]["backbone.items.tables.0.codes"].dtype == (torch.int8 if fmt == "int8" else torch.uint8)
    # its own evaluation on the source's eval day, close to the source's
    assert record["eval_day"] == "2026-01-03" and art["metrics"]["auc_click"] == record["metrics"]["auc_click"]
    for k, delta in record["metrics_delta"].items():
        if k.startswith("auc_"):
            assert abs(delta) < AUC_TOLERANCE[fmt], (k, delta)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_exported_model_loads_and_scores_close_to_fp32(world: Layout, source: str, fmt: str) -> None:
    out = export_quantized(world, source, quantize=fmt, evaluate_day=False)
    q = quantized_ranker(load_artifact(world, "ranker", out["version"]))
    assert all(isinstance(t, QuantizedEmbedding) and t.bits == out["bits"] for t in item_tables(q).values())
    fp32 = ranker_of(load_artifact(world, "ranker", source))
    day = EvalDay(world, load_artifact(world, "ranker", source))
    p_fp32 = predict(fp32, day.data, day.items, torch.device("cpu"))
    p_q = predict(q, day.data, day.items, torch.device("cpu"))
    diff = np.abs(p_fp32 - p_q)
    assert 0 < diff.max() < PROB_TOLERANCE[fmt], diff.max()


def test_user_embeddings_in_float_give_predicts_probabilities_and_quantized_ones_differ_a_little(
    world: Layout, source: str
) -> None:
    art = load_artifact(world, "ranker", source)
    model = ranker_of(art)
    assert model.uses_user_embedding  # the default hybrid ranker reads the published embedding
    day = EvalDay(world, art)
    ref = predict(model, day.data, day.items, torch.device("cpu"))
    np.testing.assert_array_equal(predict_with_user_format(model, day.data, day.items, None), ref)
    p8 = predict_with_user_format(model, day.data, day.items, 8)
    p4 = predict_with_user_format(model, day.data, day.items, 4)
    assert 0 < np.abs(p8 - ref).max() < np.abs(p4 - ref).max() < 0.02


def test_bad_exports_name_the_problem(world: Layout, source: str, tmp_path) -> None:
    with pytest.raises(ExportError, match=r"--quantize must be one of \['int8', 'int4'\], got 'int2'"):
        export_quantized(world, quantize="int2")
    with pytest.raises(ExportError, match="--user-embeddings must be one of"):
        export_quantized(world, quantize="int8", user_embeddings="bf16")
    with pytest.raises(RegistryError, match="no ranker version 'v0-nope'"):
        export_quantized(world, "v0-nope", quantize="int8")
    with pytest.raises(RegistryError, match="no ranker is promoted"):
        export_quantized(Layout(tmp_path), quantize="int8")
    n = len(list_versions(world))
    exported = export_quantized(world, source, quantize="int8", evaluate_day=False)["version"]
    with pytest.raises(ExportError, match=f"already quantized.*export from its float source {source}"):
        export_quantized(world, exported, quantize="int4")
    assert len(list_versions(world)) == n + 1  # the refused exports wrote nothing


def test_the_cli_exports_and_refuses_a_bad_format_by_name(world: Layout, source: str) -> None:
    runner = CliRunner()
    bad = runner.invoke(model_group, ["export", "--home", str(world.root), "--quantize", "int2"])
    assert bad.exit_code == 2 and "Invalid value for '--quantize': 'int2' is not one of 'int8', 'int4'" in bad.output
    missing = runner.invoke(model_group, ["export", "--home", str(world.root)])
    assert missing.exit_code == 2 and "Missing option '--quantize'" in missing.output
    ok = runner.invoke(
        model_group, ["export", source, "--home", str(world.root), "--quantize", "int4", "--no-evaluate"]
    )
    assert ok.exit_code == 0, ok.output
    line = json.loads(ok.output.strip().splitlines()[-1])
    assert line["item_tables"] == "int4" and line["promoted"] is False and "metrics" not in line
    assert load_artifact(world, "ranker", line["version"])["metrics"] == {}

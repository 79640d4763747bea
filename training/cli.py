"""``afm train …``, ``afm bench …``, ``afm eval …`` and ``afm model …``: the model side.

Training jobs (what the DAGs run), benchmarks (one JSON line each), evaluations of finished
runs, and the model registry (list / promote / rollback). Modules load lazily so
``afm --help`` does not import torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from features.cli_options import ds_callback, echo_json, home_option, layout_of, rounded
from features.settings import SettingsError

LOSS_CHOICES = {"next": (1.0, 0.0, 0.0), "next+multi": (1.0, 1.0, 0.0), "next+multi+future": (1.0, 1.0, 1.0)}
losses_option = click.option(
    "--losses",
    type=click.Choice(sorted(LOSS_CHOICES)),
    default=None,
    help="Pretraining losses: next-token only, + multi-token, + future-token (default: the preset's).",
)


def _negatives(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | str | None:
    if value is None or value == "full":
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise click.BadParameter(f"expected a count ≥ 0 or 'full', got {value!r}")
    return n


# ----------------------------------------------------------------------- training
@click.group()
def train() -> None:
    """Pretrain the PinFM backbone and fine-tune the ranker."""


@train.command("pretrain")
@home_option
@click.option("--ds", default=None, callback=ds_callback, help="Corpus day to train on (default: latest).")
@click.option("--size", type=click.Choice(["tiny", "small", "base"]), default="small", show_default=True)
@click.option("--steps", default=None, type=int, help="Override the number of optimizer steps.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--seed", default=0, type=int, show_default=True)
@losses_option
@click.option(
    "--time-gaps/--no-time-gaps",
    default=True,
    show_default=True,
    help="Feed log-time-gap buckets between consecutive events to the backbone (the ranker follows).",
)
def train_pretrain(home, ds, size, steps, device, seed, losses, time_gaps) -> None:
    """Pretrain the backbone (next-, multi-, future-token losses); saves models/pinfm/<version>.

    The objective and the optimiser are the benchmark's best measured recipe
    (training/model/recipes.py); --size scales the batch, the steps and the negatives.
    A crashed run started again with the same options resumes from its last checkpoint.
    """
    from training.jobs.pretrain import PretrainConfig, pretrain

    over = {"steps": steps} if steps else {}
    if losses:
        over.update(zip(("next_token", "multi_token", "future_token"), LOSS_CHOICES[losses], strict=True))
    cfg = PretrainConfig.preset(size).replace(device=device, seed=seed, time_gaps=time_gaps, **over)
    out = pretrain(layout_of(home), cfg, ds=ds)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one line, rank 0's (the one that saved)
        echo_json(out)


@train.command("finetune")
@home_option
@click.option(
    "--ds", default=None, callback=ds_callback, help="Evaluation day (last day); earlier days train (default: latest)."
)
@click.option("--backbone", default="latest", show_default=True, help="PinFM version to start from, or 'none'.")
@click.option("--epochs", default=None, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, type=int, show_default=True)
@click.option(
    "--promote/--no-promote", default=True, show_default=True, help="Make it CURRENT when it passes the gate."
)
@click.option(
    "--sequence",
    type=click.Choice(["none", "transact", "pinfm_late", "pinfm_early", "hybrid"]),
    default="hybrid",
    show_default=True,
    help="Sequence module: none, TransAct, PinFM late fusion (the published user embedding alone), PinFM early "
    "fusion (DCAT over the realtime sequence alone), hybrid (DCAT + the published user embedding).",
)
@click.option(
    "--hybrid-user",
    type=click.Choice(["fused", "stored"]),
    default="fused",
    show_default=True,
    help="--sequence hybrid: the late features read the published user embedding fused with the realtime "
    "sequence's summary, or the embedding alone.",
)
@click.option(
    "--new-item-techniques/--no-new-item-techniques",
    default=True,
    show_default=True,
    help="Candidate-ID randomization and item-age-dependent ID dropout during fine-tuning.",
)
@click.option(
    "--missing-id-vector/--no-missing-id-vector",
    default=False,
    show_default=True,
    help="With the techniques: a learned vector stands in for a dropped ID part (README: new items).",
)
@click.option("--next-action-weight", default=0.01, show_default=True, help="TransAct V2 Next Action Loss weight.")
@click.option("--aux-next-token", default=0.0, show_default=True, help="Auxiliary next-token loss weight (0 = off).")
@click.option(
    "--lifelong-top-k",
    default=0,
    show_default=True,
    help="--sequence transact: TransAct V2 selection, per candidate the 8 latest + K most similar actions (0 = all).",
)
@click.option(
    "--time-gaps/--no-time-gaps",
    default=None,
    help="Feed log-time-gap buckets of the sequence to the backbone (default: as the backbone was pretrained).",
)
def train_finetune(
    home, ds, backbone, epochs, device, seed, promote, sequence, hybrid_user, new_item_techniques, missing_id_vector,
    next_action_weight, aux_next_token, lifelong_top_k, time_gaps,
) -> None:  # fmt: skip
    """Fine-tune the ranker on ranking examples; per-action AUC and HIT@3 (new/old items) on the last day."""
    from training.jobs.finetune import FinetuneConfig, finetune
    from training.model.ranker import NewItemConfig

    cfg = FinetuneConfig().replace(
        device=device,
        seed=seed,
        sequence=sequence,
        hybrid_user=hybrid_user,
        next_action_weight=next_action_weight,
        aux_next_token_weight=aux_next_token,
        lifelong_top_k=lifelong_top_k,
        time_gaps=time_gaps,
        **({"epochs": epochs} if epochs else {}),
        new_items=NewItemConfig(missing_id_vector=missing_id_vector) if new_item_techniques else NewItemConfig.off(),
    )
    echo_json(finetune(layout_of(home), cfg, ds=ds, backbone=backbone, promote=promote))


# -------------------------------------------------------------------------- bench
@click.group()
def bench() -> None:
    """Benchmarks: each prints one JSON line with its figures and the ratio it is judged by."""


@bench.command("seqrec")
@home_option
@click.option(
    "--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False), help="'user item' file."
)
@click.option("--format", "fmt", type=click.Choice(["sasrec"]), default="sasrec", show_default=True)
@click.option("--protocol", type=click.Choice(["full", "sampled100"]), default="full", show_default=True)
@click.option("--max-len", default=50, show_default=True, type=int, help="History length.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--preset", type=click.Choice(["default", "tiny"]), default="default", show_default=True)
@click.option("--epochs", default=None, type=int, help="Override the number of epochs.")
@losses_option
@click.option("--negatives", default=None, callback=_negatives, help="Sampled negatives per step, or 'full'.")
@click.option("--seed", default=0, type=int, show_default=True)
@click.option(
    "--run-dir", default=None, type=click.Path(file_okay=False), help="Checkpoints (default under $AFM_HOME/runs)."
)
@click.option("--fresh", is_flag=True, help="Ignore an existing checkpoint in the run directory.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Also write the JSON line here.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Override a setting, e.g. --set hash_buckets=1048576 --set objective.negatives=2048 (repeatable).",
)
@click.option(
    "--members",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Train this many models (seeds --seed, --seed + 1, …) at once, sharing the threads, and score their ensemble.",
)
def bench_seqrec(
    home, data_path, fmt, protocol, max_len, device, preset, epochs, losses, negatives, seed, run_dir, fresh, out_path,
    overrides, members,
):  # fmt: skip
    """Train PinFM on a leave-one-out split, select on validation, report test HR/NDCG/MRR.

    A crashed run started again with the same options resumes from its last epoch.
    With --members N the N models' summed logits rank the items (each member's own
    figures are in the line too).
    """
    from training.bench.seqrec import SeqRecConfig, run_seqrec_bench

    base = SeqRecConfig.preset(preset).to_dict()
    cfg = SeqRecConfig.from_dict({**base, "max_len": max_len, "device": device, "seed": seed})
    obj = {}
    if losses:
        obj.update(zip(("next_token", "multi_token", "future_token"), LOSS_CHOICES[losses], strict=True))
    if negatives is not None:
        obj["negatives"] = negatives
    cfg = SeqRecConfig.from_dict(
        {**cfg.to_dict(), "objective": {**cfg.objective.to_dict(), **obj}, **({"epochs": epochs} if epochs else {})}
    )
    try:
        cfg = cfg.with_overrides(overrides)
    except SettingsError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from exc
    kind = "seqrec" if members == 1 else f"seqrec{members}x"
    run = (
        Path(run_dir) if run_dir else layout_of(home).runs / f"{kind}-{Path(data_path).stem}-{protocol}-{cfg.digest()}"
    )
    if members == 1:
        out = run_seqrec_bench(data_path, cfg, protocol=protocol, run_dir=run, resume=not fresh)
    else:
        from training.experiments.ensemble import run_seqrec_ensemble_bench

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise click.UsageError("--members trains its own processes; run it without torchrun")
        out = run_seqrec_ensemble_bench(data_path, cfg, members, run, protocol=protocol, resume=not fresh)
    out["run_dir"] = str(run)
    if int(os.environ.get("RANK", "0")) == 0:
        echo_json(out)
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(out, default=str, sort_keys=True) + "\n", encoding="utf-8")


@bench.command("pretrain")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--steps", default=None, type=int, help="Timed steps (default 10 on CPU, 50 on GPU).")
@click.option("--batch-size", default=None, type=int, help="Sequences per step (default 8 on CPU, 64 on GPU).")
@click.option(
    "--peak-tflops", default=800.0, show_default=True, help="Nominal accelerator peak for the MFU (H100 bf16)."
)
def bench_pretrain(device, steps, batch_size, peak_tflops) -> None:
    """Training tokens/s of the reference size (d=256, 4 layers, length 256) and its FLOP utilisation."""
    from training.bench.pretrain import bench_pretrain as run

    echo_json(run(device=device, steps=steps, batch_size=batch_size, peak_tflops=peak_tflops))


@bench.command("full-softmax")
@click.option("--queries", default=1435, show_default=True, type=int, help="Query positions (a Beauty step's).")
@click.option("--items", default=54543, show_default=True, type=int, help="Catalog size (Beauty's, with padding).")
@click.option("--dim", default=64, show_default=True, type=int)
@click.option("--reps", default=3, show_default=True, type=int, help="Timed rounds (after one warm-up round).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
def bench_full_softmax(queries, items, dim, reps, device) -> None:
    """Forward + backward of the exact softmax's catalog pass: plain autograd vs the blocked paths."""
    from training.bench.full_softmax import bench_full_softmax as run

    echo_json(run(queries=queries, items=items, dim=dim, reps=reps, device=device))


@bench.command("dcat")
@click.option("--seq-len", default=256, show_default=True, type=int, help="Events per user sequence (all real).")
@click.option("--candidates", default=500, show_default=True, type=int, help="Candidates per request.")
@click.option("--requests", default=1, show_default=True, type=int, help="Unique user sequences scored together.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--d-model", default=256, show_default=True, type=int)
@click.option("--layers", default=4, show_default=True, type=int)
@click.option("--heads", default=4, show_default=True, type=int)
@click.option("--reps", default=None, type=int, help="Timed calls per path (default 10 DCAT / 3 naive on CPU).")
@click.option(
    "--naive-max", default=None, type=int, help="Candidates per request the naive path scores (default 50 on CPU)."
)
@click.option("--compile", "compile_", is_flag=True, help="Also time the sequence module under torch.compile.")
def bench_dcat(seq_len, candidates, requests, device, d_model, layers, heads, reps, naive_max, compile_) -> None:
    """Candidates/s of DCAT (one context pass + crossing pass) vs one full forward per candidate."""
    from training.bench.dcat import bench_dcat as run

    echo_json(
        run(
            seq_len=seq_len, candidates=candidates, requests=requests, d_model=d_model, n_layers=layers,
            n_heads=heads, device=device, reps=reps, naive_max=naive_max, compile=compile_,
        )
    )  # fmt: skip


@bench.command("quantize")
@home_option
@click.option("--version", default=None, help="A float ranker version (default: CURRENT).")
@click.option("--candidates", default=500, show_default=True, type=int, help="Candidates of the timed request.")
@click.option("--reps", default=30, show_default=True, type=int, help="Timed calls per format.")
@click.option(
    "--evaluate/--no-evaluate", default=True, show_default=True, help="Also per-action AUC on the eval day per format."
)
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Also write the JSON line here.")
def bench_quantize(home, version, candidates, reps, evaluate, out_path) -> None:
    """Memory, candidates/s and AUC of a ranker with fp32, int8 and int4 item tables, side by side (CPU)."""
    from training.bench.quantize import bench_quantize as run

    out = run(layout_of(home), version, candidates=candidates, reps=reps, evaluate=evaluate)
    echo_json(out)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(out, default=str, sort_keys=True) + "\n", encoding="utf-8")


@bench.command("grouping")
@click.option("--requests", default=64, show_default=True, type=int, help="Requests per training batch.")
@click.option("--per-request", default=10, show_default=True, type=int, help="Impressions per request.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--steps", default=5, show_default=True, type=int, help="Timed training steps per layout.")
def bench_grouping(requests, per_request, device, steps) -> None:
    """Ranker training steps/s with impressions grouped by request (DCAT) vs one sequence copy each."""
    from training.bench.dcat import bench_grouping as run

    echo_json(run(requests=requests, per_request=per_request, steps=steps, device=device))


# --------------------------------------------------------------------------- eval
@click.group("eval")
def eval_() -> None:
    """Evaluate trained models."""


@eval_.command("ranker-ablation")
@home_option
@click.option("--ds", default=None, callback=ds_callback, help="Evaluation day (default: latest); earlier days train.")
@click.option("--backbone", default="latest", show_default=True, help="PinFM version to start from, or 'none'.")
@click.option("--epochs", default=None, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", default=0, type=int, show_default=True)
@click.option("--markdown", "md_path", default=None, type=click.Path(dir_okay=False), help="Also write a table here.")
def eval_ranker_ablation(home, ds, backbone, epochs, device, seed, md_path) -> None:
    """Fine-tune one ranker per sequence module (+ without new-item techniques); nothing is registered."""
    from training.experiments.ablation import markdown_table, run_ablation
    from training.jobs.finetune import FinetuneConfig

    cfg = FinetuneConfig().replace(device=device, seed=seed, **({"epochs": epochs} if epochs else {}))
    out = run_ablation(layout_of(home), cfg, ds=ds, backbone=backbone)
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(markdown_table(out["rows"]) + "\n", encoding="utf-8")
    echo_json(out)


@eval_.command("new-items")
@click.option(
    "--data", "data_dir", required=True, type=click.Path(), help="MovieLens folder with ratings.csv and movies.csv."
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--seeds", default=3, show_default=True, type=int, help="Fine-tuning seeds (both variants each).")
@click.option("--seed", default=0, show_default=True, type=int, help="First seed (negatives, backbone, fine-tuning).")
@click.option("--pretrain-steps", default=None, type=int, help="Backbone pretraining steps (default 300).")
@click.option("--epochs", default=None, type=int, help="Fine-tuning epochs (default 2).")
@click.option("--age-horizon-days", default=None, type=float, help="Age dropout horizon of the 'with' variant (1095).")
@click.option("--age-dropout-max", default=None, type=float, help="Age dropout at age 0 of the 'with' variant (1.0).")
@click.option("--id-randomization", default=None, type=float, help="Candidate-ID randomization rate (0.1).")
@click.option(
    "--missing-id-vector/--no-missing-id-vector",
    default=None,
    help="A learned vector stands in for a dropped ID part in the 'with' variant (default: on).",
)
@click.option("--recent-share", default=None, type=float, help="Share of negatives among recent movies (0.5).")
@click.option("--recent-days", default=None, type=float, help="How recent a 'recent' negative is, days (365).")
@click.option("--max-eval-requests", default=None, type=int, help="Subsample the evaluation requests (default all).")
@click.option("--content-dim", default=None, type=int, help="Content vector size: hashed genres + year + flag (16).")
@click.option(
    "--split",
    "quantiles",
    default=None,
    help="Quantiles of the rating times 'PRE,FT[,END]' ending pretraining, fine-tuning, evaluation "
    "(default 0.70,0.85,1.0); e.g. 0.55,0.70,0.85 to choose settings without touching the last 15 %.",
)
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Also write the JSON line here.")
@click.option("--markdown", "md_path", default=None, type=click.Path(dir_okay=False), help="Also write a table here.")
def eval_new_items(
    data_dir, device, seeds, seed, pretrain_steps, epochs, age_horizon_days, age_dropout_max, id_randomization,
    missing_id_vector, recent_share, recent_days, max_eval_requests, content_dim, quantiles, out_path, md_path,
) -> None:  # fmt: skip
    """MovieLens new-item experiment: ranker with vs without the new-item techniques, time split, per seed."""
    from training.experiments.movielens_newitems import NewItemsExperimentConfig, markdown_table, run_new_items

    def given(**kw) -> dict:
        return {k: v for k, v in kw.items() if v is not None}

    split = {}
    if quantiles:
        try:
            qs = [float(q) for q in quantiles.split(",")]
        except ValueError:
            qs = []
        if len(qs) not in (2, 3):
            raise click.BadParameter(
                f"expected 'PRE,FT' or 'PRE,FT,END' quantiles, got {quantiles!r}", param_hint="--split"
            )
        split = dict(zip(("pretrain_quantile", "finetune_quantile", "eval_quantile"), qs, strict=False))

    cfg = NewItemsExperimentConfig()
    cfg = cfg.replace(
        device=device, seeds=seeds, seed=seed,
        pretrain=cfg.pretrain.replace(**given(steps=pretrain_steps)),
        finetune=cfg.finetune.replace(**given(epochs=epochs)),
        new_items=cfg.new_items.replace(**given(
            age_horizon_days=age_horizon_days, age_dropout_max=age_dropout_max, id_randomization=id_randomization,
            missing_id_vector=missing_id_vector,
        )),
        **given(recent_share=recent_share, recent_days=recent_days, max_eval_requests=max_eval_requests,
                content_dim=content_dim),
        **split,
    )  # fmt: skip
    out = run_new_items(Path(data_dir), cfg)
    echo_json(out)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(out, default=str, sort_keys=True) + "\n", encoding="utf-8")
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(markdown_table(out) + "\n", encoding="utf-8")


def _leave_one_out_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--data, --protocol, --part and --device of the leave-one-out eval commands."""
    fn = click.option("--device", default="auto", show_default=True)(fn)
    fn = click.option("--part", type=click.Choice(["test", "valid"]), default="test", show_default=True)(fn)
    fn = click.option("--protocol", type=click.Choice(["full", "sampled100"]), default="full", show_default=True)(fn)
    return click.option(
        "--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False), help="'user item' file."
    )(fn)


def _run_dirs_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--run-dir (repeatable) of the eval commands: finished 'afm bench seqrec' runs."""
    return click.option(
        "--run-dir",
        "run_dirs",
        required=True,
        multiple=True,
        type=click.Path(exists=True, file_okay=False),
        help=help_text,
    )


@eval_.command("retrieval")
@_run_dirs_option("A finished 'afm bench seqrec' run (plain or --members); repeat it to score several as one ensemble.")
@_leave_one_out_options
@click.option(
    "--quantize",
    type=click.Choice(["fp32", "int8", "int4"]),
    default="fp32",
    show_default=True,
    help="Score with the item-ID tables per-row quantized (as `afm model export --quantize` serves them).",
)
def eval_retrieval(run_dirs, data_path, protocol, part, device, quantize) -> None:
    """Leave-one-out retrieval metrics (HR/NDCG@10/50/200, MRR) of a trained backbone or an ensemble."""
    from training.bench.seqrec import SeqRecData
    from training.experiments.ensemble import ensemble_ranks, load_members
    from training.model.quantize import BITS, quantize_item_tables, table_bytes
    from training.retrieval import DEFAULT_KS, retrieval_metrics

    members = load_members(run_dirs, device)
    if quantize != "fp32":
        for m in members:  # both the histories' items and the catalogue come from the quantized rows
            quantize_item_tables(m.model, BITS[quantize])
    data = SeqRecData.load(data_path)
    m = retrieval_metrics(ensemble_ranks(members, data, part, protocol), DEFAULT_KS)
    echo_json(
        {
            "protocol": protocol, "part": part, "n_members": len(members), "n_users": m.pop("n"),
            "item_tables": quantize, "table_bytes": sum(table_bytes(x.model) for x in members), **rounded(m, 5),
        }
    )  # fmt: skip


@eval_.command("compare")
@_run_dirs_option("Two finished 'afm bench seqrec' runs (plain or --members): A (the baseline), then B.")
@_leave_one_out_options
def eval_compare(run_dirs, data_path, protocol, part, device) -> None:
    """Paired comparison of two trained backbones (or ensembles) on the same users: B − A per metric.

    Prints one JSON line: for NDCG@10, HR@10 and MRR the means of A and B, their difference,
    its standard error and 95 % interval over users, and how many users each model ranks better.
    """
    from training.bench.seqrec import SeqRecData
    from training.experiments.ensemble import ensemble_ranks, load_members
    from training.retrieval import paired_comparison

    if len(run_dirs) != 2:
        raise click.UsageError(f"give --run-dir exactly twice (A, then B); got {len(run_dirs)}")
    data = SeqRecData.load(data_path)
    ranks = [ensemble_ranks(load_members([d], device), data, part, protocol) for d in run_dirs]
    out = rounded(paired_comparison(ranks[0], ranks[1]))
    echo_json({"a": str(run_dirs[0]), "b": str(run_dirs[1]), "protocol": protocol, "part": part, **out})


@eval_.command("pretrain-retrieval")
@home_option
@click.option("--ds", default=None, callback=ds_callback, help="Held-out day (default: the latest day of events).")
@click.option(
    "--version",
    "versions",
    multiple=True,
    help="A pinfm version (default: the newest); give it twice for a paired comparison (the second minus the first).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Also write the JSON line here.")
def eval_pretrain_retrieval(home, ds, versions, device, out_path) -> None:
    """Next-item retrieval (HR/NDCG@10/50, MRR) of pretrained backbones on a held-out day, full catalogue.

    Each user active on the day is scored with their history before it; the target is their
    first positive action of the day. The backbone must be pretrained on an earlier day.
    """
    from training.bench.pretrain_retrieval import pretrain_retrieval

    if len(versions) > 2:
        raise click.UsageError(f"give --version at most twice (A, then B); got {len(versions)}")
    out = pretrain_retrieval(layout_of(home), list(versions), ds=ds, device=device)
    echo_json(out)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(out, default=str, sort_keys=True) + "\n", encoding="utf-8")


# -------------------------------------------------------------------------- model
@click.group()
def model() -> None:
    """Model registry: list, promote, roll back, export quantized."""


@model.command("list")
@home_option
def model_list(home) -> None:
    """List ranker versions (newest last) and which one is CURRENT."""
    from training.jobs.registry import list_versions

    for row in list_versions(layout_of(home)):
        echo_json(row)


@model.command("promote")
@home_option
@click.argument("version")
def model_promote(home, version) -> None:
    """Make VERSION the served ranker (writes models/ranker/CURRENT)."""
    from training.jobs.registry import promote

    echo_json(promote(layout_of(home), version))


@model.command("rollback")
@home_option
def model_rollback(home) -> None:
    """Serve the previously promoted ranker again."""
    from training.jobs.registry import rollback

    echo_json(rollback(layout_of(home)))


QUANTIZE_CHOICES = ("int8", "int4")
USER_EMBEDDING_CHOICES = ("int8", "int4", "fp32")


@model.command("export")
@home_option
@click.argument("version", required=False)
@click.option(
    "--quantize",
    required=True,
    type=click.Choice(QUANTIZE_CHOICES),
    help="Store the item-ID embedding tables per-row quantized to int8 or int4.",
)
@click.option(
    "--user-embeddings",
    type=click.Choice(USER_EMBEDDING_CHOICES),
    default="int8",
    show_default=True,
    help="How publish-embeddings stores this model's user embeddings in Feast.",
)
@click.option(
    "--evaluate/--no-evaluate",
    default=True,
    show_default=True,
    help="Evaluate the quantized model on the source's eval day (its metrics.json; the gate reads it).",
)
def model_export(home, version, quantize, user_embeddings, evaluate) -> None:
    """Write a NEW ranker version with quantized serving tables from VERSION (default: CURRENT).

    The source version is left as it is and nothing is promoted: serve the new version with
    `afm model promote NEW`, go back with `afm model rollback`. Prints the new version's
    quantization record (table bytes before/after, max abs error, AUC before/after).
    """
    from training.jobs.export import export_quantized

    echo_json(export_quantized(layout_of(home), version, quantize, user_embeddings, evaluate_day=evaluate))

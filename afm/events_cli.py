"""``afm events push | replay``: today's events into the service's realtime sequences (``POST /v1/events``).

``afm events push FILE`` sends a JSON-lines or parquet file of events (the event contract's
fields) to a running service with ``--url`` (batches of ``--batch-size``), or, without it,
takes them in this process with the service's own code (:class:`serving.routes.events.EventIngestor`)
into the Feast online store of ``--home``. It prints one JSON line of counts and exits 1 when
an event was rejected (each is named with its line and reasons, and kept in
``$AFM_HOME/quarantine/realtime/``).

``afm events replay --ds D`` replays day D through the service in-process, with and without
realtime events, and prints each run's per-action AUC on D's impressions (:mod:`afm.replay`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from features.cli_options import ds_option, echo_json, home_option, layout_of

#: Rejections the printed summary lists (all are counted and quarantined).
SHOWN_REJECTIONS = 20


def read_events(path: Path) -> list[object]:
    """The events of a ``.jsonl`` file (one JSON object a line; a line that is not JSON is sent as its text,
    to be rejected and quarantined) or of a parquet file (``ts`` as RFC 3339)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        from afm.replay import event_records

        return list(event_records(pq.read_table(path), sort=False)[0])
    events: list[object] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            events.append(line)
    return events


@click.group()
def events() -> None:
    """Today's events into the realtime sequences: push a file, replay a day."""


@events.command("push")
@home_option
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--url",
    envvar="AFM_SERVICE_URL",
    default=None,
    help="A running service, e.g. http://127.0.0.1:8080 (env AFM_SERVICE_URL); default: in this process.",
)
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1, 1000), help="Events per POST.")
def events_push(home, path: Path, url: str | None, batch_size: int) -> None:
    """Send the events of PATH (.jsonl or .parquet) into the realtime sequences."""
    items = read_events(path)
    if url:
        import httpx

        client = httpx.Client(base_url=url.rstrip("/"), timeout=60)

        def send(batch: list[object]) -> dict:
            r = client.post("/v1/events", json={"events": batch})
            if r.status_code != 200:
                raise click.ClickException(f"POST {url}/v1/events: HTTP {r.status_code}: {r.text[:500]}")
            return r.json()
    else:
        from serving.online_features import FeastOnlineFeatures
        from serving.routes.events import EventIngestor

        layout = layout_of(home)
        ingestor = EventIngestor(FeastOnlineFeatures(layout), layout)
        send = ingestor.ingest

    keys = ("received", "accepted", "added", "duplicates", "impressions", "rejected", "users")
    summary: dict = {"file": str(path), **dict.fromkeys(keys, 0), "rejections": [], "quarantine": []}
    for start in range(0, len(items), batch_size):
        got = send(items[start : start + batch_size])
        for key in keys:
            summary[key] += int(got[key])
        for r in got["rejections"]:
            if len(summary["rejections"]) < SHOWN_REJECTIONS:
                summary["rejections"].append({**r, "index": start + r["index"]})
        if got.get("quarantine") and got["quarantine"] not in summary["quarantine"]:
            summary["quarantine"].append(got["quarantine"])
    echo_json(summary)
    if summary["rejected"]:
        click.echo(
            f"afm: {summary['rejected']} of {summary['received']} events rejected (kept in {summary['quarantine']})",
            err=True,
        )
        sys.exit(1)


@events.command("replay")
@home_option
@ds_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the JSON here.")
def events_replay(home, ds: str, out: Path | None) -> None:
    """Replay day DS through the service (CURRENT ranker) with and without realtime events; per-action AUC.

    Use an evaluation data root: the realtime rows of the day's users are emptied before each run.
    """
    from afm.replay import replay_auc

    result = replay_auc(layout_of(home), ds)
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    echo_json(result)

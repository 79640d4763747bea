"""``afm serve`` and ``afm publish-embeddings``: the online side."""

from __future__ import annotations

import click

from features.cli_options import echo_json, home_option, layout_of


# ------------------------------------------------------------------------ serving
@click.command("serve")
@home_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, type=int, show_default=True)
@click.option(
    "--max-body-bytes",
    envvar="AFM_MAX_BODY_BYTES",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse request bodies larger than this with 413, before reading them "
    "(default: room for the largest valid /v1/rank request; env AFM_MAX_BODY_BYTES).",
)
def serve(home, host, port, max_body_bytes) -> None:
    """Run the scoring HTTP service (POST /v1/rank, GET /health)."""
    import uvicorn

    from serving.app import create_app

    limits = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    uvicorn.run(create_app(layout_of(home), **limits), host=host, port=port, log_level="info")


@click.command("publish-embeddings")
@home_option
def publish_embeddings(home) -> None:
    """Compute user embeddings with the CURRENT ranker, write them to Feast and materialize."""
    from serving.embeddings import publish_user_embeddings

    echo_json(publish_user_embeddings(layout_of(home)))


@click.command("roll-out")
@home_option
@click.option(
    "--url",
    envvar="AFM_SERVICE_URL",
    required=True,
    help="The running service, e.g. http://127.0.0.1:8080 (env AFM_SERVICE_URL).",
)
def roll_out(home, url) -> None:
    """Make the running service serve CURRENT: reload, smoke request; roll back and fail when it does not."""
    from serving.rollout import roll_out as run

    echo_json(run(layout_of(home), url))

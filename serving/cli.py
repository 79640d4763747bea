"""``afm serve`` and ``afm publish-embeddings``: the online side."""

from __future__ import annotations

import signal
import sys

import click

from features.cli_options import echo_json, home_option, layout_of

#: Seconds a stopping service (SIGTERM, Ctrl-C) lets in-flight requests finish before it cancels
#: them: well inside Kubernetes' default terminationGracePeriodSeconds (30 s) before its SIGKILL.
GRACEFUL_SHUTDOWN_S = 20


# ------------------------------------------------------------------------ serving
@click.command("serve")
@home_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind: this machine only by default; 0.0.0.0 for every interface (the Kubernetes pod does).",
)
@click.option("--port", default=8080, type=int, show_default=True, help="Port to bind; 0 picks a free one.")
@click.option(
    "--max-body-bytes",
    envvar="AFM_MAX_BODY_BYTES",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse request bodies larger than this with 413, before reading them "
    "(default: room for the largest valid /v1/rank request; env AFM_MAX_BODY_BYTES). "
    "/v2/models/*/infer allows 4 KiB more for its tensor envelope (serving.schemas.OIP_ENVELOPE_BYTES).",
)
@click.option(
    "--timeout-graceful-shutdown",
    "graceful_shutdown_s",
    envvar="AFM_GRACEFUL_SHUTDOWN_S",
    type=click.IntRange(min=1),
    default=GRACEFUL_SHUTDOWN_S,
    show_default=True,
    help="On SIGTERM: stop accepting connections, let in-flight requests finish for at most this many "
    "seconds, then cancel them and stop (env AFM_GRACEFUL_SHUTDOWN_S).",
)
@click.option(
    "--torch-threads",
    envvar="AFM_TORCH_THREADS",
    type=click.IntRange(min=1),
    default=None,
    help="Threads each model pass uses (torch's intra-op threads; default: torch's, one per core; "
    "env AFM_TORCH_THREADS). With AFM_MODEL_CONCURRENCY passes at once, their product should not exceed the cores.",
)
def serve(home, host, port, max_body_bytes, graceful_shutdown_s, torch_threads) -> None:
    """Run the scoring HTTP service (POST /v1/rank, Open Inference Protocol v2 under /v2, GET /health).

    SIGTERM stops it gracefully: no new connections, in-flight requests complete (for at most
    --timeout-graceful-shutdown seconds), then it exits 0. A SIGTERM while the model is still
    loading exits 0 at once.
    """
    import uvicorn

    from serving.app import create_app

    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)

    previous = signal.signal(signal.SIGTERM, _exit_cleanly)  # uvicorn handles it while serving, then raises it again
    try:
        limits = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
        uvicorn.run(
            create_app(layout_of(home), **limits),
            host=host,
            port=port,
            log_level="info",
            timeout_graceful_shutdown=graceful_shutdown_s,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum: int, frame: object) -> None:
    """SIGTERM outside uvicorn's own handling (loading, or re-raised after its graceful shutdown): exit 0."""
    sys.exit(0)


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

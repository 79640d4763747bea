"""Roll a promoted ranker out to the running service: reload, smoke request, roll back when it fails.

After ``publish_serving`` has published the user embeddings of CURRENT, :func:`roll_out`

1. asks the service to load CURRENT (``POST /admin/reload``, Bearer ``$AFM_ADMIN_TOKEN``);
2. ranks a few catalogue items for one user of the published snapshot (``POST /v1/rank``)
   and checks that the answer comes from CURRENT and that the user's embedding was the
   precomputed one (``embedding_source: precomputed``): the published embeddings and the
   served model agree;
3. when either step fails: promotes the previous ranker again (``registry.rollback``),
   reloads the service with it, and raises :class:`RolloutError` saying what failed and
   which version is served now.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx
import pyarrow.dataset as pads

from features.config import Layout
from serving.embeddings import iter_sequence_batches, latest_snapshot_day
from serving.schemas import ADMIN_TOKEN_ENV
from training.jobs import registry

log = logging.getLogger(__name__)

SERVICE_URL_ENV = "AFM_SERVICE_URL"
SMOKE_CANDIDATES = 5


class RolloutError(RuntimeError):
    """The service did not serve the promoted ranker; the message says why and what is served now."""


def smoke_request(layout: Layout) -> dict[str, Any]:
    """A ``/v1/rank`` body: the first user of the latest snapshot, the first catalogue items."""
    ds = latest_snapshot_day(layout)
    user_ids, _ = next(iter_sequence_batches(layout, ds, batch_size=1))
    items = pads.dataset(str(layout.items), format="parquet").to_table(columns=["item_id"])
    candidates = sorted(set(items.column("item_id").to_pylist()))[:SMOKE_CANDIDATES]
    return {"user_id": user_ids[0], "candidates": candidates, "surface": "home"}


def _reload(client: httpx.Client, token: str) -> httpx.Response:
    return client.post("/admin/reload", headers={"Authorization": f"Bearer {token}"})


def _check(client: httpx.Client, token: str, version: str, body: dict) -> str | None:
    """None when the service serves ``version`` with precomputed embeddings, else what is wrong."""
    reloaded = _reload(client, token)
    if reloaded.status_code != 200:
        return f"reload answered HTTP {reloaded.status_code}: {reloaded.text[:200]}"
    ranked = client.post("/v1/rank", json=body)
    if ranked.status_code != 200:
        return f"smoke request answered HTTP {ranked.status_code}: {ranked.text[:200]}"
    answer = ranked.json()
    if answer.get("model_version") != version:
        return f"the service answers with {answer.get('model_version')}, not {version}"
    if answer.get("embedding_source") != "precomputed":
        return f"user {body['user_id']} was scored with embedding_source={answer.get('embedding_source')}"
    return None


def roll_out(layout: Layout, url: str, token: str | None = None, timeout_s: float = 120.0) -> dict:
    """Make the service at ``url`` serve CURRENT, checked by a smoke request; roll back when it fails.

    Returns:
        ``{"version", "url", "user_id", "rolled_back": False}``.

    Raises:
        RolloutError: the reload or the smoke check failed (after rolling back when a previous
            version exists); the message names the failure and the version served now.
    """
    token = token or os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise RolloutError(f"no admin token: set {ADMIN_TOKEN_ENV} to the service's token")
    version = registry.current_version(layout)
    if version is None:
        raise RolloutError("nothing is promoted: there is no CURRENT ranker to roll out")
    body = smoke_request(layout)
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        problem = _check(client, token, version, body)
        if problem is None:
            log.info("roll-out: %s serves %s (user %s, precomputed)", url, version, body["user_id"])
            return {"version": version, "url": url, "user_id": body["user_id"], "rolled_back": False}
        try:
            back = registry.rollback(layout)["version"]
        except registry.RegistryError as exc:
            raise RolloutError(f"roll-out of {version} failed: {problem}; no rollback possible: {exc}") from None
        _reload(client, token)
    raise RolloutError(f"roll-out of {version} failed: {problem}; rolled back, the service now serves {back}")
